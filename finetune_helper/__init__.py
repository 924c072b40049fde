"""finetune-helper: how to fine-tune this model on this GPU, and will it fit.

    >>> import finetune_helper as fh
    >>> plan = fh.recommend("meta-llama/Llama-3.1-8B", gpu="A100 80GB", method="lora")
    >>> plan.per_device_train_batch_size, plan.learning_rate, plan.reasons["learning_rate"]
    >>> args = fh.to_training_arguments(plan, output_dir="out")   # a real transformers.TrainingArguments

Importing this package (and planning for catalog models) imports neither torch nor transformers.
"""

from __future__ import annotations

from typing import Any

from .errors import FinetuneHelperError
from .recommender.memory import MemoryEstimate, estimate_memory
from .recommender.gpu import GPUSpec, resolve_gpu
from .recommender.model import ModelSpec, resolve_model
from .recommender.plan import Plan, PlanRequest, recommend_plan
from .recommender.training_setup import TrainingSetup

__version__ = "0.1.0"


def _model(model: str | ModelSpec) -> ModelSpec:
    return model if isinstance(model, ModelSpec) else resolve_model(model)


def _gpu(gpu: str | GPUSpec) -> GPUSpec:
    return gpu if isinstance(gpu, GPUSpec) else resolve_gpu(gpu)


def recommend(model: str | ModelSpec, gpu: str | GPUSpec, **settings: Any) -> Plan:
    """Plan a fine-tune: ``settings`` are the fields of :class:`PlanRequest` (gpus, method, seq_len, dataset_size,
    epochs, target_effective_batch, optim, lr_min, lr_max, gradient_checkpointing, lora_r, ...)."""
    return recommend_plan(PlanRequest(model=_model(model), gpu=_gpu(gpu), **settings))


def estimate(model: str | ModelSpec, *, gpus: int = 1, sharding: str = "none", **setup: Any) -> MemoryEstimate:
    """Peak memory per GPU: ``setup`` are the fields of :class:`TrainingSetup` (method, micro_batch_size, seq_len,
    dtype, optim, gradient_checkpointing, lora_r, attn_implementation, ...)."""
    spec = _model(model)
    setup.setdefault("attn_implementation", spec.default_attn_implementation)
    return estimate_memory(spec, TrainingSetup(**setup), gpus=gpus, sharding=sharding)


def to_training_arguments(plan: Plan, output_dir: str, **overrides: Any) -> Any:
    """A real ``transformers.TrainingArguments`` for the installed version (imports transformers); ``overrides``
    are TrainingArguments fields that win over the plan."""
    from .export.training_args import to_training_arguments as build

    return build(plan, output_dir, **overrides)


__all__ = [
    "FinetuneHelperError", "GPUSpec", "MemoryEstimate", "ModelSpec", "Plan", "PlanRequest", "TrainingSetup",
    "estimate", "estimate_memory", "recommend", "recommend_plan", "resolve_gpu", "resolve_model",
    "to_training_arguments",
]
