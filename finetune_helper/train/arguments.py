"""The run's ``SFTConfig`` arguments: the plan's, the recipe's ``training:`` overrides (typed and checked as the
fields they set) and what this machine needs, built once as a real ``SFTConfig`` before anything is written, so
that a bad value is a one-line error naming it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..errors import FinetuneHelperError, first_line
from ..export.versions import RENAMES
from .preflight import check_deepspeed
from .recipe import Recipe
from .setup import zero_strategy


def sft_kwargs_for(recipe: Recipe, plan, run_dir: Path, device: str, *, dry_run: bool, has_eval: bool,
                trl_kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The ``SFTConfig`` keyword arguments of the run (the plan's, the recipe's overrides, what this machine needs)
    checked by building an SFTConfig once, and the adaptations to this machine, each said in a line."""
    from ..export.training_args import training_kwargs

    overrides = check_training_values(dict(recipe.training))  # typed at once: max_steps=abc is a field error
    adaptations: list[str] = []
    kwargs = training_kwargs(plan, str(run_dir), sft=True, **{"seed": recipe.seed, **overrides})
    kwargs.pop("model_init_kwargs", None)  # the runner loads the model itself (train/load.py), as the setup says
    _check_deepspeed(kwargs, device, dry_run=dry_run)
    if device == "cpu" and dry_run:
        adaptations.append("no CUDA GPU on this machine: a run here would train on the CPU in fp32")
    elif device == "cpu" and overrides.get("bf16") is True:
        kwargs.update(use_cpu=True, bf16=True, fp16=False)
        adaptations.append("no CUDA GPU: training on the CPU under bf16 autocast (training.bf16=true; use_cpu=True)")
    elif device == "cpu":
        kwargs.update(use_cpu=True, bf16=False, fp16=False)
        adaptations.append("no CUDA GPU: training on the CPU in fp32 (use_cpu=True, bf16/fp16 off)")
        if plan.optim not in ("adamw_torch", "adamw_torch_fused", "sgd", "adafactor") and "optim" not in overrides:
            kwargs["optim"] = "adamw_torch"
            adaptations.append(f"optim {plan.optim} needs bitsandbytes on CUDA: adamw_torch on the CPU")
    if device == "cpu" and not dry_run and kwargs.get("fsdp"):
        # accelerate routes FSDP to GPU-like devices only: CPU processes would silently replicate; say so instead
        kwargs = {k: v for k, v in kwargs.items() if k not in ("fsdp", "fsdp_config")}
        adaptations.append("no CUDA GPU: FSDP is accelerate's on GPUs only; the CPU processes train data parallel "
                           "(DDP, gloo), the model replicated")
    if "lr_scheduler_kwargs" not in overrides and ("lr_scheduler_type" in overrides or int(
            overrides.get("max_steps", -1)) > 0):
        # the schedule's own settings follow the schedule that runs (training.lr_scheduler_type) and its length
        # (training.max_steps): cosine_with_min_lr's min_lr_rate is no argument of linear, say
        from ..recommender.rules import scheduler_kwargs
        from ..recommender.schedule import warmup_steps_for

        total = int(overrides.get("max_steps", -1))
        total = total if total > 0 else plan.total_steps
        warmup = warmup_steps_for(kwargs.get("warmup_steps", kwargs.get("warmup_ratio", 0)) or 0, total)
        schedule = str(overrides.get("lr_scheduler_type", plan.lr_scheduler_type))
        kwargs.pop("lr_scheduler_kwargs", None)
        if schedule != "step_decay" and (options := scheduler_kwargs(schedule, total, warmup)):
            kwargs["lr_scheduler_kwargs"] = options
    # keep checkpoints on logging steps, so a diverged loss is seen before it can be saved
    logging_steps = int(kwargs.get("logging_steps", 10))
    if "save_steps" in kwargs and "save_steps" not in overrides:
        kwargs["save_steps"] = max(logging_steps, math.ceil(kwargs["save_steps"] / logging_steps) * logging_steps)
    kwargs.setdefault("include_num_input_tokens_seen", "non_padding")
    kwargs.setdefault("logging_nan_inf_filter", False)  # the Trainer would hide NaN/inf losses from the guard
    kwargs.setdefault("disable_tqdm", True)
    # DDP: every trainable parameter takes part in each step (find_unused_parameters would walk the graph each time)
    kwargs.setdefault("ddp_find_unused_parameters", False)
    kwargs.setdefault("save_total_limit", 3)
    if overrides.get("bf16") is True and device == "cuda" and not plan.request.gpu.bf16:
        raise FinetuneHelperError("training.bf16", f"{plan.request.gpu.name} has no bf16: leave it out (the plan "
                                  "trains in fp16 with loss scaling there)")
    if not has_eval and str(overrides.get("eval_strategy", "no")) != "no":
        raise FinetuneHelperError("training.eval_strategy", f"{overrides['eval_strategy']!r} needs held-out data: set "
                                  "data.eval_fraction above 0 (or eval_strategy to no)")
    if has_eval:
        kwargs.setdefault("eval_strategy", "steps")
        kwargs.setdefault("eval_steps", kwargs.get("save_steps", 100))
        kwargs.setdefault("per_device_eval_batch_size", kwargs["per_device_train_batch_size"])
    sft = {"max_length": plan.request.resolved_seq_len, "packing": recipe.data.packing, **trl_kwargs}
    if recipe.data.packing:
        sft["padding_free"] = True
        attn = recipe.model.attn_implementation or plan.request.model.default_attn_implementation
        if attn != "flash_attention_2" or device == "cpu":
            adaptations.append(
                "data.packing: padding-free rows are attended as one masked sequence without flash_attention_2, "
                "quadratic in the packed length (benchmarks/train_throughput.py: 2.7x slower than padded batches on "
                "the CPU); on a GPU set model.attn_implementation=flash_attention_2")
    if recipe.trainer == "transformers" and "remove_unused_columns" not in overrides:
        # transformers.Trainer would drop the columns its model's forward does not name (seq_lengths of packed
        # rows) before TRL's collator sees them; TRL's prepared data holds only what the collator reads
        sft["remove_unused_columns"] = False
    sft.update({k: v for k, v in overrides.items() if k in sft})  # training: completion_only_loss wins, say
    return _check_sft_config({**kwargs, **sft}, overrides, device), adaptations


def _check_deepspeed(sft_kwargs: dict[str, Any], device: str, *, dry_run: bool) -> None:
    zero = zero_strategy(sft_kwargs)
    if zero is not None:
        check_deepspeed(zero[0], device, dry_run=dry_run)


def _build(cls: type, kwargs: dict[str, Any]) -> Any:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(**kwargs)


def _culprit(cls: type, kwargs: dict[str, Any], overridden: set[str]) -> str | None:
    """The one recipe override without which ``cls(**kwargs)`` builds (the arguments the planner wrote build, so a
    failure is an override's), or None when no single one is."""
    for key in sorted(overridden):
        try:
            _build(cls, {k: v for k, v in kwargs.items() if k != key})
        except (TypeError, ValueError):
            continue
        return key
    return None


def _allowed_values(cls: type, field: str) -> list[str]:
    """The values an enumerated field takes (``lr_scheduler_type``: transformers' ``SchedulerType``, ``optim``...),
    from the field's type; empty for other fields."""
    import enum
    import typing

    hint = typing.get_type_hints(cls).get(field)
    for tp in typing.get_args(hint) or (hint,):
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            return [str(member.value) for member in tp]
    return []


#: TrainingArguments fields that must be positive when a recipe sets them
_POSITIVE_FIELDS = {"per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                    "learning_rate", "num_train_epochs", "logging_steps", "save_steps", "eval_steps", "max_length",
                    "max_steps"}


def check_training_values(training: dict[str, Any]) -> dict[str, Any]:
    """The recipe's ``training:`` values typed as the SFTConfig fields they set (``"3e-4"`` -> float), with
    one-line errors naming ``training.<key>``; needs no plan (``finetune-helper validate`` uses it)."""
    import typing

    from trl import SFTConfig

    from .recipe import _coerce

    hints = typing.get_type_hints(SFTConfig)
    simple = (int, float, bool, int | None, float | None, bool | None)
    out = dict(training)
    for key, value in training.items():
        tp = hints.get(key)
        if tp in simple:
            out[key] = value = _coerce(value, tp, f"training.{key}")
        if key in _POSITIVE_FIELDS and not (isinstance(value, (int, float)) and value > 0):
            raise FinetuneHelperError(f"training.{key}", f"must be > 0, got {value!r}")
    return out


def _check_sft_config(sft_kwargs: dict[str, Any], overrides: dict[str, Any], device: str) -> dict[str, Any]:
    """Type-check the recipe's ``training:`` values against the SFTConfig fields and build the SFTConfig once, before
    anything is written, so a bad value is a one-line error naming it. Returns the kwargs with coerced values."""

    from trl import SFTConfig

    # an override may name a setting by the other transformers version's name (warmup_ratio, gradient_checkpointing):
    # the export wrote it under the installed version's name
    present = {k: k if k in sft_kwargs else RENAMES.get(k, k) for k in overrides}
    typed = check_training_values({name: sft_kwargs[name] for name in present.values() if name in sft_kwargs})
    sft_kwargs = {**sft_kwargs, **typed}
    probe = dict(sft_kwargs)
    if device == "cpu":  # a dry run on a machine without the planned GPU: check the values, not the hardware
        probe.update(use_cpu=True, bf16=False, fp16=False)
    try:
        _build(SFTConfig, probe)
    except (TypeError, ValueError) as exc:
        key = _culprit(SFTConfig, probe, {present[k] for k in overrides if present[k] in probe})
        if key is None:
            raise FinetuneHelperError("training", f"the TrainingArguments do not build: {first_line(exc)}") from None
        allowed = _allowed_values(SFTConfig, key)
        raise FinetuneHelperError(f"training.{key}", f"{probe[key]!r} is refused: "
                                  + (f"choose from {', '.join(allowed)}" if allowed else first_line(exc))) from None
    return sft_kwargs
