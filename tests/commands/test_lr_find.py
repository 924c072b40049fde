"""``finetune-helper lr-find`` on the tiny model for real: the curve, the suggestions, the plot, nothing leaked."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

#: integration tier (make test-integration): real training steps
pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "tiny-demo.yaml"


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_lr_find_sweeps_the_real_model_and_suggests_within_the_bounds(tmp_path, monkeypatch, capsys):
    """The command, in this process (a process of its own spent ~8 s importing what this one has), from tmp_path."""
    from finetune_helper import cli

    base = ROOT / "finetune_helper" / "train" / "tiny-base"
    before = digest(base)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # the command pins one GPU: undone after the test
    code = cli.main(["lr-find", str(TINY), "--steps", "40", "--json", "--plot", str(tmp_path / "curve.png"),
                     "data.max_examples=600"])
    out = capsys.readouterr()
    assert code == 0, out.err[-2000:]
    result = json.loads(out.out)
    assert set(result) >= {"lrs", "losses", "suggested_lr", "suggested_lr_clamped", "rule_lr", "plot"}
    lrs, losses = result["lrs"], result["losses"]
    assert lrs[0] == pytest.approx(1e-7) and len(lrs) == len(losses) and 10 <= len(lrs) <= 40
    assert all(b > a for a, b in zip(lrs, lrs[1:]))
    assert min(losses) < losses[0]  # the loss fell somewhere in the sweep: it trained for real
    lo, hi = result["bounds"]
    assert lo <= result["suggested_lr_clamped"] <= hi and result["rule_lr"] > 0
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert digest(base) == before  # the model it swept is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curve.png"]  # no run folder, no checkpoint


def test_bad_sweep_bounds_are_one_line_errors(tmp_path, capsys):
    from finetune_helper import cli

    for argv, field in ((["--start", "1e-2", "--end", "1e-3"], "--start"), (["--steps", "1"], "--steps"),
                        (["--plot", str(tmp_path / "nowhere" / "x.png")], "--plot")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["lr-find", str(TINY), *argv])
        assert exit_info.value.code == 2 and capsys.readouterr().err.startswith(f"finetune-helper: error: {field}")


def test_lr_find_pins_one_gpu_before_torch_starts(tmp_path):
    """On a host with several GPUs the Trainer takes every visible one (n_gpu > 1, which SFTTrainer refuses):
    lr-find names one, as `run` does, before anything has imported torch (CUDA reads it when it starts); a device
    the caller chose (the app's GPU lock) is kept.  The sweep itself is replaced by a probe of its environment."""
    probe = ("import os, sys\n"
             "from finetune_helper import cli\n"
             "from finetune_helper.train import lr_find\n"
             "def sweep(*args, **kwargs):\n"
             "    print(os.environ.get('CUDA_VISIBLE_DEVICES'), 'torch' in sys.modules, flush=True)\n"
             "    os._exit(0)\n"
             "lr_find.range_test = sweep\n"
             f"cli.main(['lr-find', {str(TINY)!r}])\n")
    seen = []
    for chosen in (None, "3"):
        env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
        if chosen:
            env["CUDA_VISIBLE_DEVICES"] = chosen
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                             env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        seen.append(out.stdout.split())
    assert seen == [["0", "False"], ["3", "False"]]


def test_sharded_and_deepspeed_recipes_are_refused_before_anything_loads(tmp_path):
    """ZeRO / FSDP recipes: DeepSpeed would replace the sweep's schedule (a constant LR), FSDP shard over processes
    the sweep does not start: one line naming the field, exit 2, and neither torch nor a model loaded."""
    cases = [(["hardware.strategy=zero2"], "hardware.strategy"),
             (["hardware.gpus=2", "hardware.strategy=fsdp"], "hardware.strategy"),
             (["hardware.gpus=2", "hardware.strategy=zero3"], "hardware.strategy"),
             (["training.deepspeed=ds_config.json"], "training.deepspeed"),
             (["training.fsdp=full_shard auto_wrap"], "training.fsdp")]
    probe = ("import json, sys\n"
             "from finetune_helper import cli\n"
             "codes = []\n"
             "for overrides in json.loads(sys.argv[1]):\n"
             "    try:\n"
             f"        codes.append(cli.main(['lr-find', {str(TINY)!r}, '--steps', '5', *overrides]))\n"
             "    except SystemExit as exc:\n"
             "        codes.append(exc.code)\n"
             "loaded = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
             "print(json.dumps({'codes': codes, 'loaded': loaded}))\n")
    out = subprocess.run([sys.executable, "-c", probe, json.dumps([o for o, _ in cases])], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    errors = out.stderr.strip().splitlines()
    assert result == {"codes": [2] * len(cases), "loaded": []}, out.stderr[-2000:]
    assert len(errors) == len(cases)
    for line, (_, field) in zip(errors, cases):
        assert line.startswith(f"finetune-helper: error: {field}: ") and "auto or ddp" in line


def test_a_multi_gpu_recipe_sweeps_the_batch_it_reports(tmp_path, monkeypatch, capsys):
    """A recipe for 4 GPUs: the sweep runs one process, planned for one GPU, so each optimizer step is the recipe's
    whole effective batch (not 1/4 of it), and the batch it reports is the one that ran, counted here as the rows
    the real model's forward passes saw."""
    from finetune_helper import cli
    from finetune_helper.train import runner

    rows = []
    build = runner.build_trainer

    def counted(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.model.register_forward_pre_hook(
            lambda module, a, kw: rows.append(int(kw["input_ids"].shape[0])), with_kwargs=True)
        return trainer

    monkeypatch.setattr(runner, "build_trainer", counted)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", "0"))  # the command pins one
    steps = 6
    code = cli.main(["lr-find", str(TINY), "--steps", str(steps), "--json", "--plot", str(tmp_path / "curve.png"),
                     "--end", "1e-3", "hardware.gpus=4", "recommend.target_effective_batch=32",
                     "data.max_examples=600"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and len(result["lrs"]) == steps
    assert sum(rows) == steps * 32  # the recipe's effective batch, every step
    assert result["batch"] == 32 == result["micro_batch"] * result["gradient_accumulation_steps"]
    assert len(rows) == steps * result["gradient_accumulation_steps"]


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 240) -> None:
    import time

    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


def test_ctrl_c_ends_the_sweep_with_its_curve_so_far_and_no_traceback(tmp_path):
    """Ctrl-C (SIGINT) during the sweep: it ends after the step, prints and plots the curve so far, exits 130, no
    traceback; SIGTERM (the app's Stop) before the sweep starts: one line, 130.  The scratch folder goes both
    times (TMPDIR is watched)."""
    import signal

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    curve = tmp_path / "curve.json"
    proc = subprocess.Popen([sys.executable, "-m", "finetune_helper", "lr-find", str(TINY), "--steps", "200",
                             "--end", "1e-3", "--plot", str(tmp_path / "plot"), "--curve", str(curve),
                             "data.max_examples=600"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path, env=env)
    _wait_for(lambda: curve.is_file() and len(json.loads(curve.read_text() or "{}").get("lrs", [])) >= 3, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    result = json.loads(curve.read_text())
    assert result["done"] and result["interrupted"] == "SIGINT" and 3 <= len(result["lrs"]) < 200
    assert f"interrupted by SIGINT after {len(result['lrs'])} of 200 steps" in out
    assert f"plot: {tmp_path / 'plot.png'}" in out and (tmp_path / "plot.png").is_file()
    assert list(scratch.glob("finetune-helper-lr-find-*")) == []  # (torch keeps its own caches there)

    proc = subprocess.Popen([sys.executable, "-m", "finetune_helper", "lr-find", str(TINY), "--plot",
                             str(tmp_path / "early.png"), "data.max_examples=600"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    # preparing: the scratch folder exists, the sweep not yet
    _wait_for(lambda: any(scratch.glob("finetune-helper-lr-find-*")), proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1] == "finetune-helper: stopped: interrupted by SIGTERM before the sweep started"
    assert list(scratch.glob("finetune-helper-lr-find-*")) == [] and not (tmp_path / "early.png").exists()
