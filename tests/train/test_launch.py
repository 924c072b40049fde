"""Multi-process launches: concurrent runs on one node never meet on a port, and a Stop or Ctrl-C lets every rank
finish its checkpoint however long the save takes.  Real torchrun launches of 2 CPU processes (gloo) of the tiny
recipe; the slow save is the real one, delayed in the workers by a ``sitecustomize`` of the test's own."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune_helper import recommend
from finetune_helper.train.launch import (CHECKPOINT_BYTES_PER_PARAMETER, DISK_BYTES_PER_SECOND,
                                          SHUTDOWN_FLOOR_SECONDS, Launch, checkpoint_bytes, shutdown_timeout)
from finetune_helper.train.recipe import load_recipe
from finetune_helper.train.run_folder import checkpoint_problem, last_checkpoint

from ..conftest import HEAVY_CHECK

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
TINY = RECIPES / "tiny-demo.yaml"
#: torchrun's wait before it SIGKILLs its workers when nothing sets it (torch/distributed/launcher/api.py)
TORCHRUN_DEFAULT_WAIT = 30


def finetune_helper(log: Path, *args: str, **popen) -> subprocess.Popen:
    """``finetune-helper ARGS`` in the background, its output (and its processes') in ``log``."""
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "finetune_helper", *args], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **popen)


def left_running(marker: str) -> list[str]:
    """Processes whose command line names ``marker`` (the run folder: torchrun's and the workers')."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                found.append(entry.name)
        except OSError:
            continue
    return found


# ------------------------------------------------------------------------------------------------ the command
def test_one_node_takes_a_free_rendezvous_and_several_nodes_meet_at_the_main_address():
    one = Launch(gpus=2).command(["run", "r.yaml"])
    assert "--standalone" in one and not any(a.startswith("--master_port") for a in one)
    two = Launch(gpus=8, nodes=2, node_rank=1, main_address="10.0.0.1").command(["run", "r.yaml"])
    assert "--standalone" not in two and {"--master_addr=10.0.0.1", "--master_port=29500", "--node_rank=1"} <= set(two)
    chosen = Launch(gpus=2, main_port=29531).command(["run", "r.yaml"])
    assert "--master_port=29531" in chosen and "--standalone" not in chosen  # a port the user names is kept


# ------------------------------------------------------------------------------------------- the shutdown wait
@pytest.mark.parametrize("recipe", ["llama-3.1-8b-full-2x24gb-zero3-offload.yaml",
                                    "qwen2.5-72b-lora-8xh100-zero3.yaml"])
def test_the_checkpoint_size_counts_the_trainable_parameters_the_plan_counts(recipe):
    r = load_recipe(RECIPES / recipe)
    targets = r.method.target_modules
    plan = recommend(r.model.name, r.hardware.gpu, method=r.method.type, gpus=r.hardware.gpus,
                     strategy=r.hardware.strategy, offload=r.hardware.offload, lora_r=r.method.lora_r,
                     lora_target_modules=targets if isinstance(targets, str) else tuple(targets))
    assert checkpoint_bytes(r) == plan.estimate.trainable_parameters * CHECKPOINT_BYTES_PER_PARAMETER


def test_the_shutdown_wait_grows_with_the_checkpoint_past_torchruns_30_s_with_a_floor():
    full_8b = checkpoint_bytes(load_recipe(RECIPES / "llama-3.1-8b-full-2x24gb-zero3-offload.yaml"))
    lora_72b = checkpoint_bytes(load_recipe(RECIPES / "qwen2.5-72b-lora-8xh100-zero3.yaml"))
    assert shutdown_timeout(None) == shutdown_timeout(lora_72b) == SHUTDOWN_FLOOR_SECONDS > TORCHRUN_DEFAULT_WAIT
    assert shutdown_timeout(full_8b) == math.ceil(full_8b / DISK_BYTES_PER_SECOND) > SHUTDOWN_FLOOR_SECONDS


@pytest.mark.integration
@pytest.mark.parametrize("method, files", [("full", ("model.safetensors", "optimizer.pt")),
                                           ("lora", ("adapter_model.safetensors", "optimizer.pt"))])
def test_the_checkpoint_size_bounds_what_a_real_checkpoint_writes(tmp_path, method, files):
    """The weights and optimizer states of a real tiny checkpoint (fp32 weights, AdamW: 12 bytes per trainable
    parameter) fit within the estimate, which is at most 16/12 of them."""
    from finetune_helper import cli

    overrides = [f"method.type={method}", "training.max_steps=2", "training.save_steps=2", "data.max_examples=200"]
    assert cli.main(["run", str(TINY), *overrides, "--output-dir", str(tmp_path / "run")]) == 0
    written = sum((tmp_path / "run" / "checkpoint-2" / name).stat().st_size for name in files)
    estimate = checkpoint_bytes(load_recipe(TINY, overrides))
    assert written <= estimate <= written * 16 / 12 * 1.02, (written, estimate)


# ------------------------------------------------------------------------------------------ concurrent launches
@pytest.mark.integration
def test_two_concurrent_two_process_runs_on_one_node_both_finish(two_process_runs):
    """The app starts runs on disjoint GPUs side by side: two launches of 2 processes each, at once, each with its
    own rendezvous (one shared port would refuse the second or join it to the first).  The two launches are the
    session's ``two_process_runs`` (tests/train/conftest.py), which other tests read too."""
    from .conftest import TWO_PROCESS_RUNS

    assert set(two_process_runs) == set(TWO_PROCESS_RUNS) and len(two_process_runs) == 2
    for name, run in two_process_runs.items():
        assert run["returncode"] == 0, (run["stdout"] + run["stderr"])[-3000:]
        assert "--standalone" in run["stdout"] and "--master_port" not in run["stdout"]  # neither chose a port
        max_steps = next(int(o.split("=")[1]) for o in TWO_PROCESS_RUNS[name] if o.startswith("training.max_steps="))
        summary = run["summary"]
        assert summary["status"] == "done" and summary["processes"] == 2 and summary["global_step"] == max_steps


# --------------------------------------------------------------------------------------------- Ctrl-C, slow save
#: the workers' sitecustomize: once transformers.trainer is imported, Trainer._save_checkpoint sleeps first, then
#: saves for real and marks the rank that finished
SLOW_SAVE = '''
import importlib.abc, os, sys, time
from pathlib import Path


class SlowSave(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "transformers.trainer":
            return None
        spec = next(s for f in sys.meta_path if f is not self and hasattr(f, "find_spec")
                    for s in [f.find_spec(name, path, target)] if s is not None)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            save = module.Trainer._save_checkpoint

            def slow_save(trainer, *args, **kwargs):
                time.sleep(float(os.environ["SLOW_SAVE_SECONDS"]))
                save(trainer, *args, **kwargs)
                Path(os.environ["SLOW_SAVE_MARKS"], "rank-" + os.environ["RANK"]).write_text(str(time.time()))

            module.Trainer._save_checkpoint = slow_save

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("SLOW_SAVE_SECONDS") and "LOCAL_RANK" in os.environ:
    sys.meta_path.insert(0, SlowSave())
'''


@pytest.mark.integration
@pytest.mark.slow
def test_ctrl_c_lets_every_rank_finish_a_checkpoint_slower_than_torchruns_default_wait(tmp_path):
    """Ctrl-C in a terminal (SIGINT to the command's process group) during a 2-process run whose checkpoint takes
    35 s to save: both ranks finish it -- a complete checkpoint with both ranks' RNG states, exit 130 -- where
    torchrun's default wait would have SIGKILLed them at 30 s; nothing is left running."""
    site, marks, out = tmp_path / "site", tmp_path / "marks", tmp_path / "run"
    site.mkdir()
    marks.mkdir()
    (site / "sitecustomize.py").write_text(SLOW_SAVE)
    env = {**os.environ, "SLOW_SAVE_SECONDS": str(TORCHRUN_DEFAULT_WAIT + 5), "SLOW_SAVE_MARKS": str(marks),
           "PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", None)
    log = tmp_path / "run.log"
    proc = finetune_helper(log, "run", str(TINY), "--gpus", "2", "--output-dir", str(out), "training.max_steps=400",
                           "training.save_steps=1000", "training.logging_steps=1", "data.max_examples=300", env=env,
                           start_new_session=True)  # its own group, as a terminal's foreground job
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "metrics.jsonl").exists() and proc.poll() is None:
        time.sleep(0.1)
    assert (out / "metrics.jsonl").exists(), "training never started"
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=300) == 130, log.read_text()[-3000:]
    assert sorted(p.name for p in marks.iterdir()) == ["rank-0", "rank-1"], log.read_text()[-3000:]
    ckpt = last_checkpoint(out)
    assert ckpt is not None and checkpoint_problem(ckpt) is None
    assert (ckpt / "rng_state_0.pth").is_file() and (ckpt / "rng_state_1.pth").is_file()
    assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"
    time.sleep(1.0)
    assert not left_running(str(out))
    # one clean story (issue 20 item 10): the runner's lines, none of the launcher's
    text = log.read_text()
    assert "Traceback" not in text and "torch/distributed/elastic" not in text and "terminate called" not in text
    assert text.rstrip().splitlines()[-1].startswith("finetune-helper: stopped: interrupted by SIGINT")


# ------------------------------------------------------------------------------- issue 20: the process tree
def wait_for_training(out: Path, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    """Until the run has logged a loss (its workers are training)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and '"loss"' in metrics.read_text():
            return
        time.sleep(0.2)
    pytest.fail(f"never trained: {log.read_text()[-3000:]}")


def wait_until_gone(out: Path, timeout: float) -> list[int]:
    from finetune_helper.train.launch import run_processes

    deadline = time.time() + timeout
    while run_processes(out) and time.time() < deadline:
        time.sleep(0.2)
    return run_processes(out)


@pytest.mark.integration
@pytest.mark.slow
def test_killing_the_command_stops_torchrun_and_its_workers_with_a_checkpoint(tmp_path):
    """``kill -9`` of ``run --gpus 2``: torchrun, told by the kernel that its parent died, stops the workers as a
    Stop would -- a checkpoint at the end of the step, then exit -- instead of training on to the end unwatched."""
    out, log = tmp_path / "run", tmp_path / "run.log"
    proc = finetune_helper(log, "run", str(TINY), "--gpus", "2", "--output-dir", str(out), "training.max_steps=2000",
                           "training.save_steps=1000", "training.logging_steps=1", "data.max_examples=300",
                           start_new_session=True)
    wait_for_training(out, proc, log)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not wait_until_gone(out, timeout=120), log.read_text()[-3000:]
    ckpt = last_checkpoint(out)
    assert ckpt is not None and checkpoint_problem(ckpt) is None  # the workers stopped with a checkpoint
    assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"
    assert json.loads((out / "summary.json").read_text())["global_step"] < 2000


def worker_of_rank(out: Path, rank: int) -> int:
    """The pid of the worker process of ``rank`` (torchrun sets LOCAL_RANK in its environment)."""
    for pid in map(int, left_running(str(out))):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"LOCAL_RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no worker of rank {rank}")


@pytest.mark.integration
@pytest.mark.slow
def test_a_signal_that_reaches_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """The ranks of a run see a signal each at its own moment; the one that saw it must not stop alone while the
    other starts a step whose all-reduce would wait forever.  SIGTERM to rank 1 only: both ranks stop after the same
    step with one complete checkpoint, exit 130, nothing left running."""
    out, log = tmp_path / "run", tmp_path / "run.log"
    proc = finetune_helper(log, "run", str(TINY), "--gpus", "2", "--output-dir", str(out), "training.max_steps=2000",
                           "training.save_steps=1000", "training.logging_steps=1", "data.max_examples=300",
                           start_new_session=True)
    try:
        wait_for_training(out, proc, log)
        os.kill(worker_of_rank(out, 1), signal.SIGTERM)
        assert proc.wait(timeout=240) == 130, log.read_text()[-3000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in left_running(str(out)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
    ckpt = last_checkpoint(out)
    assert ckpt is not None and checkpoint_problem(ckpt) is None, log.read_text()[-3000:]
    assert (ckpt / "rng_state_0.pth").is_file() and (ckpt / "rng_state_1.pth").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["global_step"] == int(ckpt.name.split("-")[1]) < 2000


@pytest.mark.integration
@pytest.mark.slow
def test_a_resume_of_a_two_process_run_checks_its_changes_before_launching(two_process_runs):
    """What one process refuses in one line (exit 2) is refused before N processes start: a resume on another
    number of GPUs, or with another max_length, is one line, and no worker ran.  The run: the session's "g2" of
    ``two_process_runs`` (``run --gpus 2``, 2 steps, a checkpoint at step 2)."""
    g2 = two_process_runs["g2"]
    out = g2["run_dir"]
    assert g2["returncode"] == 0, (g2["stdout"] + g2["stderr"])[-3000:]
    for args, field in ((["--gpus", "3"], "hardware.gpus"), (["--gpus", "2", "data.max_length=32"], "data.max_length")):
        done = subprocess.run([sys.executable, "-m", "finetune_helper", "resume", str(out), *args,
                               "training.max_steps=4"], capture_output=True, text=True, timeout=120)
        err = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(err) == 1 and err[0].startswith(f"finetune-helper: error: {field}:"), \
            done.stderr[-3000:]
        assert "launching" not in done.stdout


@pytest.mark.integration
@pytest.mark.slow
def test_a_run_folder_in_use_is_refused_to_a_second_writer(tmp_path):
    """One run folder, one writer: while a run trains, ``resume`` of its folder (and ``run --resume``) is refused in
    one line, at once (before the training stack is imported), and leaves its files alone; once it has ended the lock
    is gone (the OS releases it)."""
    out, log = tmp_path / "run", tmp_path / "run.log"
    proc = finetune_helper(log, "run", str(TINY), "--output-dir", str(out), "training.max_steps=2000",
                           "training.save_steps=2", "training.logging_steps=1", "data.max_examples=300",
                           start_new_session=True)
    try:
        wait_for_training(out, proc, log)
        deadline = time.time() + 120
        while last_checkpoint(out) is None and time.time() < deadline:
            time.sleep(0.2)
        files = {name: (out / name).read_bytes() for name in ("recipe.yaml", "training_args.json", "plan.json")}
        for argv in (["resume", str(out)], ["run", str(TINY), "--resume", "--output-dir", str(out),
                                             "training.max_steps=2000", "training.save_steps=2",
                                             "training.logging_steps=1", "data.max_examples=300"]):
            done = subprocess.run([sys.executable, "-c", HEAVY_CHECK, *argv], capture_output=True, text=True,
                                  timeout=120)
            *err, heavy = done.stderr.strip().splitlines()
            assert done.returncode == 2 and len(err) == 1 and "is in use by another run" in err[0], done.stderr
            assert heavy == "HEAVY []", done.stderr
        assert {name: (out / name).read_bytes() for name in files} == files
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    from finetune_helper.train.run_folder import in_use

    assert not in_use(out)
