"""The plan as ``TrainingArguments`` keyword arguments for a transformers version, and as a real object.

Settings the plan does not decide, added to every export:

* ``logging_steps = max(1, min(10, total_steps // 50))``: about 50 log lines on a short run, every 10 steps on a
  long one (a loss curve with enough points, without flooding the console);
* ``save_strategy="steps"`` with ``save_steps = max(logging_steps, min(500, ceil(total_steps / 5)))``: about five
  checkpoints on a short run, every 500 steps (the transformers default) on a long one. Full fine-tunes of large
  models write weights + optimizer states per checkpoint: add ``save_total_limit`` for those;
* ``report_to="none"`` (no tracker is assumed) and ``seed`` (``defaults.SEED``, 42);
* what the trainer the plan is for needs (:func:`trainer_fields`): for TRL's ``SFTConfig`` the sequence length and
  packing the plan was made for (``max_length``, ``packing``) and ``model_init_kwargs`` with the dtype the plan loads
  the weights in (TRL's ``create_model_from_path`` loads float32 unless told, transformers 5's ``from_pretrained`` the
  checkpoint's dtype); ``use_cpu`` for a plan made for the CPU (``--device cpu``).

The arguments are those of the class the plan's trainer reads (:func:`config_class`): ``SFTConfig`` for ``trl``,
``TrainingArguments`` for ``transformers``.

Overrides (keyword arguments of :func:`training_kwargs` / :func:`to_training_arguments`) win over all of these.
An override may use either version's name for the two renamed settings (:mod:`.versions`); it is written under the
target's name.  :func:`training_kwargs` imports neither transformers nor torch; :func:`to_training_arguments` does.
"""

from __future__ import annotations

import difflib
import math
from typing import TYPE_CHECKING, Any

from .. import defaults
from ..errors import FinetuneHelperError
from ..recommender.training_setup import TORCH_DTYPE_NAMES
from .versions import ALIASES, Names, installed_sft_field_names, installed_version, introspected_names, names_for

if TYPE_CHECKING:  # pragma: no cover
    from ..recommender.plan import Plan


def logging_steps_for(total_steps: int) -> int:
    """About 50 log lines on short runs, every 10 steps on long ones."""
    return max(1, min(10, total_steps // 50))


def save_steps_for(total_steps: int) -> int:
    """About five checkpoints on short runs, every 500 steps on long ones, never more often than logging."""
    return max(logging_steps_for(total_steps), min(500, math.ceil(total_steps / 5)))


def _check_override_names(overrides: dict[str, Any], names: Names, extra: frozenset[str] = frozenset()) -> None:
    if names.fields is None:
        return
    known = names.fields | ALIASES | extra
    for key in overrides:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise FinetuneHelperError(key, f"not a TrainingArguments argument in {names.label}{hint}")


def config_class(plan: Plan) -> str:
    """The arguments class the plan's trainer reads: ``SFTConfig`` (TRL) or ``TrainingArguments``."""
    return "SFTConfig" if plan.request.trainer == "trl" else "TrainingArguments"


def load_dtype(plan: Plan) -> str:
    """The torch dtype name the plan loads the model's weights in (``float32`` for mixed-precision full fine-tuning's
    master weights, ``bfloat16`` for pure bf16 or a LoRA base on a bf16 GPU, ...)."""
    return TORCH_DTYPE_NAMES[plan.setup.load_dtype]


def trainer_fields(plan: Plan) -> dict[str, Any]:
    """What the plan's trainer needs beyond the common ``TrainingArguments``: ``SFTConfig``'s sequence length,
    packing (padding-free, as the plan's step shape) and ``model_init_kwargs`` (the weights' dtype), and
    ``use_cpu`` for a plan made for the CPU."""
    fields: dict[str, Any] = {}
    if plan.request.trainer == "trl":
        fields.update(max_length=plan.request.resolved_seq_len, packing=plan.request.packing)
        if plan.request.packing:
            fields["padding_free"] = True
        fields["model_init_kwargs"] = {"dtype": load_dtype(plan)}
    if plan.request.device == "cpu":
        fields["use_cpu"] = True
    return fields


def build_kwargs(plan: Plan, output_dir: str, names: Names, overrides: dict[str, Any], *,
                 extra_fields: frozenset[str] = frozenset()) -> dict[str, Any]:
    if plan.request.trainer == "trl":
        extra_fields = extra_fields | installed_sft_field_names()
    _check_override_names(overrides, names, extra_fields)
    kwargs: dict[str, Any] = {"output_dir": str(output_dir)}
    kwargs.update(plan.training_kwargs())  # 4.x names: warmup_ratio, gradient_checkpointing
    steps = plan.total_steps
    kwargs.update(logging_steps=logging_steps_for(steps), save_strategy="steps", save_steps=save_steps_for(steps),
                  report_to="none", seed=defaults.SEED)
    kwargs.update(trainer_fields(plan))
    # An override under either name of a renamed setting replaces the plan's value under both names.
    if {"warmup_ratio", "warmup_steps"} & overrides.keys():
        kwargs.pop("warmup_ratio", None)
    if {"gradient_checkpointing", "activation_checkpointing"} & overrides.keys():
        kwargs.pop("gradient_checkpointing", None)
    for pair in (("warmup_ratio", "warmup_steps"), ("gradient_checkpointing", "activation_checkpointing")):
        if set(pair) <= overrides.keys():
            raise FinetuneHelperError(pair[1], f"give {pair[0]} or {pair[1]}, not both")
    kwargs.update(overrides)

    # Warmup: a ratio as warmup_ratio (4.x) or as a float warmup_steps < 1 (5.x).
    if names.warmup_ratio:
        steps_value = kwargs.get("warmup_steps")
        if isinstance(steps_value, float) and 0 < steps_value < 1:  # a 5.x-style ratio
            kwargs = _renamed(kwargs, "warmup_steps", "warmup_ratio", steps_value)
    elif "warmup_ratio" in kwargs:
        ratio = kwargs["warmup_ratio"]
        if not (isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and 0 <= ratio < 1):
            raise FinetuneHelperError("warmup_ratio", f"must be a number in [0, 1) to be written as warmup_steps "
                                      f"for {names.label}, got {ratio!r}")
        kwargs = _renamed(kwargs, "warmup_ratio", "warmup_steps", float(ratio))
    # Checkpointing: gradient_checkpointing (4.x) or activation_checkpointing (5.x; the old name warns).
    new, old = "activation_checkpointing", "gradient_checkpointing"
    src, dst = (old, new) if names.activation_checkpointing else (new, old)
    if src in kwargs:
        kwargs = _renamed(kwargs, src, dst, kwargs[src])
    if kwargs.get("fsdp") and "fsdp" not in overrides:
        kwargs = _fsdp(kwargs, plan, names)
    return kwargs


#: how an FSDP plan checkpoints and loads, in ``fsdp_config`` where they take effect (the Trainer builds accelerate's
#: FSDP plugin from ``fsdp_config``, ``TrainingArguments._process_fsdp_args``, over an accelerate config's values):
#: sharded checkpoints (each rank writes its shard: no full state dict gathered on rank 0; ``final/`` is saved whole,
#: ``train/finish.py``) and RAM-efficient loading (ranks above 0 load the checkpoint on the meta device and receive
#: rank 0's weights), as the accelerate export writes them
FSDP_CHECKPOINTING = {"state_dict_type": "SHARDED_STATE_DICT", "cpu_ram_efficient_loading": True}


def _fsdp(kwargs: dict[str, Any], plan: Plan, names: Names) -> dict[str, Any]:
    """An FSDP plan's arguments: every decoder layer a unit (``transformer_layer_cls_to_wrap``), checkpointing
    as FSDP's own (``fsdp_config.activation_checkpointing``: the Trainer's adds an AllGather in backward, the
    reason transformers' own FSDP docs and warning give, huggingface/transformers#30404), and
    :data:`FSDP_CHECKPOINTING`."""
    config = dict(kwargs.get("fsdp_config") or {})
    layer = plan.request.model.decoder_layer_class()
    if layer:
        config.setdefault("transformer_layer_cls_to_wrap", [layer])
    for key, value in FSDP_CHECKPOINTING.items():
        config.setdefault(key, value)
    for key in ("activation_checkpointing", "gradient_checkpointing"):
        if kwargs.get(key):
            kwargs[key] = False
            config["activation_checkpointing"] = True
    kwargs["fsdp_config"] = config
    if names.fsdp_flag:
        kwargs["fsdp"] = True
    return kwargs


def _renamed(kwargs: dict[str, Any], old: str, new: str, value: Any) -> dict[str, Any]:
    """``kwargs`` with ``old`` replaced by ``new`` = ``value`` at the same position."""
    return {(new if k == old else k): (value if k == old else v) for k, v in kwargs.items()}


def training_kwargs(plan: Plan, output_dir: str, *, version: str | None = None, sft: bool = False,
                    **overrides: Any) -> dict[str, Any]:
    """The plan's ``TrainingArguments`` keyword arguments, named for transformers ``version`` (default: the
    installed one), plus output, logging, saving and seed settings (see the module docstring); ``overrides`` win
    (``sft``: they may also name the installed TRL ``SFTConfig``'s own fields, for the runner).

    Imports neither transformers nor torch. Override names are checked against the installed version's fields
    (read from its source) when writing for the installed version; :func:`to_training_arguments` always checks."""
    extra = installed_sft_field_names() if sft else frozenset()
    return build_kwargs(plan, output_dir, names_for(version), overrides, extra_fields=extra)


def arguments_class(plan: Plan) -> type:
    """The class :func:`config_class` names, imported: TRL's ``SFTConfig`` or ``transformers.TrainingArguments``."""
    if plan.request.trainer == "trl":
        from trl import SFTConfig

        return SFTConfig
    from transformers import TrainingArguments

    return TrainingArguments


def to_training_arguments(plan: Plan, output_dir: str, **overrides: Any) -> Any:
    """A real arguments object of the plan's trainer (:func:`arguments_class`: TRL's ``SFTConfig``, a
    ``TrainingArguments`` subclass, or ``transformers.TrainingArguments``; imports it), with names chosen by
    introspecting the installed class; unknown override names raise :class:`FinetuneHelperError` with close
    matches."""
    cls = arguments_class(plan)
    kwargs = build_kwargs(plan, output_dir, introspected_names(), overrides)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        hint = ""
        if kwargs.get("bf16") and not kwargs.get("use_cpu") and "bf16" in str(exc):
            hint = (" (the plan is for a GPU with bfloat16 and this machine has none: to build the arguments here "
                    "anyway, pass use_cpu=True)")
        raise FinetuneHelperError("training-arguments", f"transformers {installed_version()} rejected the "
                                  f"arguments: {' '.join(str(exc).split())}{hint}") from exc


