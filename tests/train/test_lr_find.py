"""The range test's curve arithmetic on known shapes (the sweep on a real model: tests/commands/test_lr_find.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from finetune_helper.errors import FinetuneHelperError
from finetune_helper.train.lr_find import RangeTest, one_process, smooth, steepest, sweep, valley
from finetune_helper.train.recipe import load_recipe


def test_the_sweep_is_exponential_from_start_to_end():
    lrs = sweep(1e-7, 1e-1, 100)
    assert lrs[0] == pytest.approx(1e-7) and lrs[-1] == pytest.approx(1e-1) and len(lrs) == 100
    ratios = {round(b / a, 9) for a, b in zip(lrs, lrs[1:])}
    assert len(ratios) == 1
    with pytest.raises(ValueError):
        sweep(1e-3, 1e-4, 10)


def test_smoothing_is_bias_corrected():
    assert smooth([5.0] * 10) == pytest.approx([5.0] * 10)  # no drift towards 0 at the start


def logistic_curve(lrs, center):
    """A loss that falls from 10 to 2 around ``center`` (steepest there on a log axis), then explodes."""
    out = []
    for lr in lrs:
        x = math.log10(lr) - math.log10(center)
        out.append(2 + 8 / (1 + math.exp(4 * x)) + (50 * (lr / (100 * center)) ** 2))
    return out


@pytest.mark.parametrize("center", [1e-5, 3e-4, 1e-3])
def test_steepest_descent_finds_where_the_loss_falls_fastest(center):
    lrs = sweep(1e-7, 1e-1, 200)
    found = steepest(lrs, logistic_curve(lrs, center))
    assert center / 1.2 < found < center * 1.2
    v = valley(lrs, logistic_curve(lrs, center))
    assert v is not None and 1e-7 < v < 100 * center


def test_the_sweep_stops_when_the_smoothed_loss_passes_4x_its_best():
    curve = RangeTest()
    lrs = sweep(1e-6, 1.0, 100)
    losses = [1.0] * 50 + [1.0 * 1.5 ** k for k in range(50)]
    stopped_at = next(i for i, (lr, loss) in enumerate(zip(lrs, losses)) if curve.record(lr, loss))
    assert 50 < stopped_at < 100 and curve.stopped_early
    assert RangeTest().record(1e-3, math.nan)  # a NaN loss stops at once


ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "tiny-demo.yaml"


def test_the_sweep_plans_for_the_one_process_it_runs():
    """The planner divides the target effective batch over hardware.gpus; one process of that plan would sweep 1/N of
    the batch the LR is for, so the sweep plans one GPU (the recipe otherwise as written)."""
    four = load_recipe(TINY, ["hardware.gpus=4"])
    planned = one_process(four)
    assert (planned.hardware.gpus, planned.hardware.strategy) == (1, "auto")
    assert planned.recommend == four.recommend and planned.training == four.training and planned.seed == four.seed
    ddp = one_process(load_recipe(TINY, ["hardware.gpus=2", "hardware.strategy=ddp"]))
    assert (ddp.hardware.gpus, ddp.hardware.strategy) == (1, "auto")  # DDP of one process is plain training
    one = load_recipe(TINY)
    assert one_process(one) is one


@pytest.mark.parametrize("overrides, field", [
    (["hardware.strategy=zero2"], "hardware.strategy"),
    (["hardware.gpus=2", "hardware.strategy=zero3"], "hardware.strategy"),
    (["hardware.gpus=2", "hardware.strategy=fsdp"], "hardware.strategy"),
    (["training.deepspeed=ds_config.json"], "training.deepspeed"),
    (["training.fsdp=full_shard auto_wrap"], "training.fsdp"),
])
def test_sharded_and_deepspeed_recipes_are_refused_naming_the_field(overrides, field):
    with pytest.raises(FinetuneHelperError) as refused:
        one_process(load_recipe(TINY, overrides))
    assert refused.value.field == field and "\n" not in str(refused.value)
    assert "auto or ddp" in refused.value.message  # what is allowed


def test_the_suggestion_is_the_geometric_mean_of_steepest_and_valley():
    lrs = sweep(1e-7, 1e-1, 100)
    curve = RangeTest(lrs, logistic_curve(lrs, 3e-4))
    found = curve.suggestions()
    assert found["why_none"] is None and found["steepest"] and found["valley"]
    assert found["suggested"] == pytest.approx(math.sqrt(found["steepest"] * found["valley"]))
    assert min(found["steepest"], found["valley"]) <= found["suggested"] <= max(found["steepest"], found["valley"])


def noisy(n: int, level: float, seed: int) -> list[float]:
    """A loss that does not move but for batch-to-batch noise (+-5%)."""
    import random

    rng = random.Random(seed)
    return [level * (1 + rng.uniform(-0.05, 0.05)) for _ in range(n)]


@pytest.mark.parametrize("seed", range(5))
def test_a_loss_that_never_fell_suggests_nothing_and_says_why(seed):
    """Issue 20: ``--start 1e-30 --end 9.99`` sweeps 80 steps at no useful LR; its noise made a "valley" of 2.5e-18.
    A curve whose smoothed best stays above the lowest loss of its first steps has not fallen."""
    lrs = sweep(1e-30, 9.99, 100)
    losses = noisy(95, 2.0, seed) + [3.0, 9.0, 40.0, 200.0, 1e4]  # flat, then the blow-up at the top of the sweep
    found = RangeTest(lrs, losses).suggestions()
    assert found["suggested"] is None and found["steepest"] is None and found["valley"] is None
    assert "never fell" in found["why_none"]


def test_a_loss_that_rose_from_the_first_step_suggests_nothing():
    """``--start 5``: the first step's loss is the model's own, every later one above it."""
    lrs = sweep(5, 9.9, 6)
    found = RangeTest(lrs, [2.0, 40.0, 900.0, 1e4, 1e5, 1e6]).suggestions()
    assert found["suggested"] is None and "rose from the first step" in found["why_none"]
    assert RangeTest([1e-3], [math.nan]).suggestions()["why_none"] == "no finite loss"


@pytest.mark.parametrize("seed", range(5))
def test_a_real_fall_past_the_noise_is_suggested(seed):
    """The same noise on a loss that falls by a quarter, as a fine-tune's does: found, not refused as noise."""
    lrs = sweep(1e-7, 1e-1, 100)
    fall = [0.25 / (1 + math.exp(-4 * (math.log10(lr) + 3.5))) for lr in lrs]  # a quarter, around 3e-4
    losses = [n * (1.0 - f) for n, f in zip(noisy(100, 2.0, seed), fall)]
    found = RangeTest(lrs, losses).suggestions()
    assert found["why_none"] is None and 1e-5 < found["suggested"] < 1e-2
