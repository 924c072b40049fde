"""``export --format accelerate``: a config that accelerate's own loader reads and ``accelerate launch`` runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finetune_helper import cli

#: integration tier (make test-integration): real launcher processes
pytestmark = pytest.mark.integration

SCRIPT = """
import os, sys
from accelerate import PartialState
PartialState()
with open(os.path.join(sys.argv[1], f"worker-{os.getpid()}.txt"), "w") as fh:  # one file each: no interleaving
    fh.write(" ".join(["worker", str(os.environ.get("ACCELERATE_USE_FSDP")), str(os.environ.get("FSDP_VERSION")),
                       str(os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP")),
                       str(os.environ.get("ACCELERATE_MIXED_PRECISION"))]))
"""


def export(tmp_path: Path, *args: str) -> Path:
    out = tmp_path / "accelerate_config.yaml"
    assert cli.main(["export", *args, "--format", "accelerate", "-o", str(out)]) == 0
    return out


@pytest.mark.parametrize("gpus, method, kind", [(1, "lora", "NO"), (2, "lora", "MULTI_GPU"), (8, "full", "FSDP")])
def test_accelerates_loader_reads_the_exported_config(tmp_path, gpus, method, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    path = export(tmp_path, "--model", "meta-llama/Llama-3.1-8B", "--gpu", "H100", "--gpus", str(gpus),
                  "--method", method)
    config = load_config_from_file(str(path))
    assert str(config.distributed_type).endswith(kind) and config.num_processes == gpus
    assert config.mixed_precision == "bf16"
    if kind == "FSDP":
        assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
        assert config.fsdp_config["fsdp_version"] == 2


def test_accelerate_launch_runs_the_fsdp_config_with_the_matching_training_arguments(tmp_path, capsys):
    """``accelerate launch --config_file`` starts the processes with FSDP set as exported; the TrainingArguments
    export of the same plan carries the same FSDP settings."""
    args = ["--model", "meta-llama/Llama-3.1-8B", "--gpu", "H100", "--gpus", "2", "--method", "full"]
    path = export(tmp_path, *args)
    assert "launch: accelerate launch --config_file" in capsys.readouterr().err
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    done = subprocess.run([str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file", str(path),
                           "--main_process_port", "29561", str(script), str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    workers = [p.read_text().split() for p in sorted(tmp_path.glob("worker-*.txt"))]
    assert workers == [["worker", "true", "2", "LlamaDecoderLayer", "bf16"]] * 2
    yaml_out = tmp_path / "args.yaml"
    assert cli.main(["export", *args, "--format", "yaml", "-o", str(yaml_out)]) == 0
    training = yaml.safe_load(yaml_out.read_text())
    assert training["fsdp_config"]["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]
    assert training["fsdp"] in (True, "full_shard auto_wrap")
