"""``export --format accelerate``: a config that accelerate's own loader reads, and that runs together with the
arguments export of the same plan under ``accelerate launch``, up to the trainer's construction, in the environment
the launcher builds from the config (where accelerate's DeepSpeed checks refuse ZeRO settings given twice and the
arguments' ``fsdp_config`` overrides the config's FSDP settings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import finetune_helper as fh
from finetune_helper import cli

#: integration tier (make test-integration): real launcher processes
pytestmark = pytest.mark.integration

TINY = Path(fh.__file__).resolve().parent / "train" / "tiny-base"

#: the user's script: the exported arguments, the model by name and a few rows, the trainer the export is for; what
#: each worker then holds is written to a file of its own.  On CUDA accelerate starts DeepSpeed's communication
#: itself (its PartialState, NCCL); without CUDA it never does, so the script starts it with gloo first.
SCRIPT = """
import json, os, sys
if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo")
from datasets import Dataset
from transformers import HfArgumentParser
from trl import SFTConfig, SFTTrainer

(args,) = HfArgumentParser(SFTConfig).parse_yaml_file(sys.argv[1])
rows = Dataset.from_list([{"text": "1 2 3 4 5 6 7 8"}] * 8)
trainer = SFTTrainer(model=sys.argv[2], args=args, train_dataset=rows)
state = trainer.accelerator.state
ds = state.deepspeed_plugin
fsdp = args.fsdp_plugin_args or {}
report = {
    "distributed_type": str(state.distributed_type), "processes": state.num_processes,
    "zero_stage": ds.zero_stage if ds else None,
    "offload_optimizer": ds.offload_optimizer_device if ds else None,
    "offload_param": ds.offload_param_device if ds else None,
    "fsdp_state_dict_type": fsdp.get("state_dict_type"), "fsdp_ram_efficient": fsdp.get("cpu_ram_efficient_loading"),
    "env_use_fsdp": os.environ.get("ACCELERATE_USE_FSDP"), "env_state_dict": os.environ.get("FSDP_STATE_DICT_TYPE"),
    "batch": args.per_device_train_batch_size,
}
with open(os.path.join(sys.argv[3], f"worker-{os.getpid()}.json"), "w") as fh:
    json.dump(report, fh)
"""


def export(tmp_path: Path, fmt: str, *args: str) -> Path:
    out = tmp_path / ("accelerate_config.yaml" if fmt == "accelerate" else f"args.{fmt}")
    assert cli.main(["export", *args, "--format", fmt, "-o", str(out)]) == 0
    return out


@pytest.mark.parametrize("gpus, method, kind", [(1, "lora", "NO"), (2, "lora", "MULTI_GPU"), (8, "full", "FSDP")])
def test_accelerates_loader_reads_the_exported_config(tmp_path, gpus, method, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    path = export(tmp_path, "accelerate", "--model", "meta-llama/Llama-3.1-8B", "--gpu", "H100", "--gpus", str(gpus),
                  "--method", method)
    config = load_config_from_file(str(path))
    assert str(config.distributed_type).endswith(kind) and config.num_processes == gpus
    assert config.mixed_precision == "bf16"
    if kind == "FSDP":
        assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
        assert config.fsdp_config["fsdp_version"] == 2


def launch(tmp_path: Path, strategy: str, offload: str) -> list[dict]:
    """Both exports of the tiny model's 2-process plan, launched together; each worker's report."""
    plan_args = ["--model", str(TINY), "--gpu", "16GiB", "--gpus", "2", "--method", "full", "--strategy", strategy,
                 "--offload", offload, "--seq-len", "64", "--target-batch", "8"]
    config = export(tmp_path, "accelerate", *plan_args)
    arguments = export(tmp_path, "yaml", *plan_args)
    with arguments.open("a") as fh:  # this machine has no GPU: bf16 autocast is allowed under use_cpu
        fh.write("use_cpu: true\n")
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    port = {"ddp": 29561, "fsdp": 29562, "zero2": 29563, "zero3": 29564}[strategy] + (10 if offload != "none" else 0)
    done = subprocess.run([str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file", str(config),
                           "--main_process_port", str(port), str(script), str(arguments), str(TINY), str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(p.read_text()) for p in sorted(tmp_path.glob("worker-*.json"))]


@pytest.mark.slow
@pytest.mark.parametrize("strategy, offload", [("ddp", "none"), ("fsdp", "none"), ("zero2", "optimizer"),
                                               ("zero3", "none"), ("zero3", "all")])
def test_the_accelerate_config_and_the_arguments_run_together(tmp_path, strategy, offload):
    if strategy.startswith("zero"):
        pytest.importorskip("deepspeed")
    workers = launch(tmp_path, strategy, offload)
    assert len(workers) == 2 and all(w["processes"] == 2 for w in workers), workers
    for w in workers:
        if strategy.startswith("zero"):  # the ZeRO settings of the arguments' deepspeed config, accepted once
            assert w["distributed_type"].endswith("DEEPSPEED")
            assert w["zero_stage"] == int(strategy[-1])
            assert w["offload_optimizer"] == ("cpu" if offload != "none" else "none")
            assert w["offload_param"] == ("cpu" if offload == "all" else "none")
        if strategy == "fsdp":  # what takes effect is the arguments' fsdp_config, and it says what the config says
            assert w["env_use_fsdp"] == "true" and w["env_state_dict"] == "SHARDED_STATE_DICT"
            assert w["fsdp_state_dict_type"] == "SHARDED_STATE_DICT" and w["fsdp_ram_efficient"] is True


def test_a_deepspeed_export_writes_the_zero_settings_once(tmp_path):
    """accelerate refuses the ZeRO stage, accumulation, clipping, offload and mixed precision in its config when
    the arguments carry a deepspeed config (``DeepSpeedPlugin._deepspeed_config_checks``): the config names
    DeepSpeed and ZeRO-3's init only."""
    from accelerate.commands.config.config_args import load_config_from_file

    plan_args = ["--model", "meta-llama/Llama-3.1-8B", "--gpu", "H100", "--gpus", "2", "--method", "full",
                 "--strategy", "zero3", "--offload", "optimizer"]
    config = load_config_from_file(str(export(tmp_path, "accelerate", *plan_args)))
    assert str(config.distributed_type).endswith("DEEPSPEED") and config.deepspeed_config == {"zero3_init_flag": True}
    assert config.mixed_precision is None
    arguments = yaml.safe_load(export(tmp_path, "yaml", *plan_args).read_text())
    assert arguments["deepspeed"]["zero_optimization"]["stage"] == 3
    assert arguments["deepspeed"]["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


@pytest.mark.parametrize("strategy, offload", [("zero2", "none"), ("zero2", "optimizer"), ("zero3", "none"),
                                               ("zero3", "all")])
def test_the_deepspeed_config_deepspeed_accepts_after_the_trainer_fills_it(tmp_path, strategy, offload):
    """The arguments' ``deepspeed`` config after the Trainer fills its "auto" values passes DeepSpeed's own config
    checker (``DeepSpeedConfig``)."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers import AutoModelForCausalLM, HfArgumentParser, LlamaConfig
    from trl import SFTConfig

    args = ["--model", "meta-llama/Llama-3.1-8B", "--gpu", "RTX 4090", "--gpus", "2", "--method", "full",
            "--strategy", strategy, "--offload", offload, "--dataset-size", "2000"]
    exported = yaml.safe_load(export(tmp_path, "yaml", *args).read_text())
    # built before the arguments: a ZeRO-3 config makes transformers build models under deepspeed.zero.Init
    model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                                         num_hidden_layers=2, num_attention_heads=4))
    cpu_path = tmp_path / "args_cpu.yaml"  # this machine has no GPU: bf16 is allowed under use_cpu
    cpu_path.write_text(yaml.safe_dump({**exported, "use_cpu": True}))
    (training,) = HfArgumentParser(SFTConfig).parse_yaml_file(str(cpu_path))
    assert training.deepspeed == exported["deepspeed"]  # read back equal
    filled = training.hf_deepspeed_config
    filled.trainer_config_finalize(training, model, num_training_steps=100)
    checked = DeepSpeedConfig(filled.config)  # raises on a bad or inconsistent config
    assert checked.zero_optimization_stage == int(strategy[-1])
    assert checked.train_micro_batch_size_per_gpu == training.per_device_train_batch_size
    assert checked.gradient_accumulation_steps == training.gradient_accumulation_steps
    assert checked.gradient_clipping == training.max_grad_norm
    assert checked.bfloat16_config.enabled
    assert (checked.zero_config.offload_optimizer is not None) == (offload != "none")
    assert (checked.zero_config.offload_param is not None) == (offload == "all")
