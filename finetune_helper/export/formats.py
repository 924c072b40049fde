"""The plan as text that rebuilds its ``TrainingArguments``: JSON / YAML (for ``HfArgumentParser``), a Python
snippet, or ``--flag value`` arguments, written for the installed transformers or a named version.

The text exports never import transformers or torch (importing them costs seconds); the names come from
:mod:`.versions`, the values from :mod:`.training_args`.  YAML and Python carry each setting's reason as a comment.
"""

from __future__ import annotations

import json
import math
import shlex
from typing import TYPE_CHECKING, Any

from ..errors import FinetuneHelperError
from ..recommender.zero import ZERO_STAGES
from .training_args import build_kwargs
from .versions import Names, names_for

if TYPE_CHECKING:  # pragma: no cover
    from ..recommender.plan import Plan

FORMATS = ("json", "yaml", "python", "cli", "accelerate")
#: ``plan.reasons`` key that explains each exported argument (both versions' names).
REASON_KEYS = {
    "per_device_train_batch_size": "per_device_train_batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "learning_rate": "learning_rate",
    "warmup_ratio": "warmup_ratio",
    "warmup_steps": "warmup_ratio",
    "gradient_checkpointing": "gradient_checkpointing",
    "activation_checkpointing": "gradient_checkpointing",
    "optim": "optim",
    "bf16": "precision",
    "fp16": "precision",
    "lr_scheduler_type": "lr_scheduler_type",
    "max_grad_norm": "max_grad_norm",
    "weight_decay": "weight_decay",
}


def _header(plan: Plan, names: Names) -> list[str]:
    r = plan.request
    lines = [f"TrainingArguments for {r.model.name}, {r.method} fine-tuning on {r.gpus} x {r.gpu.name}, "
             f"written by finetune-helper for {names.label}",
             f"effective batch {plan.effective_batch_size}, about {plan.total_steps} optimizer steps"]
    if not plan.fits:
        lines.append("WARNING: this plan does not fit in GPU memory: " + _one_line(plan.reasons.get("fits", "")))
    return lines


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _comment(plan: Plan, key: str) -> str | None:
    if key in REASON_KEYS and REASON_KEYS[key] in plan.reasons:
        return _one_line(plan.reasons[REASON_KEYS[key]])
    if key == "num_train_epochs" and "total_steps" in plan.reasons:
        return "total steps: " + _one_line(plan.reasons["total_steps"])
    if key == "logging_steps":
        return "about 50 log lines on a short run, every 10 steps on a long one"
    if key == "save_steps":
        return "about five checkpoints on a short run, every 500 steps on a long one"
    return None


def to_json(plan: Plan, output_dir: str, version: str | None = None) -> str:
    """For ``HfArgumentParser(TrainingArguments).parse_json_file``."""
    return json.dumps(build_kwargs(plan, output_dir, names_for(version), {}), indent=2) + "\n"


def _yaml_float(value: float) -> str:
    """A float PyYAML (YAML 1.1) reads back as a float: a dot, and a signed exponent (``2.0e-05``, not ``2e-5``)."""
    if math.isnan(value):
        return ".nan"
    if math.isinf(value):
        return ".inf" if value > 0 else "-.inf"
    text = repr(float(value)).lower()
    mantissa, _, exponent = text.partition("e")
    if "." not in mantissa:
        mantissa += ".0"
    if exponent and exponent[0] not in "+-":
        exponent = "+" + exponent
    return mantissa + ("e" + exponent if exponent else "")


def _yaml_dumper() -> type:
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(float, lambda d, v: d.represent_scalar("tag:yaml.org,2002:float", _yaml_float(v)))
    return Dumper


def to_yaml(plan: Plan, output_dir: str, version: str | None = None) -> str:
    """For ``HfArgumentParser(TrainingArguments).parse_yaml_file``; each setting commented with its reason."""
    import yaml

    names = names_for(version)
    kwargs = build_kwargs(plan, output_dir, names, {})
    dumper = _yaml_dumper()
    lines = [f"# {line}" for line in _header(plan, names)]
    for key, value in kwargs.items():
        text = yaml.dump({key: value}, Dumper=dumper, default_flow_style=True, sort_keys=False,
                         width=math.inf, allow_unicode=True).strip()
        text = text[1:-1] if text.startswith("{") and text.endswith("}") else text  # {k: v} -> k: v
        comment = _comment(plan, key)
        lines.append(f"{text}  # {comment}" if comment and "\n" not in text else text)
    return "\n".join(lines) + "\n"


def to_python(plan: Plan, output_dir: str, version: str | None = None) -> str:
    """A runnable snippet building ``args = TrainingArguments(...)``; run as a script it prints the args as JSON."""
    names = names_for(version)
    kwargs = build_kwargs(plan, output_dir, names, {})
    lines = ['"""' + _header(plan, names)[0] + '."""', ""]
    lines += [f"# {line}" for line in _header(plan, names)[1:]]
    lines += ["", "from transformers import TrainingArguments", "", "args = TrainingArguments("]
    for key, value in kwargs.items():
        line = f"    {key}={value!r},"
        comment = _comment(plan, key)
        lines.append(f"{line}  # {comment}" if comment else line)
    lines += [")", "", 'if __name__ == "__main__":', "    print(args.to_json_string())"]
    return "\n".join(lines) + "\n"


def _cli_value(value: Any) -> list[str]:
    if isinstance(value, bool):
        return [str(value)]
    if isinstance(value, float):
        return [repr(value)]
    if isinstance(value, dict):
        return [json.dumps(value)]
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [str(value)]


def to_cli(plan: Plan, output_dir: str, version: str | None = None) -> str:
    """``--key value`` arguments on one line, for a script that parses ``TrainingArguments`` with
    ``HfArgumentParser`` (``python train.py <these>``); booleans are written ``--bf16 True``."""
    kwargs = build_kwargs(plan, output_dir, names_for(version), {})
    parts: list[str] = []
    for key, value in kwargs.items():
        if value is None:
            continue
        parts.append(f"--{key}")
        parts += [shlex.quote(v) for v in _cli_value(value)]
    return " ".join(parts) + "\n"


def to_accelerate(plan: Plan, output_dir: str, version: str | None = None) -> str:  # noqa: ARG001
    """An ``accelerate launch --config_file`` YAML for the plan's processes, as ``accelerate config`` writes it:
    one process (``NO``), data parallel (``MULTI_GPU``), FSDP (version 2, each decoder layer a unit, full
    sharding, sharded checkpoints, checkpointing as FSDP's own) or DeepSpeed (the ZeRO stage and offload); mixed
    precision as the plan's.  Pair it with the TrainingArguments of ``--format yaml`` (the same plan: its ``fsdp`` /
    ``fsdp_config`` or ``deepspeed`` fields match)."""
    import yaml

    r = plan.request
    distributed = {"fsdp": "FSDP", "ddp": "MULTI_GPU", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED"}.get(
        plan.distributed or "", "NO" if r.gpus == 1 else "MULTI_GPU")
    config: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE", "debug": False, "distributed_type": distributed,
        "downcast_bf16": "no", "enable_cpu_affinity": False, "machine_rank": 0, "main_training_function": "main",
        "mixed_precision": "bf16" if plan.bf16 else "fp16" if plan.fp16 else "no", "num_machines": 1,
        "num_processes": r.gpus, "rdzv_backend": "static", "same_network": True, "tpu_env": [],
        "tpu_use_cluster": False, "tpu_use_sudo": False, "use_cpu": False,
    }
    if distributed == "FSDP":
        layer = r.model.decoder_layer_class()
        config["fsdp_config"] = {
            "fsdp_version": 2, "fsdp_reshard_after_forward": True, "fsdp_offload_params": False,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            **({"fsdp_transformer_layer_cls_to_wrap": layer} if layer else {}),
            "fsdp_state_dict_type": "SHARDED_STATE_DICT", "fsdp_cpu_ram_efficient_loading": True,
            "fsdp_activation_checkpointing": bool(plan.gradient_checkpointing),
        }
    if distributed == "DEEPSPEED":
        stage = ZERO_STAGES[plan.distributed]
        config["deepspeed_config"] = {
            "zero_stage": stage, "gradient_accumulation_steps": plan.gradient_accumulation_steps,
            "gradient_clipping": plan.max_grad_norm,
            "offload_optimizer_device": "cpu" if r.offload in ("optimizer", "all") else "none",
            "offload_param_device": "cpu" if r.offload == "all" else "none",
            **({"zero3_init_flag": True, "zero3_save_16bit_model": True} if stage == 3 else {}),
        }
    header = [f"accelerate config for {r.model.name}, {r.method} fine-tuning on {r.gpus} x {r.gpu.name}: "
              f"{plan.distributed or 'one process'}, written by finetune-helper",
              f"launch: {launch_command(plan)}"]
    if not plan.fits:
        header.append("WARNING: this plan does not fit in GPU memory: " + _one_line(plan.reasons.get("fits", "")))
    return "".join(f"# {line}\n" for line in header) + yaml.safe_dump(config, sort_keys=False)


def launch_command(plan: Plan, config_file: str = "accelerate_config.yaml") -> str:
    """The command that runs a training script under the exported accelerate config (multi-node: add
    ``--num_machines``, ``--machine_rank``, ``--main_process_ip`` and ``--main_process_port`` on each node)."""
    return f"accelerate launch --config_file {config_file} train.py  # train.py parses --format yaml's TrainingArguments"


_RENDERERS = {"json": to_json, "yaml": to_yaml, "python": to_python, "cli": to_cli, "accelerate": to_accelerate}


def render(plan: Plan, fmt: str, output_dir: str, version: str | None = None) -> str:
    """The plan as ``fmt`` text: one of json, yaml, python, cli, accelerate. Imports neither transformers nor
    torch."""
    try:
        renderer = _RENDERERS[fmt]
    except (KeyError, TypeError):
        raise FinetuneHelperError("format", f"{fmt!r} is not an export format; choose from {', '.join(FORMATS)}") \
            from None
    if plan.lr_scheduler_type == "step_decay" and fmt != "accelerate":
        raise FinetuneHelperError("scheduler", "step_decay has no TrainingArguments type (transformers' get_scheduler "
                                  "has none): finetune-helper run applies it (a LambdaLR given to the Trainer) from a "
                                  "recipe with recommend.scheduler: step_decay; export another --scheduler here")
    return renderer(plan, output_dir, version=version)


__all__ = ["FORMATS", "launch_command", "render", "to_accelerate", "to_cli", "to_json", "to_python", "to_yaml"]
