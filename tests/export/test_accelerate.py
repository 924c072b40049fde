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


@pytest.mark.parametrize("strategy, offload", [("zero2", "none"), ("zero2", "optimizer"), ("zero3", "none"),
                                               ("zero3", "all")])
def test_a_deepspeed_plan_exports_configs_accelerate_and_deepspeed_accept(tmp_path, capsys, strategy, offload):
    """The accelerate config (accelerate's loader, its DeepSpeedPlugin) and the TrainingArguments' ``deepspeed``
    config after the Trainer fills its "auto" values (DeepSpeed's own config checker, ``DeepSpeedConfig``)."""
    pytest.importorskip("deepspeed")
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DeepSpeedPlugin
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers import AutoModelForCausalLM, HfArgumentParser, LlamaConfig, TrainingArguments

    args = ["--model", "meta-llama/Llama-3.1-8B", "--gpu", "RTX 4090", "--gpus", "2", "--method", "full",
            "--strategy", strategy, "--offload", offload, "--dataset-size", "2000"]
    config = load_config_from_file(str(export(tmp_path, *args)))
    assert str(config.distributed_type).endswith("DEEPSPEED") and config.num_processes == 2
    ds = config.deepspeed_config
    assert ds["zero_stage"] == int(strategy[-1])
    assert ds["offload_optimizer_device"] == ("cpu" if offload != "none" else "none")
    assert ds["offload_param_device"] == ("cpu" if offload == "all" else "none")
    DeepSpeedPlugin(**{k: v for k, v in ds.items()})  # accelerate's own checks of these fields

    yaml_path = tmp_path / "args.yaml"
    assert cli.main(["export", *args, "--format", "yaml", "-o", str(yaml_path)]) == 0
    exported = yaml.safe_load(yaml_path.read_text())
    assert exported["gradient_accumulation_steps"] == ds["gradient_accumulation_steps"]
    # built before the arguments: a ZeRO-3 config makes transformers build models under deepspeed.zero.Init
    model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                                         num_hidden_layers=2, num_attention_heads=4))
    cpu_path = tmp_path / "args_cpu.yaml"  # this machine has no GPU: bf16 is allowed under use_cpu
    cpu_path.write_text(yaml.safe_dump({**exported, "use_cpu": True}))
    (training,) = HfArgumentParser(TrainingArguments).parse_yaml_file(str(cpu_path))
    assert training.deepspeed == exported["deepspeed"]  # read back equal
    filled = training.hf_deepspeed_config
    filled.trainer_config_finalize(training, model, num_training_steps=100)
    checked = DeepSpeedConfig(filled.config)  # raises on a bad or inconsistent config
    assert checked.zero_optimization_stage == int(strategy[-1])
    assert checked.train_micro_batch_size_per_gpu == training.per_device_train_batch_size
    assert checked.gradient_clipping == training.max_grad_norm
    assert checked.bfloat16_config.enabled
    assert (checked.zero_config.offload_optimizer is not None) == (offload != "none")
    assert (checked.zero_config.offload_param is not None) == (offload == "all")
