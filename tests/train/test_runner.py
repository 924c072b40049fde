"""Real fine-tunes of the tiny offline model through `finetune-helper run`: full, LoRA, every data format, the
out-of-memory back-off, the divergence stop, interrupt and resume. No mocks: the Trainer, PEFT and TRL run."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import yaml

from finetune_helper import cli
from finetune_helper.train.run_folder import RECIPE_HEADER
from finetune_helper.train.runner import EXIT_DIVERGED, EXIT_INTERRUPTED, RunStopped, last_checkpoint, run

#: integration tier (make test-integration): real torch / transformers / trainer / server work
pytestmark = pytest.mark.integration

TINY = Path(__file__).resolve().parents[2] / "recipes" / "tiny-demo.yaml"
QUIET = {"log": lambda _: None}


def steps(n: int, *more: str) -> list[str]:
    return [f"training.max_steps={n}", "training.logging_steps=1", *more]


def test_full_run_writes_a_complete_run_folder(tmp_path):
    out = tmp_path / "run"
    result = run(TINY, steps(12, "training.save_steps=6", "data.max_examples=400"), output_dir=str(out), **QUIET)
    s = result.summary
    assert result.exit_code == 0 and s["status"] == "done" and s["global_step"] == 12
    for name in ("recipe.yaml", "plan.json", "training_args.json", "metrics.jsonl", "summary.json"):
        assert (out / name).is_file(), name
    assert (out / "final" / "model.safetensors").is_file() and (out / "final" / "tokenizer.json").is_file()
    assert (out / "checkpoint-6" / "model.safetensors").is_file()
    plan = json.loads((out / "plan.json").read_text())
    assert plan["overrides"]["max_steps"] == 12 and plan["reasons"]["learning_rate"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x][:3] == [1, 2, 3]
    assert all(math.isfinite(x["loss"]) for x in lines if "loss" in x)
    assert s["tokens_per_second"] > 0 and s["train_loss_last"] < s["train_loss_first"]
    # the measured rate per GPU and per step agree with the callback's own clock (metrics.jsonl's elapsed time at
    # the last step: train() also evaluates and saves, so its wall time per step is no shorter)
    last = [x for x in lines if x.get("step") == 12 and "time" in x][-1]
    assert s["tokens_per_second_per_gpu"] == s["tokens_per_second"]  # one process
    assert 0.5 * last["time"] / 12 <= s["seconds_per_step"] <= 3 * last["time"] / 12
    assert "predicted" not in s  # on the CPU: the prediction describes the plan's GPU, not this machine
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "final")  # the saved model reloads


def test_lora_run_saves_an_adapter(tmp_path):
    out = tmp_path / "lora"
    result = run(TINY, steps(6, "method.type=lora", "method.lora_r=8", "data.max_examples=200"), output_dir=str(out),
                 **QUIET)
    assert result.exit_code == 0
    assert (out / "final" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "final" / "adapter_config.json").read_text())["r"] == 8


@pytest.mark.parametrize("fmt", ["alpaca", "sharegpt", "messages", "prompt_completion", "text"])
def test_each_data_format_trains(fmt, tmp_path):
    from finetune_helper.train.tiny import synthetic_dataset, write_dataset

    data = write_dataset(tmp_path / f"{fmt}.jsonl", synthetic_dataset(120, fmt=fmt))
    out = tmp_path / "run"
    result = run(TINY, steps(3, f"data.path={data}", "data.eval_fraction=0.1"), output_dir=str(out), **QUIET)
    assert result.exit_code == 0 and result.summary["global_step"] == 3
    plan = json.loads((out / "plan.json").read_text())
    assert plan["data_format"] == fmt
    args = json.loads((out / "training_args.json").read_text())
    if fmt == "text":
        assert args["dataset_text_field"] == "text"
    else:  # answers only: completion-only or assistant-only loss
        assert args.get("completion_only_loss") or args.get("assistant_only_loss")


class RaiseOOMOnce:
    """Raises the real torch.OutOfMemoryError once, at a given step: drives the back-off code path on CPU."""

    def __init__(self, at_step: int):
        from transformers import TrainerCallback

        self.at_step, self.fired = at_step, False
        outer = self

        class _CB(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if not outer.fired and state.global_step == outer.at_step:
                    outer.fired = True
                    import torch

                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (test)")

        self.callback = _CB()


def test_out_of_memory_halves_batch_and_continues(tmp_path):
    out = tmp_path / "oom"
    oom = RaiseOOMOnce(at_step=5)
    result = run(TINY, steps(8, "training.save_steps=4", "training.per_device_train_batch_size=8",
                             "training.gradient_accumulation_steps=2", "data.max_examples=400"),
                 output_dir=str(out), extra_callbacks=[oom.callback], **QUIET)
    assert oom.fired and result.exit_code == 0 and result.summary["global_step"] == 8
    (event,) = result.summary["oom_backoffs"]
    assert event["per_device_train_batch_size"] == [8, 4] and event["gradient_accumulation_steps"] == [2, 4]
    assert event["resumed_from"] == "checkpoint-4"


def test_divergence_stops_with_advice_and_keeps_last_good_checkpoint(tmp_path, capsys):
    from transformers import TrainerCallback

    class PoisonWeights(TrainerCallback):
        """At step 5 the weights become NaN, as after an overflow: the next loss is NaN."""

        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step == 5:
                import torch

                with torch.no_grad():
                    for p in model.parameters():
                        p.fill_(float("nan"))

    out = tmp_path / "nan"
    with pytest.raises(RunStopped) as stop:
        run(TINY, steps(20, "training.save_steps=4", "data.max_examples=300"), output_dir=str(out),
            extra_callbacks=[PoisonWeights()], **QUIET)
    assert stop.value.code == EXIT_DIVERGED
    assert "too high" in str(stop.value) and "checkpoint-4" in str(stop.value)
    assert last_checkpoint(out).name == "checkpoint-4"  # nothing saved after the weights went bad
    assert json.loads((out / "summary.json").read_text())["status"] == "diverged"


def test_too_high_learning_rate_exits_3_from_the_cli(tmp_path, capsys):
    code = cli.main(["run", str(TINY), "--output-dir", str(tmp_path / "hot"), *steps(30),
                     "training.learning_rate=50.0", "training.warmup_steps=0", "data.max_examples=300"])
    err = capsys.readouterr().err
    assert code == EXIT_DIVERGED and "learning rate 50 is likely too high: try 5" in err


def test_interrupt_saves_and_resume_reaches_the_same_final_step(tmp_path):
    from transformers import TrainerCallback

    class SigtermAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 4:
                os.kill(os.getpid(), signal.SIGTERM)

    out = tmp_path / "int"
    with pytest.raises(RunStopped) as stop:
        run(TINY, steps(10, "training.save_steps=100", "data.max_examples=300"), output_dir=str(out),
            extra_callbacks=[SigtermAt()], **QUIET)
    assert stop.value.code == EXIT_INTERRUPTED and last_checkpoint(out).name == "checkpoint-4"
    with pytest.raises(Exception, match="already holds a run"):  # nothing is overwritten by accident
        run(TINY, steps(10, "data.max_examples=300"), output_dir=str(out), **QUIET)
    result = run(TINY, steps(10, "training.save_steps=100", "data.max_examples=300"), output_dir=str(out),
                 resume=True, **QUIET)
    assert result.exit_code == 0 and result.summary["global_step"] == 10


def test_qlora_run_quantizes_the_base_with_bitsandbytes(tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "qlora"
    result = run(TINY, steps(4, "method.type=qlora", "method.lora_r=8", "data.max_examples=200"), output_dir=str(out),
                 **QUIET)
    assert result.exit_code == 0 and (out / "final" / "adapter_model.safetensors").is_file()


def test_packing_runs_padding_free(tmp_path):
    out = tmp_path / "packed"
    result = run(TINY, steps(3, "data.packing=true", "data.max_examples=200"), output_dir=str(out), **QUIET)
    assert result.exit_code == 0
    args = json.loads((out / "training_args.json").read_text())
    assert args["packing"] is True and args["padding_free"] is True


@pytest.mark.slow
def test_tiny_demo_learns_the_task(tmp_path):
    """The whole embedded demo, as `make demo` runs it: a fine-tune of the shipped base at the planner's LR.

    Measured over seeds 0-4 x 1 and 2 torch threads (benchmarks/demo_seeds.py, README): exact match after
    85.5 % to 100 % (median 100 %), before 0.0 %; last logged loss 0.005 to 0.082 against ~9 at the start.  The
    bars leave a wide margin for other CPUs' float rounding."""
    result = run(TINY, [], output_dir=str(tmp_path / "demo"), **QUIET)
    s = result.summary
    assert s["status"] == "done" and s["train_loss_last"] < 0.05 * s["train_loss_first"]
    assert s["exact_match_before"] <= 0.05 and s["exact_match_after"] >= 0.5
    plan = json.loads((tmp_path / "demo" / "plan.json").read_text())
    assert "width 4096/128" in plan["reasons"]["learning_rate"]  # the planner's rule chose the rate, not a bound
    assert plan["learning_rate"] == pytest.approx(2e-5 * 4096 / 128)


@pytest.mark.parametrize("override,field", [
    ("training.max_steps=abc", "training.max_steps"),
    ("training.per_device_train_batch_size=0", "training.per_device_train_batch_size"),
    ("training.output_dir=/tmp/elsewhere", "training.output_dir"),
    ("training.optim=bogus", "training"),
    ("data.max_length=4", "data.max_length"),
    ("hardware.gpu=H1000", "hardware.gpu"),
])
def test_bad_training_values_are_one_line_errors_before_anything_is_written(override, field, tmp_path, capsys):
    out = tmp_path / "bad"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run", str(TINY), "--output-dir", str(out), "training.max_steps=3", override])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"finetune-helper: error: {field}"), err
    if field != "data.max_length":  # that one is only known once TRL has tokenized the data
        assert not (out / "plan.json").exists()


def test_resume_refuses_a_different_recipe_and_keeps_the_run_files(tmp_path):
    from finetune_helper.errors import FinetuneHelperError

    out = tmp_path / "run"
    run(TINY, steps(4, "training.save_steps=2", "data.max_examples=200"), output_dir=str(out), **QUIET)
    before = (out / "plan.json").read_text()
    with pytest.raises(FinetuneHelperError) as err:
        run(TINY, steps(6, "training.save_steps=2", "data.max_examples=200", "method.type=lora"), output_dir=str(out),
            resume=True, **QUIET)
    assert err.value.field == "method.type"
    assert (out / "plan.json").read_text() == before and last_checkpoint(out).name == "checkpoint-4"
    longer = run(TINY, steps(6, "training.save_steps=2", "data.max_examples=200"), output_dir=str(out), resume=True,
                 **QUIET)
    assert longer.summary["global_step"] == 6  # only the training length may change on resume


@pytest.mark.parametrize("method,training,dtype", [
    ("method.type=full", "training.bf16=true", "float32"),            # mixed precision: fp32 masters
    ("method.weights_dtype=bf16", "training.bf16=true", "bfloat16"),  # pure bf16
    ("method.type=lora", "training.bf16=true", "bfloat16"),           # a LoRA base in the compute dtype
    ("method.type=full", "training.seed=0", "float32"),               # the CPU's fp32 run
])
def test_the_runner_loads_the_model_its_estimate_describes(tmp_path, method, training, dtype):
    """The seam: _load_model reads run_setup, the setup plan.json's run estimate is made from."""
    from finetune_helper.train import runner
    from finetune_helper.train.recipe import load_recipe

    extra = ["method.type=full"] if method.startswith("method.weights") else []
    recipe = load_recipe(TINY, [*extra, method, training, "training.max_steps=1"])
    prep, tokenizer = runner.prepare(recipe, tmp_path / "run", **QUIET)
    setup = runner.run_setup(prep, prep.sft_kwargs)
    model = runner.load_model(prep, prep.sft_kwargs)
    base = [p for n, p in model.named_parameters() if "lora" not in n]
    assert {str(p.dtype) for p in base} == {f"torch.{dtype}"} and setup.load_dtype == {"float32": "fp32",
                                                                                        "bfloat16": "bf16"}[dtype]
    runner.write_run_files(prep)
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan["run"]["setup"]["device"] == "cpu" and plan["run"]["estimate"]["allocated_peak_bytes"] > 0
    assert plan["run"]["setup"]["micro_batch_size"] == prep.sft_kwargs["per_device_train_batch_size"]


def _cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage, why", [
    (lambda c: (c / "trainer_state.json").unlink(), "incomplete (trainer_state.json"),
    (lambda c: _cut(c / "model.safetensors"), "model.safetensors is shorter than its header says"),
    (lambda c: _cut(c / "optimizer.pt"), "optimizer.pt is not a readable torch archive"),
    (lambda c: (c / "trainer_state.json").write_text("[]"), "trainer_state.json is not the Trainer's state"),
], ids=["cut-short", "truncated-weights", "truncated-optimizer", "state-not-an-object"])
def test_resume_falls_back_past_an_incomplete_or_damaged_checkpoint_and_says_so(tmp_path, damage, why):
    """The Trainer writes trainer_state.json last: a save cut short (SIGKILL, a second Stop, a full disk) leaves a
    checkpoint without it, and a full disk or a copy cut short leaves files that do not open: resume passes over
    either for the last complete one, naming it."""
    out = tmp_path / "run"
    run(TINY, steps(4, "training.save_steps=2", "data.max_examples=200"), output_dir=str(out), **QUIET)
    damage(out / "checkpoint-4")
    assert last_checkpoint(out).name == "checkpoint-2"
    lines: list[str] = []
    result = run(TINY, steps(6, "training.save_steps=2", "data.max_examples=200"), output_dir=str(out), resume=True,
                 log=lines.append)
    assert result.exit_code == 0 and result.summary["global_step"] == 6
    assert any(line.startswith("checkpoint-4 is") and why in line and "from checkpoint-2" in line
               for line in lines), lines
    assert last_checkpoint(out).name == "checkpoint-6"


def test_resume_with_no_complete_checkpoint_is_one_line_naming_the_broken_one(tmp_path):
    from finetune_helper.errors import FinetuneHelperError

    out = tmp_path / "run"
    run(TINY, steps(2, "training.save_steps=2", "data.max_examples=200"), output_dir=str(out), **QUIET)
    (out / "checkpoint-2" / "scheduler.pt").unlink()
    with pytest.raises(FinetuneHelperError, match="no complete checkpoint .*checkpoint-2: no scheduler state"):
        run(TINY, steps(4, "data.max_examples=200"), output_dir=str(out), resume=True, **QUIET)
    with pytest.raises(FinetuneHelperError, match="already holds a run"):  # and it is not overwritten
        run(TINY, steps(4, "data.max_examples=200"), output_dir=str(out), **QUIET)


def test_the_recipes_seed_reaches_the_trainer(tmp_path):
    out = tmp_path / "dry"
    run(TINY, ["seed=7"], output_dir=str(out), dry_run=True, **QUIET)
    assert json.loads((out / "training_args.json").read_text())["seed"] == 7


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under ``folder`` with its modification time and bytes."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_dry_runs_and_refused_runs_never_rewrite_a_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["run", str(TINY), "--output-dir", str(out), *steps(2, "training.save_steps=2",
                                                                         "data.max_examples=100")]) == 0
    assert json.loads((out / "exit.json").read_text())["returncode"] == 0
    before = snapshot(out)
    for argv in (["--dry-run"], ["--dry-run", "method.type=lora"], [], ["training.max_steps=9"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["run", str(TINY), "--output-dir", str(out), *argv])
        assert exit_info.value.code == 2
        assert "holds a run" in capsys.readouterr().err
    assert snapshot(out) == before  # recipe.yaml, plan.json, training_args.json, exit.json: untouched


def test_a_users_own_recipe_is_never_written_over(tmp_path, capsys, monkeypatch):
    mine = tmp_path / "recipe.yaml"
    mine.write_text("# my notes\n" + TINY.read_text())
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run", "recipe.yaml", "--output-dir", ".", "--dry-run"])
    assert exit_info.value.code == 2 and "not a recipe.yaml a run wrote" in capsys.readouterr().err
    assert mine.read_text().startswith("# my notes") and not (tmp_path / "plan.json").exists()
    assert not (tmp_path / "exit.json").exists()


def test_resume_of_a_finished_run_says_so_and_changes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    run(TINY, steps(4, "training.save_steps=2", "data.max_examples=100"), output_dir=str(out), **QUIET)
    before = snapshot(out)
    assert cli.main(["resume", str(out)]) == 0
    assert "finished already" in capsys.readouterr().out
    assert snapshot(out) == before


def test_resume_command_continues_with_the_saved_arguments_after_an_oom_back_off(tmp_path, capsys):
    """``finetune-helper resume RUN_DIR``: nothing re-typed; the back-off's batch and accumulation, not a new plan."""
    out = tmp_path / "run"
    oom = RaiseOOMOnce(at_step=3)

    class SigtermAt:
        def __init__(self):
            from transformers import TrainerCallback

            class _CB(TrainerCallback):
                def on_step_end(self, args, state, control, **kw):
                    if state.global_step == 5:
                        os.kill(os.getpid(), signal.SIGTERM)

            self.callback = _CB()

    with pytest.raises(RunStopped):
        run(TINY, steps(8, "training.save_steps=2", "training.per_device_train_batch_size=8",
                        "training.gradient_accumulation_steps=2", "data.max_examples=300"),
            output_dir=str(out), extra_callbacks=[oom.callback, SigtermAt().callback], **QUIET)
    args = json.loads((out / "training_args.json").read_text())
    assert (args["per_device_train_batch_size"], args["gradient_accumulation_steps"]) == (4, 4)
    assert cli.main(["resume", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "per-device batch 4 x accumulation 4" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "done" and summary["global_step"] == 8
    assert json.loads((out / "exit.json").read_text())["returncode"] == 0


def test_a_misspelt_lora_target_is_an_error_even_when_another_matches(tmp_path):
    from finetune_helper.errors import FinetuneHelperError

    with pytest.raises(FinetuneHelperError) as err:
        run(TINY, ["method.type=lora", "method.target_modules=[q_projj, v_proj]"], output_dir=str(tmp_path / "r"),
            dry_run=True, **QUIET)
    assert err.value.field == "method.target_modules" and "q_projj" in err.value.message
    assert not (tmp_path / "r").exists()


def test_training_takes_sft_config_fields(tmp_path):
    out = tmp_path / "dry"
    run(TINY, ["training.dataset_num_proc=1", "training.loss_type=nll"], output_dir=str(out), dry_run=True, **QUIET)
    args = json.loads((out / "training_args.json").read_text())
    assert args["dataset_num_proc"] == 1 and args["loss_type"] == "nll"


#: bad recipes that ``run --dry-run`` refuses: ``validate`` must refuse each for the same field
VALIDATE_EQUALS_RUN = [
    (["training.num_train_epochs=.inf"], "training.num_train_epochs"),
    (["recommend.epochs=.nan"], "recommend.epochs"),
    (["method.type=lora", "method.lora_alpha=-3"], "method.lora_alpha"),
    (["data.max_length=1000000000"], "data.max_length"),
    (["training.optim=adamw_foo"], "training.optim"),
    (["training.lr_scheduler_type=cosinus"], "training.lr_scheduler_type"),
    (["training.lr_scheduler_type=zigzag"], "training.lr_scheduler_type"),
    (["method.type=lora", "method.target_modules=[q_projj, v_proj]"], "method.target_modules"),
    (["data.path=/etc/hostname"], "data.path"),
    (["data.split=test"], "data.split"),
    (["training.max_length=64"], "training.max_length"),
    (["training.loss_typ=nll"], "training.loss_typ"),
]


@pytest.mark.parametrize("overrides, field", VALIDATE_EQUALS_RUN, ids=[o[-1] for o, _ in VALIDATE_EQUALS_RUN])
def test_validate_refuses_what_run_refuses(overrides, field, tmp_path, capsys):
    for command in (["validate", str(TINY)], ["run", str(TINY), "--dry-run", "--output-dir", str(tmp_path / "r")]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([*command, *overrides])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1, (command, err)
        assert err[0].startswith(f"finetune-helper: error: {field}:"), (command, err)
        if field in ("training.optim", "training.lr_scheduler_type"):  # the allowed values, named
            assert "choose from" in err[0] and ("adamw_torch" in err[0] or "cosine_with_min_lr" in err[0]), err
    assert not (tmp_path / "r").exists()


def test_an_unwritable_run_folder_and_eval_without_held_out_data_are_field_errors(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cases = [(["--output-dir", str(blocker / "run")], "--output-dir: cannot write in"),
             (["--output-dir", str(tmp_path / "ev"), "data.eval_fraction=0", "training.eval_strategy=steps"],
              "training.eval_strategy:")]
    for argv, needle in cases:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["run", str(TINY), "training.max_steps=2", *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and needle in err[0], err


def test_a_run_killed_with_sigkill_resumes_from_its_folder(tmp_path, capsys):
    """A real `finetune-helper run` process killed with SIGKILL (no handler runs, a save may be cut short) continues
    with `finetune-helper resume RUN_DIR` (the command, in this process) to its final step."""
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "finetune_helper", "run", str(TINY), "--output-dir", str(out),
           *steps(400, "training.save_steps=2", "data.max_examples=300")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoint-6").exists():
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert (out / "checkpoint-6").exists() and not (out / "summary.json").exists()
    end = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")) + 4
    code = cli.main(["resume", str(out), f"training.max_steps={end}"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text())["global_step"] == end


def test_two_processes_train_data_parallel_write_the_folder_once_and_resume(two_process_runs):
    """`run --gpus 2` on a machine without CUDA: torchrun starts two CPU processes (gloo), the same launch path as
    on GPUs. Both train (the plan's effective batch counts both), rank 0 alone writes, and resume continues it.
    The first run is the session's "ddp" of ``two_process_runs`` (tests/train/conftest.py: ``run --gpus 2``, 4 steps
    logged every step, saved every 2, 300 examples), launched beside another; this test alone resumes it."""
    import subprocess
    import sys

    first = two_process_runs["ddp"]
    out = first["run_dir"]
    assert first["returncode"] == 0, first["stderr"][-2000:]
    assert "launching 2 processes" in first["stdout"] and first["stdout"].count("run: done at step 4/4") == 1
    plan = json.loads((out / "plan.json").read_text())
    args = json.loads((out / "training_args.json").read_text())
    assert plan["gpus"] == 2 and plan["distributed"] == "ddp"
    assert args["per_device_train_batch_size"] * args["gradient_accumulation_steps"] * 2 == plan["effective_batch_size"]
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["train_batch_size"] == args["per_device_train_batch_size"]
    steps_logged = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
                    if "loss" in json.loads(x)]
    assert steps_logged == [1, 2, 3, 4]  # one writer
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["global_step"] == 4
    assert json.loads((out / "exit.json").read_text())["returncode"] == 0
    again = subprocess.run([sys.executable, "-m", "finetune_helper", "resume", str(out), "--main-port", "29532",
                            "training.max_steps=6"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "launching 2 processes" in again.stdout
    assert json.loads((out / "summary.json").read_text())["global_step"] == 6


@pytest.mark.parametrize("visible, expected", [(None, "0"), ("1", "1")])
def test_a_one_gpu_run_is_pinned_to_one_gpu(tmp_path, monkeypatch, capsys, visible, expected):
    """Without a launcher a one-GPU run sees one GPU (CUDA_VISIBLE_DEVICES=0 unless the user chose one), so the
    Trainer never takes a multi-GPU node's every GPU (n_gpu > 1, which SFTTrainer refuses).  The command runs in this
    process, in an environment without the variable or with the user's choice (monkeypatch restores it after)."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    if visible is not None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    out = tmp_path / "dry"
    code = cli.main(["run", str(TINY), "--dry-run", "--output-dir", str(out)])
    assert code == 0, capsys.readouterr().err
    assert json.loads((out / "plan.json").read_text())["cuda_visible_devices"] == expected


class MemoryLimit:
    """A simulated GPU memory limit: the real torch.OutOfMemoryError at the end of any step whose configuration
    is over it (``fits(args)`` False), as a CUDA step over the limit would raise; or while the trainer loads."""

    def __init__(self, fits, *, at_load: bool = False):
        from transformers import TrainerCallback

        outer = self
        self.raised = 0

        class _CB(TrainerCallback):
            def on_init_end(self, args, state, control, **kw):
                if at_load:
                    import torch

                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")

            def on_step_end(self, args, state, control, **kw):
                if not fits(args):
                    import torch

                    outer.raised += 1
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")

        self.callback = _CB()


def _checkpointing(args) -> bool:
    return bool(getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False))


def test_out_of_memory_climbs_the_planners_ladder_keeping_the_effective_batch(tmp_path):
    out = tmp_path / "ladder"
    limit = MemoryLimit(lambda args: _checkpointing(args))  # nothing fits without checkpointing
    result = run(TINY, steps(6, "training.save_steps=2", "training.per_device_train_batch_size=8",
                             "training.gradient_accumulation_steps=2", "data.max_examples=300"),
                 output_dir=str(out), extra_callbacks=[limit.callback], **QUIET)
    assert result.exit_code == 0 and result.summary["global_step"] == 6
    events = result.summary["oom_backoffs"]
    assert [e.get("per_device_train_batch_size") for e in events[:3]] == [[8, 4], [4, 2], [2, 1]]
    assert events[3]["gradient_checkpointing"] == [False, True] and len(events) == 4
    args = json.loads((out / "training_args.json").read_text())  # what ran last, and what a resume continues
    assert args["per_device_train_batch_size"] * args["gradient_accumulation_steps"] == 16
    assert args.get("activation_checkpointing", args.get("gradient_checkpointing")) is True
    from finetune_helper.train.runner import format_summary  # what `run` prints at the end, every rung included

    printed = format_summary(result.summary)
    assert "per_device_train_batch_size 2 -> 1" in printed and "gradient_checkpointing False -> True" in printed


def test_out_of_memory_with_no_rung_left_exits_4_from_the_cli(tmp_path, capsys):
    from finetune_helper.train import runner

    limit = MemoryLimit(lambda args: False)
    with pytest.raises(RunStopped) as stop:
        runner.run(TINY, steps(6, "training.save_steps=2", "training.per_device_train_batch_size=2",
                               "data.max_examples=200"), output_dir=str(tmp_path / "r"),
                   extra_callbacks=[limit.callback], **QUIET)
    assert stop.value.code == runner.EXIT_OOM and "batch 1 with gradient checkpointing" in str(stop.value)
    assert limit.raised == 3  # batch 2, batch 1, batch 1 with checkpointing (no 8-bit states without CUDA)
    load = MemoryLimit(lambda args: True, at_load=True)
    with pytest.raises(RunStopped) as stop:
        runner.run(TINY, steps(2), output_dir=str(tmp_path / "load"), extra_callbacks=[load.callback], **QUIET)
    assert stop.value.code == runner.EXIT_OOM and "while loading" in str(stop.value)


@pytest.mark.parametrize("detected, fp16", [("T4", True), ("RTX 4060 Ti 16GB", False)])
def test_the_run_is_planned_for_the_gpu_that_is_present(tmp_path, monkeypatch, detected, fp16):
    """A stubbed detection (this machine has no CUDA) returning a card other than the recipe's: the plan is made
    for it, said in the log and plan.json; a card without bf16 gets fp16."""
    from finetune_helper.recommender.gpu import resolve_gpu
    from finetune_helper.train import prepare as prepare_module

    monkeypatch.setattr(prepare_module, "_detected_gpu", lambda: resolve_gpu(detected))
    lines: list[str] = []
    out = tmp_path / "dry"
    run(TINY, ["hardware.gpu=A100 80GB"], output_dir=str(out), dry_run=True, log=lines.append)
    plan = json.loads((out / "plan.json").read_text())
    assert plan["gpu"] == resolve_gpu(detected).name and plan["hardware"]["recipe"].startswith("A100 80GB")
    assert plan["fp16"] is fp16 and plan["bf16"] is not fp16
    assert any(line.startswith("hardware: this machine has") for line in lines), lines


def test_qlora_under_fsdp_stores_the_4bit_weights_in_the_compute_dtype(tmp_path):
    pytest.importorskip("bitsandbytes")
    import torch

    from finetune_helper.train import runner
    from finetune_helper.train.recipe import load_recipe

    recipe = load_recipe(TINY, ["method.type=qlora", "training.bf16=true", "training.max_steps=1"])
    prep, _ = runner.prepare(recipe, tmp_path / "run", **QUIET)
    plain = runner.load_model(prep, prep.sft_kwargs).config.quantization_config
    sharded = runner.load_model(prep, {**prep.sft_kwargs, "fsdp": True}).config.quantization_config
    assert plain.bnb_4bit_quant_storage == torch.uint8 and sharded.bnb_4bit_quant_storage == torch.bfloat16


@pytest.mark.parametrize("scheduler, trainer_type", [
    ("warmup_stable_decay", "warmup_stable_decay"), ("cosine_with_min_lr", "cosine_with_min_lr"),
    ("one_cycle", "cosine_warmup_with_min_lr"), ("step_decay", "step_decay")])
def test_the_chosen_schedule_is_what_the_trainer_runs(tmp_path, scheduler, trainer_type):
    """recommend.scheduler reaches the Trainer with its arguments (WSD's decay steps following a max_steps
    override; step decay as the runner's LambdaLR over constant_with_warmup), and every logged LR is the one
    recommender/schedule.py computes for it."""
    from finetune_helper.recommender.schedule import logged_lr, warmup_steps_for

    out = tmp_path / "run"
    run(TINY, steps(12, f"recommend.scheduler={scheduler}", "data.max_examples=200"), output_dir=str(out), **QUIET)
    args = json.loads((out / "training_args.json").read_text())
    plan = json.loads((out / "plan.json").read_text())
    assert plan["lr_scheduler_type"] == scheduler
    if scheduler == "step_decay":  # no TrainingArguments type: the same warmup, the decay is the runner's
        assert args["lr_scheduler_type"] == "constant_with_warmup" and "lr_scheduler_kwargs" not in args
        options = plan["lr_scheduler_kwargs"]
    else:
        assert args["lr_scheduler_type"] == trainer_type
        options = args["lr_scheduler_kwargs"]
    if scheduler == "warmup_stable_decay":
        assert options == {"num_decay_steps": 3}  # 20% of 12 steps, not of the plan's 675
    logged = [(r["step"], r["learning_rate"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    warmup = warmup_steps_for(args.get("warmup_steps", args.get("warmup_ratio", 0)), 12)
    for step, lr in logged:
        assert lr == pytest.approx(logged_lr(step, args["learning_rate"], 12, warmup, trainer_type, options=options),
                                   rel=1e-9), step
    if scheduler == "step_decay":  # a tenth of the peak from half the run on, a hundredth from three quarters
        by_step = dict(logged)
        assert by_step[7] == pytest.approx(args["learning_rate"] / 10) and by_step[6] == pytest.approx(
            args["learning_rate"])
        assert by_step[10] == pytest.approx(args["learning_rate"] / 100)


def test_sigterm_to_a_multi_process_run_saves_and_stops_every_rank(tmp_path):
    """The app's Stop sends SIGTERM to the command it started: with --gpus 2 that is the launcher's parent, which
    passes it on; both ranks stop at the end of a step with a checkpoint, and resume continues."""
    import subprocess
    import sys
    import time

    out = tmp_path / "ddp"
    proc = subprocess.Popen([sys.executable, "-m", "finetune_helper", "run", str(TINY), "--gpus", "2", "--output-dir",
                             str(out), "--main-port", "29533", *steps(400, "training.save_steps=1000",
                                                                        "data.max_examples=300")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.1)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == EXIT_INTERRUPTED
    ckpt = last_checkpoint(out)
    assert ckpt is not None and json.loads((out / "summary.json").read_text())["status"] == "interrupted"
    time.sleep(1.0)
    left = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"--master_port=29533" in (entry / "cmdline").read_bytes():
                left.append(entry.name)
        except OSError:
            continue
    assert not left, f"launcher processes left running: {left}"


def test_a_zero3_run_plans_writes_and_estimates_deepspeed_and_is_refused_on_the_cpu_at_once(tmp_path):
    """hardware.strategy zero3 (+ offload): the dry run writes the DeepSpeed config into training_args.json and
    plan.json estimates the sharded step; a real run on this CPU-only machine is refused before any process starts
    (DeepSpeed through the Trainer needs CUDA GPUs), with nothing created."""
    import subprocess
    import sys
    import time

    pytest.importorskip("deepspeed")
    strategy = ["hardware.gpus=2", "hardware.strategy=zero3", "hardware.offload=optimizer", "method.type=qlora"]
    out = tmp_path / "dry"
    run(TINY, strategy, output_dir=str(out), dry_run=True, **QUIET)
    args = json.loads((out / "training_args.json").read_text())
    zero = args["deepspeed"]["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == "cpu" and "offload_param" not in zero
    plan = json.loads((out / "plan.json").read_text())
    assert plan["distributed"] == "zero3" and "host memory per node" in plan["reasons"]["distributed"]
    assert plan["host_memory_bytes"] > 0 and plan["run"]["estimate"]["host_bytes"] > 0
    started = time.time()
    refused = subprocess.run([sys.executable, "-m", "finetune_helper", "run", str(TINY), *strategy, "--output-dir",
                              str(tmp_path / "real")], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and time.time() - started < 60
    assert refused.stderr.strip().splitlines()[-1].startswith("finetune-helper: error: hardware.strategy: zero3: "
                                                              "DeepSpeed runs on CUDA GPUs")
    assert "launching" not in refused.stdout and not (tmp_path / "real").exists()


def test_a_zero_strategy_without_deepspeed_installed_is_one_line(tmp_path, monkeypatch):
    """A machine without DeepSpeed (simulated: its module is not found) is told what to install, at once."""
    import importlib.util

    from finetune_helper.errors import FinetuneHelperError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(FinetuneHelperError) as err:
        run(TINY, ["hardware.gpus=2", "hardware.strategy=zero2"], output_dir=str(tmp_path / "dry"), dry_run=True,
            **QUIET)
    assert err.value.field == "hardware.strategy" and "pip install deepspeed" in err.value.message


def test_an_fsdp_plan_on_cpu_processes_trains_data_parallel_and_says_so(tmp_path):
    """accelerate gives FSDP to GPU-like devices only (its MULTI_CPU state never becomes FSDP): on this machine a
    2-process FSDP plan trains data parallel, and the run says so instead of writing FSDP arguments it would not
    apply; the dry run keeps them for the GPUs it plans for."""
    import subprocess
    import sys

    fsdp = ["hardware.strategy=fsdp", "hardware.gpus=2"]
    run(TINY, fsdp, output_dir=str(tmp_path / "dry"), dry_run=True, **QUIET)
    assert json.loads((tmp_path / "dry" / "training_args.json").read_text())["fsdp"]
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "finetune_helper", "run", str(TINY), "--output-dir", str(out),
                           "--main-port", "29534", *fsdp, *steps(2, "data.max_examples=200")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Setting accelerator to CPU" not in done.stdout  # DeepSpeed's notice, when installed, is kept out
    plan = json.loads((out / "plan.json").read_text())
    assert plan["distributed"] == "fsdp" and any("FSDP is accelerate's on GPUs only" in a for a in plan["adaptations"])
    args = json.loads((out / "training_args.json").read_text())
    assert "fsdp" not in args and "fsdp_config" not in args
    assert json.loads((out / "summary.json").read_text())["processes"] == 2


def test_resume_from_another_directory_keeps_the_run_folder(tmp_path, monkeypatch, capsys):
    """A run started with a relative --output-dir saved that path in training_args.json; resumed from elsewhere it
    still trains into its own folder (not into a new one under the current directory).  The run is the command in
    this process, in its directory; the resume a process of its own, started in another."""
    import subprocess
    import sys

    first_cwd, other_cwd = tmp_path / "first", tmp_path / "elsewhere"
    first_cwd.mkdir()
    other_cwd.mkdir()
    monkeypatch.chdir(first_cwd)
    code = cli.main(["run", str(TINY), "--output-dir", "runs/rel",
                     *steps(2, "training.save_steps=2", "data.max_examples=100")])
    assert code == 0, capsys.readouterr().err[-2000:]
    monkeypatch.chdir(tmp_path)
    assert json.loads((first_cwd / "runs" / "rel" / "training_args.json").read_text())["output_dir"] == "runs/rel"
    run_dir = first_cwd / "runs" / "rel"
    again = subprocess.run([sys.executable, "-m", "finetune_helper", "resume", str(run_dir), "training.max_steps=4"],
                           cwd=other_cwd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (run_dir / "checkpoint-4").is_dir() and not (other_cwd / "runs").exists()
    assert json.loads((run_dir / "summary.json").read_text())["global_step"] == 4


def test_a_three_example_recipe_validates_and_runs(tmp_path, capsys):
    """Issue 20 item 12: a run of one optimizer step is planned without warmup (the 10-step floor takes at most half
    of a run), so it validates and trains instead of failing on a warmup ratio of 1.0."""
    small = ["data.max_examples=3", "recommend.epochs=1"]
    assert cli.main(["validate", str(TINY), *small]) == 0
    assert cli.main(["run", str(TINY), *small, "--output-dir", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "done" and summary["global_step"] == 1


# --------------------------------------------------------------------------------------------- issue 20: resume
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A run of the tiny demo finished at step 6 (checkpoints 2, 4, 6), on a local data file: copied by each test."""
    from finetune_helper.train.tiny import synthetic_dataset, write_dataset

    root = tmp_path_factory.mktemp("finished")
    data = write_dataset(root / "data.jsonl", synthetic_dataset(100, seed=3))
    out = root / "run"
    assert cli.main(["run", str(TINY), "--output-dir", str(out), f"data.path={data}",
                     *steps(6, "training.save_steps=2")]) == 0
    return out


def copy_run(finished_run: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(finished_run, tmp_path / "run", symlinks=True))


@pytest.mark.parametrize("edit, field", [
    (lambda r: r / "recipe.yaml", "data.max_length"),
    (lambda r: r / "recipe.yaml", "seed"),
    (lambda r: r / "recipe.yaml", "recommend.lr_max"),
    (lambda r: r / "training_args.json", "training_args.json was edited"),
    (lambda r: Path(yaml.safe_load((r / "recipe.yaml").read_text())["data"]["path"]), "the data file's contents"),
], ids=["max_length", "seed", "lr_max", "training_args", "data"])
def test_resume_notices_what_was_edited_since_the_run_started(finished_run, tmp_path, capsys, edit, field):
    run_dir = copy_run(finished_run, tmp_path)
    target = edit(run_dir)
    if target.name == "recipe.yaml":
        raw = yaml.safe_load(target.read_text())
        section, _, key = field.rpartition(".")
        (raw[section] if section else raw)[key] = {"data.max_length": 32, "seed": 7, "recommend.lr_max": 3e-4}[field]
        target.write_text(RECIPE_HEADER + "\n" + yaml.safe_dump(raw))
    elif target.name == "training_args.json":
        args = json.loads(target.read_text())
        target.write_text(json.dumps({**args, "learning_rate": 0.5}))
    original = target.read_text() if target.name.endswith(".jsonl") else None
    if original is not None:  # the data file itself (shared by the copies: put back below)
        target.write_text(original.replace("1", "2", 1))
    before = snapshot(run_dir)
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["resume", str(run_dir), "training.max_steps=8"])
    finally:
        if original is not None:
            target.write_text(original)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and field in err[0], err
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("length", ["training.max_steps=3", "training.max_steps=6", "training.num_train_epochs=0.5"])
def test_resume_never_trains_a_finished_run_backwards(finished_run, tmp_path, capsys, length):
    run_dir = copy_run(finished_run, tmp_path)
    before = snapshot(run_dir)
    assert cli.main(["resume", str(run_dir), length]) == 0
    assert "nothing to resume and nothing was changed" in capsys.readouterr().out
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("length", ["training.max_steps=-5", "training.max_steps=0"])
def test_a_length_of_zero_or_less_is_a_field_error(finished_run, tmp_path, capsys, length):
    run_dir = copy_run(finished_run, tmp_path)
    before = snapshot(run_dir)
    for argv in (["resume", str(run_dir), length], ["validate", str(TINY), length]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and err == [f"finetune-helper: error: training.max_steps: must be > 0, got "
                                                     f"{length.split('=')[1]}"], err
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("content", ["[1, 2]", "{not json", None])
def test_an_unreadable_training_args_json_is_an_error_not_a_new_plan(finished_run, tmp_path, capsys, content):
    run_dir = copy_run(finished_run, tmp_path)
    args = run_dir / "training_args.json"
    args.unlink() if content is None else args.write_text(content)
    before = snapshot(run_dir)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["resume", str(run_dir), "training.max_steps=8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "training_args.json is" in err[0], err
    assert snapshot(run_dir) == before  # plan.json with the run's own batch is kept


def test_a_schedule_overridden_in_training_runs_without_the_plans_schedule_options(tmp_path):
    """Issue 20 item 13: the plan's cosine_with_min_lr writes min_lr_rate; a recipe that trains linear instead must
    not pass it on (the Trainer's linear schedule takes no such argument: exit 1 at the first step before)."""
    out = tmp_path / "run"
    result = run(TINY, steps(2, "recommend.scheduler=cosine_with_min_lr", "training.lr_scheduler_type=linear"),
                 output_dir=str(out), **QUIET)
    args = json.loads((out / "training_args.json").read_text())
    assert result.exit_code == 0 and args["lr_scheduler_type"] == "linear" and "lr_scheduler_kwargs" not in args
    kept = run(TINY, steps(2, "recommend.scheduler=cosine_with_min_lr"), output_dir=str(tmp_path / "kept"),
               dry_run=True, **QUIET)
    assert kept.exit_code == 0
    assert json.loads((tmp_path / "kept" / "training_args.json").read_text())["lr_scheduler_kwargs"] == {
        "min_lr_rate": 0.1}


def test_a_resume_says_nothing_of_the_tied_embeddings_it_did_not_miss(tmp_path, capfd):
    """Issue 20 item 11: the tiny model ties lm_head to the embedding, which save_pretrained writes once; the
    Trainer's "missing keys ... lm_head.weight" on every resume is noise, left out (an untied missing key is not)."""
    out = tmp_path / "run"
    assert cli.main(["run", str(TINY), "--output-dir", str(out), *steps(2, "training.save_steps=1",
                                                                         "data.max_examples=100")]) == 0
    import shutil

    shutil.rmtree(out / "checkpoint-2")
    (out / "summary.json").unlink()
    capfd.readouterr()
    assert cli.main(["resume", str(out)]) == 0
    captured = capfd.readouterr()
    assert "resuming with the run's own training_args.json" in captured.out
    assert "missing keys" not in captured.out + captured.err


def test_the_tied_keys_filter_keeps_a_key_that_is_not_tied():
    import logging

    import torch

    from finetune_helper.train.backoff import _tied_keys_unmentioned

    model = torch.nn.Module()
    model.embed = torch.nn.Embedding(4, 2)
    model.head = torch.nn.Linear(2, 4, bias=False)
    model.head.weight = model.embed.weight
    model.other = torch.nn.Linear(2, 2)
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("transformers.trainer")
    handler = Keep()
    logger.addHandler(handler)
    try:
        with _tied_keys_unmentioned(model):
            logger.warning("There were missing keys in the checkpoint model loaded: ['head.weight'].")
            logger.warning("There were missing keys in the checkpoint model loaded: ['other.weight'].")
    finally:
        logger.removeHandler(handler)
    assert records == ["There were missing keys in the checkpoint model loaded: ['other.weight']."]
