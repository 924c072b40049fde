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
from ..recommender.throughput import describe
from ..recommender.training_setup import TORCH_DTYPE_NAMES
from ..recommender.zero import ZERO_STAGES
from ..units import fmt_gib
from .training_args import build_kwargs, config_class, load_dtype
from .versions import Names, names_for

if TYPE_CHECKING:  # pragma: no cover
    from ..recommender.plan import Plan

FORMATS = ("json", "yaml", "python", "cli", "accelerate")
#: the formats that cannot carry a comment: their header goes to stderr (``finetune-helper export``)
PLAIN_FORMATS = ("json", "cli")
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
#: how the header names each trainer and its loss path
TRAINER_LABELS = {"trl": "TRL's SFTTrainer (its fused LM head: no vocabulary-wide logits)",
                  "transformers": "transformers.Trainer (the model's own loss: full logits, upcast to fp32)"}
#: QLoRA's base, as the runner loads it (``train/load.py``) and QLoRA's paper trains (Dettmers et al. 2023: NF4,
#: double quantization)
QLORA_QUANTIZATION = ("BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', "
                      "bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.{compute})")


def _trl_version() -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version("trl")
    except importlib.metadata.PackageNotFoundError:
        return None


def _written_for(plan: Plan, names: Names) -> str:
    trl = _trl_version() if plan.request.trainer == "trl" else None
    return names.label + (f" and TRL {trl}" if trl else "")


def _lora_line(plan: Plan) -> str | None:
    r = plan.request
    if r.method == "full":
        return None
    targets = r.lora_target_modules if isinstance(r.lora_target_modules, str) else list(r.lora_target_modules)
    return (f"LoRA: peft.LoraConfig(r={r.lora_r}, lora_alpha={r.lora_alpha}, lora_dropout={r.lora_dropout}, "
            f"target_modules={targets!r}, task_type='CAUSAL_LM'); the learning rate is scaled for alpha "
            f"{r.lora_alpha}")


def _load_line(plan: Plan) -> str:
    dtype = load_dtype(plan)
    why = {"full": "fp32 master weights, as planned" if dtype == "float32" else "pure-bf16 weights, as planned",
           "lora": "the frozen base in the compute dtype", "qlora": "the adapters' compute dtype"}[plan.request.method]
    line = (f"load the model with dtype=torch.{dtype} ({why}; transformers 5 loads the checkpoint's own dtype unless "
            "told")
    line += ", TRL float32: SFTConfig.model_init_kwargs carries it)" if plan.request.trainer == "trl" else ")"
    if plan.request.method == "qlora":
        line += " and quantization_config=" + QLORA_QUANTIZATION.format(compute=TORCH_DTYPE_NAMES[plan.request.dtype])
    return line


def header(plan: Plan, version: str | None = None) -> list[str]:
    """What every format states about the plan (as comments, or on stderr where the format takes none): the
    arguments class and versions, the trainer planned for and the peak planned at, for ``trl`` what the same batch
    needs under ``transformers.Trainer``, the sequence length, how to load the model, LoRA's settings, how to
    launch several processes, and a warning when the plan does not fit."""
    names = names_for(version)
    r = plan.request
    peak = plan.peak_memory_bytes
    where = " on the CPU" if r.device == "cpu" else " per GPU"
    lines = [f"{config_class(plan)} for {r.model.name}, {r.method} fine-tuning on {r.gpus} x {r.gpu.name}, written "
             f"by finetune-helper for {_written_for(plan, names)}",
             f"planned for {TRAINER_LABELS[r.trainer]}: peak {fmt_gib(peak)}{where} of a {fmt_gib(r.budget_bytes)} "
             f"budget ({'fits' if plan.fits else 'DOES NOT FIT'})"]
    if r.trainer == "trl":
        other = plan.under_trainer("transformers")
        lines.append(f"under transformers.Trainer the same batch ({plan.per_device_train_batch_size}) would need "
                     f"{fmt_gib(other['peak_memory_bytes'])} ({'fits' if other['fits'] else 'does not fit'}): "
                     f"export --trainer transformers plans batch {other['per_device_train_batch_size']} for it")
    lines.append(f"effective batch {plan.effective_batch_size}, about {plan.total_steps} optimizer steps; "
                 f"max_length {r.resolved_seq_len} tokens per sequence"
                 + (", packed padding-free" if r.packing else ""))
    speed = describe(plan.time(), r.gpu.name, plan.total_steps)
    if speed:
        lines.append(speed)
    lines.append(_load_line(plan))
    lora = _lora_line(plan)
    if lora:
        lines.append(lora)
    if r.gpus > 1 or plan.distributed in ZERO_STAGES:
        lines.append(f"several processes ({plan.distributed}): {launch_command(plan)} (export --format accelerate "
                     "writes accelerate_config.yaml; train.py: your script, reading this file with HfArgumentParser)")
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
    return _FIELD_COMMENTS.get(key)


#: why the trainer's own fields are there (:func:`.training_args.trainer_fields`)
_FIELD_COMMENTS = {
    "max_length": "the sequence length the plan was made for (longer examples are truncated)",
    "packing": "as planned: packed rows count as one sequence of max_length",
    "model_init_kwargs": "the weights' dtype as planned (SFTTrainer(model=<id>) loads float32 unless told)",
    "use_cpu": "planned for the CPU (--device cpu)",
}


def to_json(plan: Plan, output_dir: str, version: str | None = None) -> str:
    """For ``HfArgumentParser(SFTConfig or TrainingArguments).parse_json_file``; JSON takes no comments: the
    :func:`header` goes to stderr (``finetune-helper export``)."""
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
    """For ``HfArgumentParser(SFTConfig or TrainingArguments).parse_yaml_file``; the :func:`header` as comments,
    each setting commented with its reason."""
    import yaml

    kwargs = build_kwargs(plan, output_dir, names_for(version), {})
    dumper = _yaml_dumper()
    lines = [f"# {line}" for line in header(plan, version)]
    for key, value in kwargs.items():
        text = yaml.dump({key: value}, Dumper=dumper, default_flow_style=True, sort_keys=False,
                         width=math.inf, allow_unicode=True).strip()
        text = text[1:-1] if text.startswith("{") and text.endswith("}") else text  # {k: v} -> k: v
        comment = _comment(plan, key)
        lines.append(f"{text}  # {comment}" if comment and "\n" not in text else text)
    return "\n".join(lines) + "\n"


def to_python(plan: Plan, output_dir: str, version: str | None = None) -> str:
    """A runnable snippet building ``args = SFTConfig(...)`` (or ``TrainingArguments``), the model loaded as planned
    (``load_model()``) and LoRA's settings (``lora_config()``); run as a script it prints the args as JSON."""
    kwargs = build_kwargs(plan, output_dir, names_for(version), {})
    cls, r = config_class(plan), plan.request
    module = "trl" if cls == "SFTConfig" else "transformers"
    lines = ['"""' + header(plan, version)[0] + '."""', ""]
    lines += [f"# {line}" for line in header(plan, version)[1:]]
    lines += ["", f"from {module} import {cls}", "", f"MODEL = {r.model.name!r}", "", f"args = {cls}("]
    for key, value in kwargs.items():
        line = f"    {key}={value!r},"
        comment = _comment(plan, key)
        lines.append(f"{line}  # {comment}" if comment else line)
    lines += [")", "", ""] + _load_model_function(plan)
    if r.method != "full":
        targets = r.lora_target_modules if isinstance(r.lora_target_modules, str) else list(r.lora_target_modules)
        how = ("SFTTrainer(peft_config=lora_config())" if cls == "SFTConfig" else
               "peft.get_peft_model(model, lora_config())")
        lines += ["", "", "def lora_config():", f'    """The adapters the learning rate was scaled for: {how}."""',
                  "    from peft import LoraConfig", "",
                  f"    return LoraConfig(r={r.lora_r}, lora_alpha={r.lora_alpha}, lora_dropout={r.lora_dropout}, "
                  f"target_modules={targets!r}, task_type='CAUSAL_LM')"]
    lines += ["", "", 'if __name__ == "__main__":', "    print(args.to_json_string())"]
    return "\n".join(lines) + "\n"


def _load_model_function(plan: Plan) -> list[str]:
    """``def load_model()``: ``from_pretrained`` with the planned dtype (and QLoRA's NF4 quantization)."""
    qlora = plan.request.method == "qlora"
    imports = "AutoModelForCausalLM, BitsAndBytesConfig" if qlora else "AutoModelForCausalLM"
    extra = (", quantization_config=" + QLORA_QUANTIZATION.format(compute=TORCH_DTYPE_NAMES[plan.request.dtype])
             if qlora else "")
    how = ("SFTTrainer(model=MODEL, args=args) loads it the same way from model_init_kwargs"
           + (" (pass quantization_config= to SFTTrainer too)" if qlora else "")
           if plan.request.trainer == "trl" else "pass it to Trainer(model=...)")
    return ["def load_model():", f'    """The model as planned: {how}."""', "    import torch",
            f"    from transformers import {imports}", "",
            f"    return AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.{load_dtype(plan)}{extra})"]


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
    """``--key value`` arguments on one line, for a script that parses ``SFTConfig`` or ``TrainingArguments`` with
    ``HfArgumentParser`` (``python train.py <these>``); booleans are written ``--bf16 True``, dicts as JSON, and
    ``fsdp=True`` as the bare ``--fsdp`` (the field is ``str | None`` with ``const=True``: ``--fsdp True`` would be
    the option string "True", which transformers refuses).  The :func:`header` goes to stderr."""
    kwargs = build_kwargs(plan, output_dir, names_for(version), {})
    parts: list[str] = []
    for key, value in kwargs.items():
        if value is None:
            continue
        parts.append(f"--{key}")
        if key == "fsdp" and value is True:
            continue
        parts += [shlex.quote(v) for v in _cli_value(value)]
    return " ".join(parts) + "\n"


def to_accelerate(plan: Plan, output_dir: str, version: str | None = None) -> str:  # noqa: ARG001 (output_dir)
    """An ``accelerate launch --config_file`` YAML for the plan's processes, as ``accelerate config`` writes it:
    one process (``NO``), data parallel (``MULTI_GPU``), FSDP (version 2, each decoder layer a unit, full
    sharding, sharded checkpoints, checkpointing as FSDP's own) or DeepSpeed; mixed precision as the plan's.  Pair
    it with the arguments of ``--format yaml`` (the same plan), which hold what takes effect: the Trainer builds
    accelerate's FSDP plugin from ``fsdp_config`` over this file's values, and with a ``deepspeed`` config in the
    arguments accelerate refuses the ZeRO settings (stage, accumulation, clipping, offload, mixed precision) here
    too (``DeepSpeedPlugin._deepspeed_config_checks``): this file then names DeepSpeed and ZeRO-3's init only, as
    ``accelerate config`` writes it for a DeepSpeed config of its own."""
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
        del config["mixed_precision"]  # the deepspeed config's bf16 / fp16 ("auto": the arguments' own)
        config["deepspeed_config"] = {"zero3_init_flag": True} if ZERO_STAGES[plan.distributed] == 3 else {}
    lines = [f"accelerate config for {r.model.name}: {plan.distributed or 'one process'}, to launch the arguments of "
             "export --format yaml (the same plan)", f"launch: {launch_command(plan)}"]
    if distributed == "DEEPSPEED":
        lines.append(f"ZeRO-{ZERO_STAGES[plan.distributed]}"
                     + (f" with offload {r.offload}" if r.offload != "none" else "") + ": stage, offload, "
                     "accumulation and clipping are in the arguments' deepspeed config (accelerate refuses them in "
                     "both places)")
    lines += header(plan, version)[1:]
    return "".join(f"# {line}\n" for line in lines) + yaml.safe_dump(config, sort_keys=False)


def launch_command(plan: Plan, config_file: str = "accelerate_config.yaml") -> str:  # noqa: ARG001
    """The command that runs a training script (``train.py``: yours, parsing the arguments of ``--format yaml``
    with ``HfArgumentParser``) under the exported accelerate config (multi-node: add ``--num_machines``,
    ``--machine_rank``, ``--main_process_ip`` and ``--main_process_port`` on each node)."""
    return f"accelerate launch --config_file {shlex.quote(str(config_file))} train.py args.yaml"


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


__all__ = ["FORMATS", "PLAIN_FORMATS", "header", "launch_command", "render", "to_accelerate", "to_cli", "to_json",
           "to_python", "to_yaml"]
