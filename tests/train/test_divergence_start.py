"""The loss before training and the collapse rules on real runs of the shipped tiny model: the start loss the
runner records (callbacks.watch_start_loss) is the Trainer's own first loss, it reaches metrics.jsonl and the doctor,
and a model whose weights die or whose prediction turns uniform is stopped -- the shape of the issue's LR-50 run
(exactly ln 512 with grad_norm 0.0), made here on purpose, as test_runner.py poisons weights with NaN."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from finetune_helper.train import run_folder, runner
from finetune_helper.train.callbacks import resume_reference, runner_callbacks, watch_start_loss
from finetune_helper.train.divergence import PATIENCE, UNIFORM_START
from finetune_helper.train.doctor import diagnose_run
from finetune_helper.train.recipe import load_recipe

#: integration tier (make test-integration): real torch / transformers / trainer work
pytestmark = pytest.mark.integration

TINY = Path(__file__).resolve().parents[2] / "recipes" / "tiny-demo.yaml"
LN512 = math.log(512)


def quiet(_line: str) -> None:
    return None


def wired_trainer(run_dir: Path, *overrides: str, extra=()):
    """The runner's trainer for the tiny recipe with its callbacks, and the start loss watched (the runner's wiring)."""
    recipe = load_recipe(TINY, ["training.logging_steps=1", "data.max_examples=200", *overrides])
    prep, tokenizer = runner.prepare(recipe, run_dir, quiet)
    run_dir.mkdir(parents=True, exist_ok=True)
    state: dict = {}
    kwargs = dict(prep.sft_kwargs, save_strategy="no", report_to="none")
    trainer = runner.build_trainer(prep, tokenizer, kwargs, [*extra, *runner_callbacks(run_dir, quiet, state)])
    watch_start_loss(trainer, state)
    return trainer, state


class ZeroWeights:
    """Sets every weight to 0 at the end of ``steps`` (a TrainerCallback: the logits become equal, a uniform
    prediction; kept at 0, no gradient flows back either)."""

    def __new__(cls, steps):
        from transformers import TrainerCallback

        class _Zero(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kw):
                if state.global_step in steps:
                    import torch

                    with torch.no_grad():
                        for p in model.parameters():
                            p.zero_()

        return _Zero()


@pytest.mark.parametrize("setup", [["training.gradient_accumulation_steps=1"],
                                   ["training.gradient_accumulation_steps=4"],
                                   ["training.gradient_accumulation_steps=2", "method.type=lora"]],
                         ids=["one micro-batch", "four micro-batches", "lora"])
def test_the_start_loss_is_the_trainers_first_loss_and_reaches_metrics_and_resume(tmp_path, setup):
    seen = {}

    from transformers import TrainerCallback

    class AtFirstLog(TrainerCallback):
        def on_log(self, args, st, control, logs=None, **kw):
            seen.setdefault("start", state.get("start_loss"))

    trainer, state = wired_trainer(tmp_path, "training.max_steps=3", "training.per_device_train_batch_size=8", *setup,
                                   extra=[AtFirstLog()])
    trainer.train()
    first = next(r for r in trainer.state.log_history if "loss" in r)
    assert first["step"] == 1 and state["start_loss"] == pytest.approx(first["loss"], rel=1e-6)
    assert seen["start"] == state["start_loss"]  # there at the first log, where the guard needs it
    assert state["vocab_size"] == 512
    lines = [json.loads(x) for x in (tmp_path / run_folder.METRICS).read_text().splitlines()]
    assert lines[0]["step"] == 0 and lines[0]["start_loss"] == state["start_loss"]
    assert lines[0]["uniform_loss"] == pytest.approx(LN512) and "loss" not in lines[0]
    records = run_folder.read_metrics(tmp_path)
    assert records[0] == lines[0] and [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert resume_reference(tmp_path) == state["start_loss"]


def test_a_prediction_turned_uniform_stops_the_run_and_the_doctor_says_so(tmp_path):
    """Weights zeroed once at step 3: Adam moves them a little after, so the gradient norm is not exactly 0, but the
    loss stays at ln 512 -- the uniform rule (vocabulary size from the model) stops it."""
    trainer, state = wired_trainer(tmp_path, "training.max_steps=20", extra=[ZeroWeights({3})])
    trainer.train()
    d = state["diverged"]
    assert d["step"] <= 3 + PATIENCE and "uniform prediction" in d["why"] and "512" in d["why"], d
    assert trainer.state.global_step == d["step"]  # the guard stopped training there
    assert diagnose_run(tmp_path).diagnosis == "diverged"


def test_dead_weights_stop_a_run_through_the_runner(tmp_path):
    """Weights kept at 0 from step 3: loss exactly ln 512, grad_norm exactly 0.0, as the issue's LR-50 run logged.
    The old rule, against the mean of the first logs (about 10), never stopped it: the loss is below that."""
    out = tmp_path / "dead"
    with pytest.raises(runner.RunStopped) as stop:
        runner.run(TINY, ["training.max_steps=20", "training.logging_steps=1", "data.max_examples=200"],
                   output_dir=str(out), extra_callbacks=[ZeroWeights(set(range(3, 21)))], log=quiet)
    assert stop.value.code == runner.EXIT_DIVERGED and "gradient norm was exactly 0" in str(stop.value)
    records = [r for r in run_folder.read_metrics(out) if "loss" in r]
    assert records[-1]["step"] <= 3 + PATIENCE and records[-1]["loss"] == pytest.approx(LN512, rel=1e-5)
    assert records[-1]["grad_norm"] == 0.0
    assert diagnose_run(out).diagnosis == "diverged"


def test_a_run_records_its_start_loss_in_metrics(tmp_path):
    """Needs the runner to call callbacks.watch_start_loss on the trainer it builds."""
    out = tmp_path / "run"
    runner.run(TINY, ["training.max_steps=3", "training.logging_steps=1", "data.max_examples=200"],
               output_dir=str(out), log=quiet)
    records = run_folder.read_metrics(out)
    first = next(r for r in records if "loss" in r)
    assert records[0]["step"] == 0 and records[0]["start_loss"] == pytest.approx(first["loss"], rel=1e-6)
    assert records[0]["uniform_loss"] == pytest.approx(LN512)


@pytest.fixture(scope="module")
def demo_batch(tmp_path_factory):
    """A batch of the demo's training data as the runner's trainer collates it, the model's config, and the loss of
    the shipped pre-trained model on it."""
    import torch

    recipe = load_recipe(TINY, ["training.max_steps=1", "data.max_examples=64"])
    run_dir = tmp_path_factory.mktemp("batch")
    prep, tokenizer = runner.prepare(recipe, run_dir, quiet)
    kwargs = dict(prep.sft_kwargs, output_dir=str(run_dir), report_to="none")
    trainer = runner.build_trainer(prep, tokenizer, kwargs, [])
    batch = {k: v for k, v in next(iter(trainer.get_train_dataloader())).items()
             if k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        pretrained = trainer.model.eval()(**batch).loss.item()
    return batch, trainer.model.config.to_dict(), pretrained


@pytest.mark.parametrize("hidden", [128, 1024])
def test_a_model_from_scratch_starts_inside_the_uniform_band_and_the_demo_outside(demo_batch, hidden):
    """UNIFORM_START's measurement: the tiny Llama re-initialised (its own width, and 8x wider), seeds 0-4, starts
    within it of ln 512, so the uniform rule stays off for it; the pre-trained tiny model starts far outside it
    (its chat tokens are new to it), so the rule is on for the demo."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    batch, config, pretrained = demo_batch
    config = dict(config, hidden_size=hidden, intermediate_size=3 * hidden, num_attention_heads=hidden // 32,
                  num_key_value_heads=hidden // 64)
    fresh = []
    for seed in range(5):
        torch.manual_seed(seed)
        with torch.no_grad():
            fresh.append(AutoModelForCausalLM.from_config(LlamaConfig(**config)).eval()(**batch).loss.item())
    assert all(abs(x - LN512) <= UNIFORM_START * LN512 for x in fresh), fresh
    assert pretrained > (1 + UNIFORM_START) * LN512, pretrained
