"""The command line, run as a user runs it: a fresh process, real output, real exit codes (the many bad-input cases
through the entry point's ``main`` in this process, two of them from a fresh process too)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import HEAVY_CHECK

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "finetune_helper", *args], capture_output=True, text=True, env=ENV,
                          timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_help_lists_commands():
    out = run("--help").stdout
    for cmd in ("estimate", "recommend", "export", "gpus", "models"):
        assert cmd in out


def test_recommend_table_and_json():
    table = run("recommend", "--model", "llama-3.1-8b", "--gpu", "a100 80gb", "--method", "lora").stdout
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "warmup_ratio",
                "FITS", "GiB"):
        assert key in table
    data = json.loads(run("recommend", "--model", "llama-3.1-8b", "--gpu", "a100 80gb", "--method", "lora",
                          "--json").stdout)
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps", "effective_batch_size", "learning_rate",
                "warmup_ratio", "gradient_checkpointing", "optim", "bf16", "fp16", "fits", "peak_memory_bytes",
                "breakdown", "reasons"):
        assert key in data
    assert set(data["reasons"]) >= {"per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
                                    "warmup_ratio", "gradient_checkpointing", "optim", "precision"}


def test_estimate_json_shape():
    data = json.loads(run("estimate", "--model", "Qwen/Qwen2.5-7B", "--method", "qlora", "--batch", "2",
                          "--seq-len", "1024", "--gradient-checkpointing", "--json").stdout)
    assert {"parameters", "trainable_parameters", "breakdown", "total_bytes"} <= set(data)
    assert {"weights", "gradients", "optimizer_states", "activations", "overhead"} <= set(data["breakdown"])
    assert data["parameters"] == 7_615_616_512


def test_estimate_by_strategy_on_several_gpus():
    """--gpus 8: the same step under each strategy; what ZeRO-3 / FSDP shard goes below what ZeRO-2 shards, below
    what DDP replicates, and offloading trades GPU memory for host memory."""
    data = json.loads(run("estimate", "--model", "meta-llama/Llama-3.1-8B", "--gpus", "8", "--batch", "2",
                          "--gradient-checkpointing", "--json").stdout)
    rows = {r["strategy"]: r for r in data["strategies"]}
    assert list(rows) == ["DDP", "FSDP", "ZeRO-2", "ZeRO-2 + offload optimizer", "ZeRO-3",
                          "ZeRO-3 + offload optimizer", "ZeRO-3 + offload all"]
    peak = {name: r["total_bytes"] for name, r in rows.items()}
    assert peak["ZeRO-3"] < peak["ZeRO-2"] < peak["DDP"] and peak["FSDP"] < peak["ZeRO-2"]
    assert peak["ZeRO-3 + offload all"] < peak["ZeRO-3 + offload optimizer"] < peak["ZeRO-3"]
    assert all((r["host_bytes"] > 0) == (r["offload"] != "none") for r in rows.values())
    assert rows["ZeRO-3"]["gathered"] > 0 and rows["ZeRO-2"]["gathered"] == 0 and rows["FSDP"]["gathered"] > 0
    assert rows["DDP"]["weights"] > rows["ZeRO-2"]["weights"] > rows["ZeRO-3"]["weights"]
    table = run("estimate", "--model", "meta-llama/Llama-3.1-8B", "--gpus", "8", "--gradient-checkpointing").stdout
    assert "per GPU by strategy" in table and "ZeRO-3 + offload all" in table


def test_export_writes_file(tmp_path: Path):
    out = tmp_path / "args.yaml"
    proc = run("export", "--model", "qwen2.5-0.5b", "--gpu", "24GB", "--format", "yaml", "-o", str(out))
    assert out.is_file() and "learning_rate" in out.read_text()
    assert str(out) in proc.stderr


def in_process(capsys, *args: str) -> tuple[int, str, str]:
    """The entry point's ``main`` in this process: (exit code, stdout, stderr)."""
    from finetune_helper import cli

    try:
        code = cli.main(list(args))
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("fmt", ["json", "yaml", "python", "cli", "accelerate"])
def test_a_run_of_ten_steps_or_fewer_exports(fmt, capsys):
    """80 examples of batch 8, one epoch: 10 steps, warmed up for 5 of them (never the whole run)."""
    code, out, err = in_process(capsys, "export", "--model", "llama-3.1-8b", "--gpu", "H100", "--dataset-size", "80",
                                "--epochs", "1", "--format", fmt)
    assert code == 0 and out.strip() and "error" not in err, err


@pytest.mark.parametrize("fmt", ["json", "cli"])
def test_export_of_a_plan_that_does_not_fit_warns_on_stderr(fmt, capsys):
    code, _, err = in_process(capsys, "export", "--model", "llama-3.1-70b", "--gpu", "24GB", "--method", "full",
                              "--format", fmt)
    assert code == 0 and "warning: this plan does not fit in GPU memory" in err, err
    code, _, err = in_process(capsys, "export", "--model", "qwen2.5-0.5b", "--gpu", "80GB", "--format", fmt)
    assert code == 0 and "warning" not in err, err


def test_catalog_listings():
    assert "RTX 4090" in run("gpus").stdout
    models = json.loads(run("models", "--json").stdout)
    assert len(models) >= 25 and all(m["parameters"] > 0 for m in models)


@pytest.mark.parametrize("args,flag", [
    (["recommend", "--model", "llama-3.1-8b", "--gpu", "H1000"], "--gpu"),
    (["recommend", "--model", "lama-3.1-8", "--gpu", "H100"], "--model"),
    (["recommend", "--model", "1000000B", "--gpu", "H100"], "--model"),   # beyond any real size: refused at once
    (["estimate", "--model", "100000000B"], "--model"),
    (["recommend", "--model", "llama-3.1-8b", "--gpu", "0GB"], "--gpu"),
    (["recommend", "--model", "llama-3.1-8b", "--gpu", "H100", "--seq-len", "0"], "--seq-len"),
    (["recommend", "--model", "llama-3.2-1b", "--gpu", "H100", "--seq-len", "999999"], "--seq-len"),
    (["recommend", "--model", "llama-3.1-8b", "--gpu", "H100", "--lr-min", "1e-4", "--lr-max", "1e-5"], "--lr-min"),
    (["recommend", "--model", "llama-3.1-8b", "--gpu", "H100", "--batch-size", "3"], "--batch-size"),
    (["recommend", "--model", "llama-3.1-8b", "--gpu", "H100", "--lr-max", "fast"], "--lr-max"),
    (["estimate", "--model", "llama-3.1-8b", "--batch", "x"], "--batch"),
    (["estimate", "--model", "llama-3.1-8b", "--batch", "-2"], "--batch"),
    (["estimate", "--model", "llama-3.1-8b", "--optim", "adam_magic"], "--optim"),
    (["export", "--model", "llama-3.1-8b", "--gpu", "H100", "--format", "toml"], "--format"),
    (["recommend", "--model", "/no/such/dir/or/model", "--gpu", "H100"], "--model"),
    (["recommend", "--model", "some-org/not-in-catalog", "--gpu", "H100"], "--model"),
    (["recommend", "--model", "llama-3.1-8b", "--gpu", "H100", "--offload", "optimizer"], "--offload"),
    (["recommend", "--model", "llama-3.1-8b", "--gpu", "H100", "--gpus", "2", "--strategy", "zero2", "--offload",
      "all"], "--offload"),
    (["recommend", "--model", "llama-3.1-8b", "--gpu", "H100", "--strategy", "fsdp"], "--strategy"),
    (["recommend", "--model", "llama-3.1-8b", "--gpu", "H100", "--gpus", "2", "--strategy", "zero3", "--optim",
      "paged_adamw_8bit"], "--optim"),
    (["recommend", "--model", "llama-3.1-8b", "--gpu", "H100", "--gpus", "2", "--strategy", "zero9"], "--strategy"),
    (["estimate", "--model", "llama-3.1-8b", "--gpus", "8", "--nodes", "3"], "--nodes"),
    (["estimate", "--model", "llama-3.1-8b", "--gpus", "8", "--offload", "all"], "--offload"),
    (["export", "--model", "llama-3.1-8b", "--gpu", "H100", "--scheduler", "step_decay"], "--scheduler"),
])
def test_bad_input_is_one_line_exit_2(args, flag, capsys):
    """In this process (the entry point's ``main``: a fresh process for each case spent its time starting Python);
    an exception other than the exit would fail the test, as a traceback would."""
    code, _, err = in_process(capsys, *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("finetune-helper: error: ") and flag in lines[0]


@pytest.mark.parametrize("args,flag", [(["recommend", "--model", "llama-3.1-8b", "--gpu", "H1000"], "--gpu"),
                                       (["estimate", "--model", "llama-3.1-8b", "--batch", "x"], "--batch")])
def test_bad_input_from_a_fresh_process_is_one_line_exit_2(args, flag):
    """The same from the command a user types: a core refusal and an argument parser's, exit code 2, no traceback."""
    proc = run(*args, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("finetune-helper: error: ") and flag in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_bare_size_warns_in_one_line():
    proc = run("estimate", "--model", "7B")
    assert "warning: --model 7B" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("args", [
    ["recommend", "--model", "llama-3.1-8b", "--gpu", "H100", "--method", "qlora"],
    ["estimate", "--model", "Qwen/Qwen2.5-72B", "--method", "lora", "--json"],
    ["export", "--model", "gemma-2-2b", "--gpu", "L4", "--format", "python"],
    ["export", "--model", "mistral-7b-v0.1", "--gpu", "24GB", "--format", "yaml"],
])
def test_core_commands_never_import_torch_or_transformers(args):
    proc = subprocess.run([sys.executable, "-c", HEAVY_CHECK, *args], capture_output=True, text=True,
                          env=ENV, timeout=120)
    assert "HEAVY []" in proc.stderr, proc.stderr


def test_installed_entry_point():
    exe = Path(sys.executable).parent / "finetune-helper"
    assert exe.exists()
    proc = subprocess.run([str(exe), "recommend", "--model", "smollm2-1.7b", "--gpu", "L4", "--method", "lora",
                           "--json"],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 0 and json.loads(proc.stdout)["fits"] is True
