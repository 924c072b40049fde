"""The one seam between the estimate and the run: the ``TrainingSetup`` of the step the runner executes.

:func:`executed_setup` reads it off what the runner really passes to the trainer (the ``SFTConfig`` arguments after
the recipe's overrides and the machine's adaptations) and the recipe; the runner loads and configures the model
from the same object (``setup.load_dtype``, attention, LoRA settings), and the estimate it reports in ``plan.json``
and ``summary.json`` is the estimate of this setup.  So an override of the batch, the optimizer, checkpointing,
``max_length`` or packing is re-estimated, and the loss path is the installed TRL's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..export.versions import trl_fuses_lm_head
from ..recommender.model import ModelSpec
from ..recommender.rules import DEFAULT_OPTIM
from ..recommender.training_setup import TrainingSetup, step_shape
from . import run_folder


def compute_dtype(sft_kwargs: dict[str, Any]) -> str:
    """``bf16`` / ``fp16`` (the Trainer's autocast) or ``fp32``."""
    return "bf16" if sft_kwargs.get("bf16") else "fp16" if sft_kwargs.get("fp16") else "fp32"


def checkpointing(sft_kwargs: dict[str, Any]) -> bool:
    """The Trainer's checkpointing, or FSDP's own (``fsdp_config.activation_checkpointing``)."""
    fsdp_config = sft_kwargs.get("fsdp_config") if sft_kwargs.get("fsdp") else None
    return bool(sft_kwargs.get("activation_checkpointing", sft_kwargs.get("gradient_checkpointing", False))
                or (isinstance(fsdp_config, dict) and fsdp_config.get("activation_checkpointing")))


def executed_setup(recipe, spec: ModelSpec, sft_kwargs: dict[str, Any], *, device: str,
                   batch_shape: tuple[int, ...] | None = None, padded: bool | None = None,
                   weights_dtype: str | None = None) -> TrainingSetup:
    """The step the runner runs for ``recipe`` with ``sft_kwargs`` on ``device``.

    ``batch_shape`` / ``padded``: the (batch, sequence) shape the collator produced and whether it padded a row,
    when known (a measurement); otherwise the worst case: ``per_device_train_batch_size`` rows of ``max_length``
    tokens, padded when there are several rows (packing: one row of all of them, no padding).
    ``weights_dtype``: the plan's choice for full fine-tuning (``bf16``: pure bf16); the recipe's
    ``method.weights_dtype`` wins.  Only a bf16 run can hold pure-bf16 weights.
    """
    packing = bool(recipe.data.packing)
    batch = int(sft_kwargs["per_device_train_batch_size"])
    length = int(sft_kwargs.get("max_length") or spec.sequence_length(None))
    if batch_shape is not None:
        batch, length = int(batch_shape[0]), int(batch_shape[-1])
        padded = (batch > 1 and not packing) if padded is None else padded
    else:
        batch, length, worst = step_shape(batch, length, packing=packing)
        padded = worst if padded is None else padded
    dtype = compute_dtype(sft_kwargs)
    weights = recipe.method.weights_dtype or weights_dtype
    weights = weights if recipe.method.type == "full" and dtype == "bf16" else None
    targets = recipe.method.target_modules
    fused = recipe.trainer == "trl" and trl_fuses_lm_head() and not sft_kwargs.get("label_smoothing_factor")
    loss = "fused" if fused else "logits"
    return TrainingSetup(
        method=recipe.method.type, micro_batch_size=batch, seq_len=length, dtype=dtype,
        optim=sft_kwargs.get("optim", DEFAULT_OPTIM), gradient_checkpointing=checkpointing(sft_kwargs),
        lora_r=recipe.method.lora_r, lora_alpha=recipe.method.lora_alpha, lora_dropout=recipe.method.lora_dropout,
        lora_target_modules=targets if isinstance(targets, str) else tuple(targets),
        attn_implementation=recipe.model.attn_implementation or spec.default_attn_implementation,
        weights_dtype=weights if weights != "fp32" else None, device=device, loss=loss,
        padded=padded, packing=packing)


def run_setup(prep, sft_kwargs: dict[str, Any]):  # -> recommender.training_setup.TrainingSetup
    """The setup of the step these arguments run (``train.setup.executed_setup``): what the model is loaded as and
    what the reported estimate describes."""
    return executed_setup(prep.recipe, prep.plan.request.model, sft_kwargs, device=run_device(sft_kwargs),
                          weights_dtype=prep.plan.weights_dtype)


def run_estimate(prep, sft_kwargs: dict[str, Any] | None = None):  # -> MemoryEstimate
    """The memory estimate of the step these arguments run on this machine (what plan.json and summary.json
    report next to the plan made for the recipe's GPU)."""
    from ..recommender.memory import estimate_memory

    kwargs = sft_kwargs if sft_kwargs is not None else prep.sft_kwargs
    return estimate_memory(prep.plan.request.model, run_setup(prep, kwargs), **_distribution(prep, kwargs))


def _distribution(prep, sft_kwargs: dict[str, Any]) -> dict[str, Any]:
    """How the run spreads over its processes: GPUs (FSDP / ZeRO shard over them, DDP replicates), sharding,
    accumulation and offload, as the estimates take them."""
    gpus = prep.plan.request.gpus
    sharding = "fsdp" if sft_kwargs.get("fsdp") and gpus > 1 else "ddp" if gpus > 1 else "none"
    zero = zero_strategy(sft_kwargs)
    sharding, offload = zero if zero else (sharding, "none")
    return {"gpus": gpus, "sharding": sharding, "offload": offload,
            "accumulation": int(sft_kwargs.get("gradient_accumulation_steps", 1))}


def run_speed(prep, sft_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The predicted speed of the step these arguments run, on the plan's GPU (``recommender.throughput``, full
    rows): tokens/s per GPU, seconds per optimizer step and MFU; only the FLOPs per token when the catalog has no
    rates for the GPU."""
    import dataclasses

    from ..recommender.flops import estimate_flops
    from ..recommender.throughput import step_time

    kwargs = sft_kwargs if sft_kwargs is not None else prep.sft_kwargs
    spec, gpu = prep.plan.request.model, prep.plan.request.gpu
    setup = dataclasses.replace(run_setup(prep, kwargs), padded=False)
    out: dict[str, Any] = {"gpu": gpu.name, "model_flops_per_token": estimate_flops(spec, setup).model_flops_per_token}
    t = step_time(spec, setup, gpu, **_distribution(prep, kwargs))
    if t is not None:
        out.update(tokens_per_second_per_gpu=t.tokens_per_second_per_gpu, seconds_per_step=t.seconds_per_step,
                   mfu=t.mfu, peak_flops=t.peak_flops)
    return out


def zero_strategy(sft_kwargs: dict[str, Any]) -> tuple[str, str] | None:
    """(zero2 | zero3, offload) when these arguments run DeepSpeed ZeRO (the plan's config, or a recipe's
    ``training.deepspeed`` dict or JSON file)."""
    from ..recommender.zero import strategy_of

    config = sft_kwargs.get("deepspeed")
    if isinstance(config, str):
        config = run_folder.read_json(Path(config)) or {}
    return strategy_of(config) if isinstance(config, dict) else None


def shards_parameters(sft_kwargs: dict[str, Any]) -> bool:
    """Whether these arguments split the parameters themselves over the processes (FSDP, ZeRO-3)."""
    return bool(sft_kwargs.get("fsdp")) or (zero_strategy(sft_kwargs) or ("none",))[0] == "zero3"


def run_device(sft_kwargs: dict[str, Any]) -> str:
    """Where these arguments run: the CPU when they say so (``use_cpu``), else CUDA (a dry run on a machine without
    a GPU writes the arguments for the GPU the recipe names)."""
    return "cpu" if sft_kwargs.get("use_cpu") else "cuda"


def local_device() -> str:
    """``cuda`` when this machine has a CUDA GPU, else ``cpu`` (imports torch)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
