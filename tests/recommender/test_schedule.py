"""finetune_helper/schedule.py against the real thing: torch schedulers from ``transformers.get_scheduler``,
``TrainingArguments.get_warmup_steps``, and the ``learning_rate`` a real ``Trainer`` run logs."""

from __future__ import annotations

import ast
import math
import pathlib
import subprocess
import sys

import pytest

from finetune_helper.recommender import schedule
from finetune_helper.errors import FinetuneHelperError
from finetune_helper.recommender.schedule import (
    SCHEDULERS, logged_lr, logged_schedule_points, lr_at, schedule_points, warmup_steps_for,
)

#: integration tier (make test-integration): real torch / transformers / trainer / server work
pytestmark = pytest.mark.integration

REL = 1e-12

#: (total_steps, warmup_steps): no warmup, ordinary, warmup == total, warmup > total, single-step runs
CASES = [(10, 0), (10, 3), (10, 10), (5, 8), (1, 0), (1, 1), (7, 2), (100, 7), (250, 1)]


#: the ``lr_scheduler_kwargs`` a scheduler needs (as the planner writes them; one-cycle's rates)
OPTIONS = {"cosine_with_min_lr": {"min_lr_rate": 0.1}, "warmup_stable_decay": {"num_decay_steps": 2},
           "cosine_warmup_with_min_lr": {"warmup_lr_rate": 1 / 25, "min_lr_rate": 1 / 250_000},
           "step_decay": {"milestones": [0.5, 0.75], "gamma": 0.1}}
#: the schedulers transformers builds (step decay is the runner's LambdaLR: test_step_decay_is_the_he_et_al_steps)
TRANSFORMERS = tuple(name for name in SCHEDULERS if name != "step_decay")


def _real_curve(name: str, peak: float, total: int, warmup: int, n_steps: int,
                options: dict | None = None) -> list[tuple[float, float]]:
    """(scheduler.get_last_lr()[0], optimizer lr) in force at optimizer steps 0 .. n_steps-1, as the Trainer steps
    them (optimizer.step() then lr_scheduler.step()); built as ``Trainer.create_scheduler`` builds it."""
    import torch
    from transformers import get_scheduler

    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=peak)
    sched = get_scheduler(name, optimizer=opt, num_warmup_steps=warmup, num_training_steps=total,
                          scheduler_specific_kwargs=options or {})
    out = []
    for _ in range(n_steps):
        out.append((sched.get_last_lr()[0], opt.param_groups[0]["lr"]))
        opt.step()
        sched.step()
    return out


# ------------------------------------------------------------------------------------ 1. lr_at vs get_scheduler

@pytest.mark.parametrize("name", TRANSFORMERS)
@pytest.mark.parametrize("total,warmup", CASES)
@pytest.mark.parametrize("peak", [3e-4, 1.0])
def test_lr_at_matches_transformers_get_scheduler(name, total, warmup, peak):
    options = OPTIONS.get(name)
    if name == "warmup_stable_decay" and warmup + 2 > total:
        options = {"num_decay_steps": max(0, total - warmup)}  # (transformers needs a stable phase >= 0)
    real = _real_curve(name, peak, total, warmup, total + 2, options)  # two steps past the end too
    for step, (last_lr, group_lr) in enumerate(real):
        mine = lr_at(step, peak, total, warmup, name, options)
        assert mine == pytest.approx(last_lr, rel=REL, abs=0.0), (name, total, warmup, step)
        assert mine == pytest.approx(group_lr, rel=REL, abs=0.0), (name, total, warmup, step)


def test_lr_at_shape():
    # warmup rises from 0, peaks on the first step after warmup; linear ends one step above 0, cosine likewise
    assert lr_at(0, 1e-3, 100, 10, "linear") == 0.0
    assert lr_at(10, 1e-3, 100, 10, "linear") == 1e-3
    assert lr_at(10, 1e-3, 100, 10, "cosine") == 1e-3
    assert lr_at(99, 1e-3, 100, 10, "linear") == pytest.approx(1e-3 / 90)
    assert lr_at(0, 1e-3, 100, 10, "constant") == 1e-3  # "constant" ignores warmup, as transformers does


# ------------------------------------------------------------------------------------ 2. warmup_steps_for

def test_warmup_steps_for_matches_training_arguments(tmp_path):
    from transformers import TrainingArguments

    totals = [0, 1, 3, 7, 12, 99, 100, 101, 333, 1000, 12345]
    # ratios (incl. 0.07 and 0.1, where total * ratio lands just above an integer: ceil of 100 * 0.07 is 8),
    # step counts as int and float (2.7 -> 2, as int() truncates)
    for warmup in [0, 0.0, 0.01, 0.03, 0.05, 0.07, 0.1, 0.25, 0.5, 0.999, 1, 1.0, 2.7, 5, 100, 5000]:
        args = TrainingArguments(output_dir=str(tmp_path), warmup_steps=warmup, use_cpu=True, report_to=[])
        for total in totals:
            assert warmup_steps_for(warmup, total) == args.get_warmup_steps(total), (warmup, total)
    assert warmup_steps_for(0.07, 100) == 8
    assert warmup_steps_for(0.03, 100) == 3 and warmup_steps_for(0.03, 101) == 4


@pytest.mark.parametrize("bad", [-1, -0.1, float("nan"), float("inf"), "0.1", None, True])
def test_warmup_steps_for_rejects(bad):
    with pytest.raises(FinetuneHelperError) as e:
        warmup_steps_for(bad, 100)
    assert e.value.field == "warmup_steps"


# ------------------------------------------------------------------------------------ 3. a real Trainer run

def _tiny_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


class _RandomTokens:
    """A map-style dataset of {input_ids, labels} dicts of random token ids."""

    def __init__(self, n: int, seq: int = 16) -> None:
        import torch

        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, 128, (n, seq), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


@pytest.mark.parametrize("name,warmup,accum", [
    ("linear", 0.25, 1),
    ("cosine", 0.25, 1),
    ("linear", 0.1, 2),     # ceil(12 * 0.1) = 2 warmup steps; global_step counts optimizer steps, not batches
    ("constant_with_warmup", 3, 1),
])
def test_logged_lr_matches_a_real_trainer_run(tmp_path, name, warmup, accum):
    from transformers import Trainer, TrainingArguments

    peak, total = 1e-3, 12
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=total, logging_steps=1,
        warmup_steps=warmup, lr_scheduler_type=name, learning_rate=peak, per_device_train_batch_size=2,
        gradient_accumulation_steps=accum, save_strategy="no", disable_tqdm=True, seed=0,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=_tiny_model(), args=args, train_dataset=_RandomTokens(64))
    trainer.train()

    w = warmup_steps_for(warmup, total)
    assert w == args.get_warmup_steps(total)
    logs = [h for h in trainer.state.log_history if "learning_rate" in h]
    assert [h["step"] for h in logs] == list(range(1, total + 1))
    for h in logs:
        assert h["learning_rate"] == pytest.approx(logged_lr(h["step"], peak, total, w, name), rel=REL, abs=0.0), h
    # ... and they lie on the planned curve drawn in log coordinates
    planned = dict(logged_schedule_points(peak, total, w, name))
    assert {h["step"]: h["learning_rate"] for h in logs} == pytest.approx(planned, rel=REL, abs=0.0)
    # the first log is the first update's LR (0 under warmup), not the second one's
    assert logs[0]["learning_rate"] == (0.0 if w else peak)


def test_step_decay_is_the_he_et_al_steps():
    """The runner's own schedule, against the numbers it stands for: a linear warmup to the peak, the peak until
    half the run, a tenth of it until three quarters, a hundredth to the end."""
    total, warmup, peak = 40, 4, 1e-3
    options = OPTIONS["step_decay"]
    expected = [peak * s / warmup for s in range(warmup)] + [peak] * 16 + [peak / 10] * 10 + [peak / 100] * 10
    assert [lr_at(s, peak, total, warmup, "step_decay", options) for s in range(total)] == pytest.approx(
        expected, rel=1e-12)


def test_logged_lr_is_the_lr_of_the_step_just_taken():
    for s in range(1, 13):
        assert logged_lr(s, 1e-3, 12, 3, "cosine") == lr_at(s - 1, 1e-3, 12, 3, "cosine")
        assert logged_lr(s, 1e-3, 12, 3, "cosine", logged_after_scheduler_step=True) == lr_at(s, 1e-3, 12, 3,
                                                                                               "cosine")
    with pytest.raises(FinetuneHelperError) as e:
        logged_lr(0, 1e-3, 12, 3)
    assert e.value.field == "global_step"


# ------------------------------------------------------------------------------------ 4. plot points, errors

@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("total,warmup", [(10_000, 300), (10_000, 0), (1000, 1000), (1000, 1500), (5000, 1),
                                          (401, 17), (100_003, 3001)])
def test_schedule_points_subsample_keeps_corners(name, total, warmup):
    options = {"num_decay_steps": max(0, (total - warmup) // 5)} if name == "warmup_stable_decay" else \
        OPTIONS.get(name)
    pts = schedule_points(2e-4, total, warmup, name, max_points=400, options=options)
    steps = [s for s, _ in pts]
    assert len(pts) <= 400
    assert steps == sorted(set(steps))
    assert steps[0] == 0 and steps[-1] == total - 1
    for corner in (warmup - 1, warmup):
        if 0 <= corner < total:
            assert corner in steps
    gaps = [b - a for a, b in zip(steps, steps[1:])]
    assert max(gaps) <= 2 * math.ceil(total / 380)  # evenly spread, no holes
    for s, lr in pts:
        assert lr == lr_at(s, 2e-4, total, warmup, name, options)
    assert logged_schedule_points(2e-4, total, warmup, name, options=options) == [(s + 1, lr) for s, lr in pts]


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_schedule_points_are_the_real_schedule(name):
    total, warmup, peak = 1000, 30, 5e-5
    options = {"num_decay_steps": 200} if name == "warmup_stable_decay" else OPTIONS.get(name)
    real = _real_curve(name, peak, total, warmup, total, options)
    pts = schedule_points(peak, total, warmup, name, max_points=50, options=options)
    assert {29, 30} <= {s for s, _ in pts}
    for s, lr in pts:
        assert lr == pytest.approx(real[s][0], rel=REL, abs=0.0)


def test_schedule_points_every_step_when_short():
    pts = schedule_points(1e-3, 12, 3, "linear")
    assert [s for s, _ in pts] == list(range(12))
    assert [lr for _, lr in pts] == [lr_at(s, 1e-3, 12, 3, "linear") for s in range(12)]
    assert len(schedule_points(1e-3, 400, 3, max_points=400)) == 400
    assert len(schedule_points(1e-3, 1, 1)) == 1


def test_unknown_scheduler_is_a_finetune_helper_error():
    for call in (lambda: lr_at(0, 1e-3, 10, 1, "polynomial"),
                 lambda: schedule_points(1e-3, 10, 1, "cosine_with_restarts"),
                 lambda: logged_lr(1, 1e-3, 10, 1, "Linear")):
        with pytest.raises(FinetuneHelperError) as e:
            call()
        assert e.value.field == "lr_scheduler_type"
        assert "\n" not in e.value.message
        for allowed in SCHEDULERS:
            assert allowed in e.value.message
        assert str(e.value).startswith("lr_scheduler_type: ")


@pytest.mark.parametrize("call,field", [
    (lambda: lr_at(-1, 1e-3, 10, 1), "step"),
    (lambda: lr_at(0, 1e-3, 0, 0), "max_steps"),
    (lambda: lr_at(0, 1e-3, 10, 0.1), "warmup_steps"),
    (lambda: schedule_points(1e-3, 10, -1), "warmup_steps"),
    (lambda: schedule_points(1e-3, 10, 1, max_points=3), "max_points"),
])
def test_bad_arguments_name_their_field(call, field):
    with pytest.raises(FinetuneHelperError) as e:
        call()
    assert e.value.field == field


def test_module_is_pure_python():
    tree = ast.parse(pathlib.Path(schedule.__file__).read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(("." * node.level) + (node.module or ""))
    assert imported <= {"__future__", "math", "..errors"}, imported
    code = ("import sys, finetune_helper.recommender.schedule as s; s.schedule_points(1e-3, 1000, 30, 'cosine'); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
