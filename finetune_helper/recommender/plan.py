"""From model + GPU + data to training settings, each with the rule and the numbers behind it.

spec -> estimate -> **plan** -> export.  Rules, in the order they are applied:
1. precision: bf16 where the GPU has it, else fp16 mixed precision;
2. fit: the most precise numerics (32-bit AdamW states and fp32 master weights, then pure-bf16 weights, then 8-bit
   states) under which batch 1 fits, and within them the largest per-device micro-batch (up to the target) whose
   estimated peak stays under (1 - safety margin) of GPU memory, with gradient checkpointing or FSDP only when they
   raise it;
3. gradient accumulation: the smallest with micro x accumulation x GPUs >= the target effective batch;
4. learning rate: a published reference (``data/lr_references.yaml``) scaled to the effective batch by the
   square-root rule (Adam family) or the linear rule (SGD), clamped to [lr_min, lr_max];
5. warmup: 5% of steps, up to 10% for batches or LRs far above the reference, at least 10 steps;
6. when batch 1 does not fit at all: the escalation (DeepSpeed's offload when ZeRO was asked for) LoRA -> QLoRA ->
   more GPUs (FSDP, or the ZeRO stage asked for), naming the first that fits.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from .. import defaults
from ..errors import FinetuneHelperError
from ..units import fmt_gib, fmt_run_length
from .calibration import Calibration
from .gpu import GPUSpec
from .memory import MemoryEstimate, estimate_memory
from .model import ModelSpec
from .optimizers import EIGHT_BIT_FALLBACK, OPTIMIZERS, is_eight_bit
from .rules import (DEFAULT_OPTIM, MAX_GRAD_NORM, MIN_EFFECTIVE_BATCH, MIN_STEPS, ONE_CYCLE_RISE, SCHEDULER,
                    SCHEDULES, TRAINER_SCHEDULERS, WEIGHT_DECAY, lr_bounds_note, lr_reference_rate, reference_batch,
                    reference_clipping, scaled_learning_rate, schedule_reason, scheduler_kwargs, warmup_ratio)
from .training_setup import TRAINER_LOSS, TrainingSetup, step_shape
from .zero import OFFLOAD, ZERO_OPTIMIZERS, ZERO_STAGES, check_offload, deepspeed_config

#: Largest per-device micro-batch the planner proposes (beyond it throughput stops improving on any current GPU).
MAX_MICRO_BATCH = 128
#: The most GPUs the "more GPUs" escalation considers.
MAX_GPUS = 64
#: the most GPUs a request may name: beyond this the data-parallel model (one replica or FSDP shard per GPU, a
#: global batch of thousands of sequences) is no longer a fine-tuning setup this planner describes
MAX_GPUS_REQUEST = 4096


@dataclass(frozen=True)
class PlanRequest:
    """What the user tells us. Every field has the CLI flag of the same name."""

    model: ModelSpec
    gpu: GPUSpec
    #: GPUs on the node(s); beyond 1 the run is data parallel (:attr:`strategy`).
    gpus: int = 1
    method: str = defaults.METHOD
    #: tokens per sequence; None means min(2048, the model's max_position_embeddings).
    seq_len: int | None = None
    #: training sequences: examples, or with ``packing`` the rows TRL packs them into; None assumes
    #: ``defaults.ASSUMED_DATASET_SIZE``.
    dataset_size: int | None = None
    epochs: float = defaults.EPOCHS
    target_effective_batch: int = defaults.TARGET_EFFECTIVE_BATCH
    #: a ``TrainingArguments.optim`` name, or None to let the planner choose.
    optim: str | None = None
    lr_min: float = defaults.LR_MIN
    lr_max: float = defaults.LR_MAX
    #: None lets the planner decide; True/False forces it.
    gradient_checkpointing: bool | None = None
    safety_margin: float = defaults.SAFETY_MARGIN
    lora_r: int = defaults.LORA_R
    lora_alpha: int = defaults.LORA_ALPHA
    lora_dropout: float = defaults.LORA_DROPOUT
    #: ``all-linear`` or the module names LoRA adapts (``("q_proj", "v_proj")``).
    lora_target_modules: str | tuple[str, ...] = defaults.TARGET_MODULES
    #: full fine-tuning's weight storage: None lets the planner decide (fp32 masters under autocast; pure bf16 only
    #: when that does not fit), ``fp32`` or ``bf16`` forces it.
    weights_dtype: str | None = None
    #: a ``finetune-helper probe`` measurement of this device, model and method (:mod:`.calibration`): every
    #: estimate's allocated bytes are scaled by its ratio
    calibration: Calibration | None = None
    #: None means the architecture's default (``sdpa``; ``eager`` for Gemma 2).
    attn_implementation: str | None = None
    #: padding-free packed rows (TRL ``packing=True``): the micro-batch's examples run as one row (``step_shape``).
    packing: bool = False
    #: where the step runs (``cuda``; ``cpu`` plans a CPU run's memory: no CUDA context, the CPU kernels).
    device: str = "cuda"
    #: the learning-rate schedule after warmup, one of :data:`.rules.SCHEDULES`.
    scheduler: str = defaults.SCHEDULER
    #: how several GPUs share the work (:data:`defaults.STRATEGIES`): ``auto`` takes the fastest predicted of DDP,
    #: FSDP, DeepSpeed ZeRO-2 and ZeRO-3 that fits (without catalog rates: the first of them, in that order, that fits
    #: the micro-batch); ``ddp`` / ``fsdp`` / ``zero2`` / ``zero3`` force one (ZeRO: :mod:`.zero`).
    strategy: str = defaults.STRATEGY
    #: whether ``auto`` may choose DeepSpeed ZeRO (plans for anywhere may; the runner lets it only where DeepSpeed is
    #: installed and CUDA runs, so that ``auto`` never asks for what the machine lacks).
    deepspeed: bool = True
    #: DeepSpeed's offload to host memory: ``optimizer`` (zero2 / zero3) or ``all`` (zero3, parameters too).
    offload: str = defaults.OFFLOAD
    #: the trainer the plan is for (:data:`defaults.TRAINERS`): ``trl`` (``SFTTrainer``'s fused LM head, what
    #: ``finetune-helper run`` executes) or ``transformers`` (``transformers.Trainer``: full logits in fp32).
    trainer: str = defaults.TRAINER

    def __post_init__(self) -> None:
        if not isinstance(self.gpus, int) or isinstance(self.gpus, bool) or not 1 <= self.gpus <= MAX_GPUS_REQUEST:
            raise FinetuneHelperError("gpus", f"must be an integer from 1 to {MAX_GPUS_REQUEST}, got {self.gpus!r}")
        if self.seq_len is not None:
            if not isinstance(self.seq_len, int) or self.seq_len <= 0:
                raise FinetuneHelperError("seq-len", f"must be a positive integer, got {self.seq_len!r}")
            self.model.sequence_length(self.seq_len)
        if self.dataset_size is not None and (not isinstance(self.dataset_size, int) or self.dataset_size <= 0):
            raise FinetuneHelperError("dataset-size", f"must be a positive integer, got {self.dataset_size!r}")
        if not (isinstance(self.epochs, (int, float)) and 0 < self.epochs < 1e6):
            raise FinetuneHelperError("epochs", f"must be a number > 0 (and < 1e6), got {self.epochs!r}")
        if not isinstance(self.target_effective_batch, int) or self.target_effective_batch <= 0:
            raise FinetuneHelperError("target-batch", f"must be a positive integer, got {self.target_effective_batch!r}")
        if self.target_effective_batch > 10**7:
            raise FinetuneHelperError("target-batch", f"{self.target_effective_batch} sequences per step is not a "
                                      "fine-tuning batch; use at most 10^7")
        if not isinstance(self.lora_alpha, (int, float)) or not 0 < self.lora_alpha < 1e6:
            raise FinetuneHelperError("lora-alpha", f"must be a positive number, got {self.lora_alpha!r}")
        for name in ("lr_min", "lr_max"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value < 1):
                raise FinetuneHelperError(name.replace("_", "-"), f"must be a number in (0, 1), got {value!r}")
        if self.lr_min > self.lr_max:
            raise FinetuneHelperError("lr-min", f"{self.lr_min:g} is above --lr-max {self.lr_max:g}; swap them")
        if not (isinstance(self.safety_margin, (int, float)) and 0 <= self.safety_margin < 0.9):
            raise FinetuneHelperError("safety-margin", f"must be in [0, 0.9), got {self.safety_margin!r}")
        if self.weights_dtype not in (None, "fp32", "bf16"):
            raise FinetuneHelperError("weights-dtype", f"{self.weights_dtype!r} is not one of fp32, bf16")
        if self.weights_dtype == "bf16" and (self.method != "full" or not self.gpu.bf16):
            raise FinetuneHelperError("weights-dtype", "bf16 weights are an option of full fine-tuning on a GPU with "
                                      "bfloat16")
        if self.trainer not in defaults.TRAINERS:
            raise FinetuneHelperError("trainer", f"{self.trainer!r} is not one of {', '.join(defaults.TRAINERS)}")
        if self.device not in ("cuda", "cpu"):
            raise FinetuneHelperError("device", f"{self.device!r} is not one of cuda, cpu")
        if self.scheduler not in SCHEDULES:
            raise FinetuneHelperError("scheduler", f"{self.scheduler!r} is not one of {', '.join(SCHEDULES)}")
        if self.optim is not None and self.optim not in OPTIMIZERS:
            raise FinetuneHelperError("optim", f"{self.optim!r} is not supported; choose from {', '.join(OPTIMIZERS)}")
        self._check_strategy()
        self.setup(1, False)  # validates method, LoRA and attention settings early

    def _check_strategy(self) -> None:
        if self.strategy not in defaults.STRATEGIES:
            raise FinetuneHelperError("strategy", f"{self.strategy!r} is not one of {', '.join(defaults.STRATEGIES)}")
        if self.strategy in ("ddp", "fsdp") and self.gpus == 1:
            raise FinetuneHelperError("strategy", f"{self.strategy} shares the work of several GPUs: set --gpus >= 2 "
                                      "(or zero2 / zero3 with --offload on one GPU)")
        check_offload(self.strategy, self.offload)
        if self.strategy in ZERO_STAGES and self.weights_dtype == "bf16":
            raise FinetuneHelperError("weights-dtype", "bf16 under DeepSpeed: ZeRO keeps fp32 master weights of the "
                                      "16-bit module (leave --weights-dtype out)")
        if self.strategy in ZERO_STAGES and (self.optim or DEFAULT_OPTIM) not in ZERO_OPTIMIZERS:
            raise FinetuneHelperError("optim", f"{self.optim!r} under DeepSpeed: use one of "
                                      f"{', '.join(ZERO_OPTIMIZERS)} (ZeRO partitions 32-bit Adam states)")

    @property
    def sharded_strategies(self) -> list[str]:
        """The data-parallel modes the planner may use, in the order ties go (``none`` on one GPU without
        DeepSpeed): PyTorch's own before DeepSpeed's (no extra package), replicated before sharded (less
        communication)."""
        if self.strategy == "auto":
            return ["ddp", "fsdp", *(ZERO_STAGES if self.deepspeed else ())] if self.gpus > 1 else ["none"]
        return [self.strategy]

    @property
    def resolved_seq_len(self) -> int:
        return self.model.sequence_length(self.seq_len)

    @property
    def dtype(self) -> str:
        return "bf16" if self.gpu.bf16 else "fp16"

    @property
    def loss(self) -> str:
        """The loss path of the trainer planned for (``fused`` or ``logits``, :data:`.training_setup.TRAINER_LOSS`)."""
        return TRAINER_LOSS[self.trainer]

    def setup(self, micro_batch: int, gradient_checkpointing: bool, optim: str | None = None,
              method: str | None = None, weights_dtype: str | None = None) -> TrainingSetup:
        method = method or self.method
        weights = weights_dtype or self.weights_dtype
        rows, length, padded = step_shape(micro_batch, self.resolved_seq_len, packing=self.packing)
        return TrainingSetup(
            method=method, micro_batch_size=rows, seq_len=length, padded=padded, packing=self.packing,
            device=self.device, loss=self.loss,
            dtype=self.dtype, optim=optim or self.optim or DEFAULT_OPTIM,
            gradient_checkpointing=gradient_checkpointing, lora_r=self.lora_r, lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout, lora_target_modules=self.lora_target_modules,
            attn_implementation=self.attn_implementation or self.model.default_attn_implementation,
            weights_dtype=weights if method == "full" and weights == "bf16" and self.dtype == "bf16" else None,
        )

    @property
    def target_batch(self) -> int:
        """The effective batch aimed at: the target, or the whole data when it is smaller (a batch larger than the
        data would be one partial step), lowered on small data so that the run has :data:`.rules.MIN_STEPS`
        optimizer steps, never below :data:`.rules.MIN_EFFECTIVE_BATCH` sequences."""
        dataset = self.dataset_size or defaults.ASSUMED_DATASET_SIZE
        for_steps = max(MIN_EFFECTIVE_BATCH, int(dataset * self.epochs // MIN_STEPS))
        return max(1, min(self.target_effective_batch, dataset, for_steps))

    def accumulation(self, micro: int, gpus: int | None = None) -> int:
        """The smallest accumulation with ``micro`` x accumulation x GPUs >= :attr:`target_batch`."""
        return max(1, math.ceil(self.target_batch / (micro * (gpus or self.gpus))))

    @property
    def budget_bytes(self) -> int:
        return int(self.gpu.memory_bytes * (1 - self.safety_margin))


@dataclass(frozen=True)
class Escalation:
    """One step of the "does not fit" ladder and what it would need."""

    change: str
    fits: bool
    peak_memory_bytes: int


@dataclass(frozen=True)
class Plan:
    """The recommendation. ``reasons`` maps each setting to its justification, with the derivation and the sources
    (what ``--json``, the exports and the app show); ``short_reasons`` maps the same keys to the decision and its key
    figure in one line (what ``recommend`` prints in a terminal without ``--explain``)."""

    request: PlanRequest
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    learning_rate: float
    warmup_ratio: float
    gradient_checkpointing: bool
    optim: str
    bf16: bool
    fp16: bool
    fits: bool
    estimate: MemoryEstimate
    total_steps: int
    distributed: str
    lr_scheduler_type: str = SCHEDULER
    max_grad_norm: float = MAX_GRAD_NORM
    weight_decay: float = 0.0
    #: full fine-tuning's weight storage: None (fp32 masters under autocast) or ``bf16`` (pure-bf16 training)
    weights_dtype: str | None = None
    reasons: dict[str, str] = field(default_factory=dict)
    escalation: tuple[Escalation, ...] = ()
    #: the reasons in one line each, without the sources (``reasons`` keeps the full text; see :meth:`short_reason`)
    short_reasons: dict[str, str] = field(default_factory=dict)
    #: the verdict's line when the rule asked for an LR more than 2x outside the bounds (None otherwise)
    lr_note: str | None = None
    #: the run's predicted seconds as the planner compared the fitting settings (its examples at the chosen
    #: micro-step's rate, the optimizer steps at the target batch); None without catalog rates for the GPU
    run_seconds: float | None = None

    @property
    def effective_batch_size(self) -> int:
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * self.request.gpus

    @property
    def peak_memory_bytes(self) -> int:
        return self.estimate.total_bytes

    @property
    def setup(self) -> TrainingSetup:
        """The step this plan estimated (the runner's executed setup starts from it)."""
        return self.request.setup(self.per_device_train_batch_size, self.gradient_checkpointing, self.optim,
                                  weights_dtype=self.weights_dtype)

    @property
    def warmup_steps(self) -> int:
        return math.ceil(self.warmup_ratio * self.total_steps)

    @property
    def option(self) -> _Option:
        """How the step runs: checkpointing, optimizer, sharding and weight storage, as the planner chose them."""
        shard = {"single GPU": "none"}.get(self.distributed, self.distributed)
        return _Option(self.gradient_checkpointing, self.optim, shard, self.weights_dtype)

    def time(self, price_per_hour: float | None = None) -> dict[str, Any]:
        """FLOPs per token of the planned step and, where the catalog has the GPU's peak and bandwidth, its predicted
        speed (``throughput.step_time``) and the run's length; with ``price_per_hour`` (per GPU) its cost."""
        from .flops import estimate_flops
        from .throughput import step_time

        r = self.request
        setup = dataclasses.replace(self.setup, padded=False)  # full rows, as the planner times them
        flops = estimate_flops(r.model, setup)
        accumulation = self.gradient_accumulation_steps
        out: dict[str, Any] = {"flops_per_token": flops.flops_per_token(setup.tokens * accumulation),
                               "model_flops_per_token": flops.model_flops_per_token}
        shard = self.option.shard
        cal = r.calibration if r.calibration is not None and r.calibration.plausible_speed else None
        base = step_time(r.model, setup, r.gpu, gpus=r.gpus, sharding=shard, accumulation=accumulation,
                         offload=r.offload if shard in ZERO_STAGES else "none")
        if base is None:
            return out
        t = base if cal is None else step_time(r.model, setup, r.gpu, gpus=r.gpus, sharding=shard,
                                               accumulation=accumulation, efficiency=base.efficiency * cal.speed_ratio,
                                               offload=r.offload if shard in ZERO_STAGES else "none")
        if cal is not None:
            out["calibration"] = cal.describe_speed()
        total = t.seconds_per_step * self.total_steps
        out.update({"tokens_per_second_per_gpu": t.tokens_per_second_per_gpu,
                    "seconds_per_micro_step": t.micro_step, "seconds_per_step": t.seconds_per_step,
                    "total_seconds": total, "mfu": t.mfu, "bound": t.bound})
        if price_per_hour is not None:
            out["cost"] = {"price_per_gpu_hour": price_per_hour, "gpus": r.gpus,
                           "total": total / 3600 * r.gpus * price_per_hour}
        return out

    def under_trainer(self, trainer: str) -> dict[str, Any]:
        """The same step under another trainer's loss path (``transformers``: full logits in fp32): the peak at this
        plan's micro-batch, whether it fits, and the micro-batch a plan for that trainer would choose."""
        req = dataclasses.replace(self.request, trainer=trainer)
        peak = self.option.estimate(req, self.per_device_train_batch_size).total_bytes
        return {"trainer": trainer, "peak_memory_bytes": peak, "fits": peak <= req.budget_bytes,
                "per_device_train_batch_size": recommend_plan(req).per_device_train_batch_size}

    @property
    def lr_scheduler_kwargs(self) -> dict[str, Any]:
        """What the schedule needs (``min_lr_rate``, ``num_decay_steps``, ...), as ``TrainingArguments`` passes it
        to ``get_scheduler`` (step decay's: the runner's); empty for most schedules."""
        return scheduler_kwargs(self.lr_scheduler_type, self.total_steps, self.warmup_steps)

    @property
    def schedule_type(self) -> str:
        """The schedule as :mod:`.schedule` models it (one-cycle is transformers' ``cosine_warmup_with_min_lr``)."""
        return {"one_cycle": "cosine_warmup_with_min_lr"}.get(self.lr_scheduler_type, self.lr_scheduler_type)

    def training_kwargs(self) -> dict[str, Any]:
        """The plan as ``TrainingArguments`` keyword arguments, version-neutral (4.x names: ``warmup_ratio``,
        ``gradient_checkpointing``); ``export`` adapts them to the installed transformers."""
        return {
            "per_device_train_batch_size": self.per_device_train_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "learning_rate": self.learning_rate,
            # step decay runs as constant_with_warmup plus the runner's LambdaLR (no TrainingArguments type)
            "lr_scheduler_type": TRAINER_SCHEDULERS.get(self.lr_scheduler_type, self.lr_scheduler_type),
            **({"lr_scheduler_kwargs": self.lr_scheduler_kwargs}
               if self.lr_scheduler_kwargs and self.lr_scheduler_type != "step_decay" else {}),
            "warmup_ratio": self.warmup_ratio,
            "weight_decay": self.weight_decay,
            "max_grad_norm": self.max_grad_norm,
            "num_train_epochs": float(self.request.epochs),
            "optim": self.optim,
            "bf16": self.bf16,
            "fp16": self.fp16,
            "gradient_checkpointing": self.gradient_checkpointing,
            # FSDP plans: shard every decoder layer (transformers wraps the model's _no_split_modules)
            **({"fsdp": "full_shard auto_wrap"} if self.distributed == "fsdp" else {}),
            **({"deepspeed": deepspeed_config(self.distributed, self.request.offload)}
               if self.distributed in ZERO_STAGES else {}),
        }

    def short_reason(self, key: str) -> str:
        """The one-line reason of ``key`` (``short_reasons``), or its full reason where no short one was made."""
        return self.short_reasons.get(key) or self.reasons[key]

    def settings_rows(self, short: bool = False) -> list[tuple[str, str, str]]:
        """(setting, value, reason) for every recommended value, in the order the CLI and the app show them: the full
        reasons, or with ``short`` the one-line ones (:attr:`short_reasons`)."""
        r = {key: self.short_reason(key) for key in self.reasons} if short else self.reasons
        rows = [
            ("per_device_train_batch_size", str(self.per_device_train_batch_size), r["per_device_train_batch_size"]),
            ("gradient_accumulation_steps", str(self.gradient_accumulation_steps), r["gradient_accumulation_steps"]),
            ("effective_batch_size", str(self.effective_batch_size), "per-device batch x accumulation x GPUs"),
            ("learning_rate", f"{self.learning_rate:.2e}", r["learning_rate"]),
            ("warmup_ratio", f"{self.warmup_ratio:g}", r["warmup_ratio"]),
            ("lr_scheduler_type", self.lr_scheduler_type, r["lr_scheduler_type"]),
            ("precision", "bf16" if self.bf16 else "fp16", r["precision"]),
            ("optim", self.optim, r["optim"]),
            ("gradient_checkpointing", str(self.gradient_checkpointing), r["gradient_checkpointing"]),
            ("weight_decay", f"{self.weight_decay:g}", r["weight_decay"]),
            ("max_grad_norm", f"{self.max_grad_norm:g}", r["max_grad_norm"]),
            ("total_steps", str(self.total_steps), r["total_steps"]),
        ]
        if "distributed" in r:
            rows.append(("distributed", self.distributed, r["distributed"]))
        rows.append(("trainer", self.request.trainer, r["trainer"]))
        return rows

    def to_dict(self) -> dict[str, Any]:
        r = self.request
        return {
            "model": r.model.name,
            "parameters": r.model.num_parameters(),
            "gpu": r.gpu.name,
            "gpu_memory_bytes": r.gpu.memory_bytes,
            "gpus": r.gpus,
            "method": r.method,
            "trainer": r.trainer,
            "loss": r.loss,
            "device": r.device,
            "seq_len": r.resolved_seq_len,
            "packing": r.packing,
            "per_device_train_batch_size": self.per_device_train_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "effective_batch_size": self.effective_batch_size,
            "learning_rate": self.learning_rate,
            "warmup_ratio": self.warmup_ratio,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "lr_scheduler_type": self.lr_scheduler_type,
            "lr_scheduler_kwargs": self.lr_scheduler_kwargs,
            "weight_decay": self.weight_decay,
            "max_grad_norm": self.max_grad_norm,
            "gradient_checkpointing": self.gradient_checkpointing,
            "optim": self.optim,
            "bf16": self.bf16,
            "fp16": self.fp16,
            "distributed": self.distributed,
            "strategy": r.strategy, "offload": r.offload, "host_memory_bytes": self.estimate.host_bytes,
            "weights_dtype": self.weights_dtype or ("fp32" if r.method == "full" else r.dtype),
            "fits": self.fits,
            "peak_memory_bytes": self.peak_memory_bytes,
            "budget_bytes": r.budget_bytes,
            "breakdown": self.estimate.breakdown,
            "peak_phase": self.estimate.peak_phase,
            "trainable_parameters": self.estimate.trainable_parameters,
            "reasons": dict(self.reasons),
            "lr_note": self.lr_note,
            "escalation": [{"change": e.change, "fits": e.fits, "peak_memory_bytes": e.peak_memory_bytes}
                           for e in self.escalation],
            "time": self.time(),
        }


#: what each trainer's loss path means for the plan (TRL 1.16 ``SFTTrainer.compute_loss``: ``fused_lm_head=True``;
#: transformers ``loss/loss_utils.py``: ``logits.float()``)
TRAINER_REASONS = {
    "trl": "TRL's SFTTrainer (what finetune-helper run executes): its fused, chunked LM head never builds the "
           "vocabulary-wide logits; --trainer transformers plans for transformers.Trainer",
    "transformers": "transformers.Trainer with the model's own loss: the full logits, upcast to fp32, and their "
                    "gradient are part of the peak",
}
#: the same in one line for the terminal
TRAINER_SHORT_REASONS = {
    "trl": "TRL's SFTTrainer, as run executes: no full logits",
    "transformers": "transformers.Trainer: full fp32 logits in the peak",
}

#: how the reasons name each way of sharding
STRATEGY_LABELS = {"ddp": "DDP", "fsdp": "FSDP full sharding", "zero2": "DeepSpeed ZeRO-2", "zero3": "DeepSpeed ZeRO-3"}


# --------------------------------------------------------------------------------------------- fitting
def _estimate(req: PlanRequest, micro: int, gc: bool, optim: str, method: str | None = None, gpus: int | None = None,
              sharding: str | None = None, weights: str | None = None) -> MemoryEstimate:
    gpus = gpus or req.gpus
    if sharding is None:
        sharding = "ddp" if gpus > 1 else "none"
    # accumulating keeps the gradients alive through the next micro-steps' forward and backward
    est = estimate_memory(req.model, req.setup(micro, gc, optim, method, weights), gpus=gpus, sharding=sharding,
                          accumulation=req.accumulation(micro, gpus),
                          offload=req.offload if sharding in ZERO_STAGES else "none")
    calibrated = req.calibration is not None and (method or req.method) == req.calibration.method
    return est.calibrated(req.calibration.ratio) if calibrated else est


def largest_fitting(fits: Callable[[int], bool], cap: int) -> int:
    """Largest batch in [1, cap] for which ``fits`` holds (memory grows with the batch, so bisect); 0 if 1 does not."""
    if not fits(1):
        return 0
    lo, hi = 1, cap
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _largest_batch(req: PlanRequest, option: _Option, cap: int) -> int:
    """Largest micro-batch in [1, cap] whose estimate is under budget; 0 if 1 does not fit."""
    return largest_fitting(lambda b: option.estimate(req, b).total_bytes <= req.budget_bytes, cap)


def _escalate(req: PlanRequest) -> tuple[Escalation, ...]:
    """Batch 1 does not fit: the ladder gradient checkpointing -> 8-bit optimizer -> LoRA -> QLoRA -> more GPUs,
    each rung with its peak at batch 1, up to the first that fits."""
    steps: list[Escalation] = []
    optim = req.optim or DEFAULT_OPTIM
    # as the strategy asked (DeepSpeed ZeRO on one GPU too); left to the planner, FSDP on several GPUs
    zero = req.strategy in ZERO_STAGES
    sharding = req.strategy if req.strategy != "auto" else "fsdp" if req.gpus > 1 else None
    more = req.strategy if zero else "fsdp"
    if req.gradient_checkpointing is None:
        est = _estimate(req, 1, True, optim, sharding=sharding)
        steps.append(Escalation("gradient checkpointing", False, est.total_bytes))
    if req.method == "full" and req.weights_dtype is None and req.dtype == "bf16" and not zero:
        est = _estimate(req, 1, req.gradient_checkpointing is not False, optim, sharding=sharding, weights="bf16")
        steps.append(Escalation("pure-bf16 weights (--weights-dtype bf16)" + (" with gradient checkpointing"
                                if req.gradient_checkpointing is not False else ""), False, est.total_bytes))
    if req.optim is None and not zero:
        est = _estimate(req, 1, req.gradient_checkpointing is not False, EIGHT_BIT_FALLBACK, sharding=sharding)
        steps.append(Escalation(f"--optim {EIGHT_BIT_FALLBACK}" + (" (with gradient checkpointing)"
                                if req.gradient_checkpointing is not False else ""), False, est.total_bytes))
    if zero:  # DeepSpeed's own rungs: offload the optimizer, then (ZeRO-3) the parameters
        offloads = OFFLOAD[OFFLOAD.index(req.offload) + 1:(None if req.strategy == "zero3" else 2)]
        for offload in offloads:
            est = _estimate(dataclasses.replace(req, offload=offload), 1, req.gradient_checkpointing is not False,
                            optim, sharding=sharding)
            steps.append(Escalation(f"--offload {offload} (host memory per node: {fmt_gib(est.host_bytes)})",
                                    est.total_bytes <= req.budget_bytes, est.total_bytes))
            if steps[-1].fits:
                return tuple(steps)
    ladder = {"full": ["lora", "qlora"], "lora": ["qlora"], "qlora": []}[req.method]
    for method in ladder:
        est = _estimate(req, 1, True, optim, method=method, sharding=sharding)
        steps.append(Escalation(f"--method {method} (with gradient checkpointing"
                                + (f", {STRATEGY_LABELS[sharding]})" if sharding else ")"),
                                est.total_bytes <= req.budget_bytes, est.total_bytes))
        if steps[-1].fits:
            return tuple(steps)
    for gpus in (2, 4, 8, 16, 32, MAX_GPUS):
        if gpus <= req.gpus:
            continue
        est = _estimate(req, 1, True, optim, gpus=gpus, sharding=more)
        steps.append(Escalation(f"--gpus {gpus} with {STRATEGY_LABELS[more]} ({req.method}, gradient checkpointing)",
                                est.total_bytes <= req.budget_bytes, est.total_bytes))
        if steps[-1].fits:
            break
    return tuple(steps)


# --------------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class _Option:
    """One way to run the step: checkpointing, optimizer, data-parallel sharding and full fine-tuning's weight
    storage (``bf16``: pure-bf16 weights, gradients and states; None: fp32 masters under autocast)."""

    gc: bool
    optim: str
    shard: str
    weights: str | None = None

    def estimate(self, req: PlanRequest, micro: int) -> MemoryEstimate:
        return _estimate(req, micro, self.gc, self.optim, sharding=self.shard, weights=self.weights)


@dataclass(frozen=True)
class _Timed:
    """One fitting way to run the plan and its predicted time: option, micro-batch, accumulation, the run's optimizer
    steps and predicted seconds (see :func:`_timed`)."""

    option: _Option
    micro: int
    accumulation: int
    steps: int
    seconds: float

    def describe(self) -> str:
        return f"{self.micro} x {self.accumulation}, {fmt_run_length(self.seconds)}"


@dataclass(frozen=True)
class _Fit:
    """How the step fits: micro-batch, the option that made it fit, and the resulting estimate."""

    micro: int
    option: _Option
    fits: bool
    estimate: MemoryEstimate
    #: the cheapest option, against which the changes are named
    first: _Option
    #: the options with the chosen numerics (optimizer, weight storage), cheapest first, each with its largest
    #: micro-batch (0 when batch 1 does not fit it): what the speed fallbacks (checkpointing, FSDP) were weighed on
    candidates: tuple[tuple[_Option, int], ...]
    #: the fastest fitting setting of each option of the chosen numerics, fastest first (empty when the GPU has no
    #: catalog rates to predict time with): the choice and its alternatives
    timed: tuple[_Timed, ...] = ()

    @property
    def largest(self) -> int:
        """The largest micro-batch any option of the chosen numerics fits (``micro`` is it, or it evened)."""
        return max((n for _, n in self.candidates), default=self.micro)

    @property
    def gc(self) -> bool:
        return self.option.gc

    @property
    def optim(self) -> str:
        return self.option.optim

    @property
    def shard(self) -> str:
        return self.option.shard

    @property
    def base_fit(self) -> int:
        """The largest micro-batch without checkpointing (any sharding; 0: batch 1 does not fit)."""
        return max((n for o, n in self.candidates if not o.gc), default=0)

    def largest_without(self, shard: str) -> int:
        """The largest micro-batch of the chosen numerics under ``shard`` (0: batch 1 does not fit)."""
        return max((n for o, n in self.candidates if o.shard == shard), default=0)

    def changes(self) -> list[str]:
        """The fallbacks this fit uses that the cheapest option does not, in the ladder's words."""
        first, option = self.first, self.option
        return [c for c, on in (("gradient checkpointing", option.gc and not first.gc),
                                ("pure-bf16 weights", option.weights != first.weights),
                                (option.optim, option.optim != first.optim),
                                ({"fsdp": "FSDP sharding"}.get(option.shard, STRATEGY_LABELS.get(option.shard)),
                                 option.shard != first.shard)) if on]


def _fit_options(req: PlanRequest) -> list[_Option]:
    """The ways to run the step, cheapest first, grouped by numerics: 32-bit AdamW states with fp32 master weights,
    then (full fine-tuning on a bf16 GPU, weights not forced either way) pure-bf16 weights, then 8-bit states.
    Within a group the fallbacks cost speed, not precision: checkpointing (~30% compute) and FSDP (communication);
    full fine-tuning shards before it recomputes, LoRA (small gradients and states) recomputes before it shards."""
    optim = req.optim or DEFAULT_OPTIM
    gc_choices = [req.gradient_checkpointing] if req.gradient_checkpointing is not None else [False, True]
    optim_choices = [optim] if req.optim or req.strategy in ZERO_STAGES else [optim, EIGHT_BIT_FALLBACK]
    shard_choices = req.sharded_strategies
    weight_choices: list[str | None] = [req.weights_dtype if req.weights_dtype == "bf16" else None]
    if req.method == "full" and req.weights_dtype is None and req.dtype == "bf16" and req.strategy not in ZERO_STAGES:
        weight_choices.append("bf16")
    options: list[_Option] = []
    for opt in optim_choices:
        for weights in (weight_choices if opt == optim else weight_choices[:1]):
            # ZeRO keeps fp32 master weights and partitions 32-bit Adam states (PlanRequest's checks): under auto
            # it is one of the ways only with those numerics
            shards = [shard for shard in shard_choices
                      if shard not in ZERO_STAGES or (weights is None and opt in ZERO_OPTIMIZERS)]
            if req.method == "full":
                options += [_Option(gc, opt, shard, weights) for gc in gc_choices for shard in shards]
            else:
                options += [_Option(gc, opt, shard, weights) for shard in shards for gc in gc_choices]
    return options


def _fit(req: PlanRequest, cap: int) -> _Fit:
    """The most precise numerics under which batch 1 fits; within them the largest micro-batch (up to ``cap``) that
    any speed fallback (checkpointing, FSDP) allows, under the cheapest option that reaches it; the last option at
    batch 1 if nothing fits.

    With the same numerics, more memory never gives a smaller micro-batch and a bigger model never a larger one, by
    construction: the micro-batch is the maximum over the options of the largest batch that fits each, and each of
    those grows with the memory and shrinks with the model.  Across numerics the more precise wins: a GPU on which
    fp32 master weights (or 32-bit states) start to fit at batch 1 takes them over a larger micro-batch."""
    options = _fit_options(req)
    for _, group in itertools.groupby(options, key=lambda o: (o.optim, o.weights)):
        group = list(group)
        largest = [_largest_batch(req, option, cap) for option in group]
        if not max(largest):
            continue
        candidates = tuple(zip(group, largest))
        timed = _timed(req, candidates)
        if timed:
            best = timed[0]
            return _Fit(best.micro, best.option, True, best.option.estimate(req, best.micro), options[0], candidates,
                        timed)
        micro = _evened(math.ceil(req.target_batch / req.gpus), max(largest))
        # the cheapest option that fits the micro-batch used (the evened one may need no fallback)
        option = group[next(i for i, n in enumerate(largest) if n >= micro)]
        return _Fit(micro, option, True, option.estimate(req, micro), options[0], candidates)
    return _Fit(1, options[-1], False, options[-1].estimate(req, 1), options[0], ())


def _min_tokens() -> int:
    from .throughput import constants

    return constants()["min_tokens_per_micro_step"]


def _micro_batches(per_gpu: int, largest: int) -> list[int]:
    """The micro-batches worth timing up to ``largest``: for each number of micro-steps, the evened micro-batch
    (:func:`_evened`) -- a smaller one with the same number of micro-steps does the same work in more memory-light,
    less efficient pieces."""
    return sorted({_evened(per_gpu, k) for k in range(1, largest + 1)})


def _timed(req: PlanRequest, candidates: tuple[tuple[_Option, int], ...]) -> tuple[_Timed, ...]:
    """Each option's fastest fitting setting, fastest first: the run's predicted seconds (``throughput``: executed
    FLOPs at the GPU class's efficiency, weight reads, the host's operators, communication, the optimizer) over the
    micro-batches that fit it, each with the accumulation that reaches the target and the optimizer steps that makes,
    from the smallest micro-batch of ``min_tokens_per_micro_step`` tokens (the efficiency's calibrated range; the
    largest that fits when none that large does).  Empty when the GPU has no catalog peak or bandwidth.  Ties go to
    the cheaper option (fewer fallbacks), then the effective batch nearest the target, then the larger micro-batch."""
    per_gpu = math.ceil(req.target_batch / req.gpus)
    row = req.setup(1, False).tokens  # tokens of one micro-batch row (packed: the row)
    smallest = math.ceil(_min_tokens() / row)
    best: list[tuple[float, int, int, int, _Timed]] = []
    for rank, (option, largest) in enumerate(candidates):
        micros = _micro_batches(per_gpu, largest)
        timings = [time_setting(req, option, micro) for micro in [m for m in micros if m >= smallest] or micros[-1:]]
        if None in timings:
            return ()
        if timings:
            fastest = min(timings, key=lambda x: (_resolution(x.seconds), x.micro * x.accumulation, -x.micro))
            best.append((_resolution(fastest.seconds), rank, fastest.micro * fastest.accumulation, -fastest.micro,
                         fastest))
    return tuple(t for *_, t in sorted(best, key=lambda x: x[:4]))


def time_setting(req: PlanRequest, option: _Option, micro: int) -> _Timed | None:
    """The run's predicted length at ``micro`` under ``option`` (None without catalog rates for the GPU): its
    examples at the micro-step's rate, and the optimizer steps (with their communication) counted at the target
    batch -- an overshoot of the target would otherwise look faster for making fewer, larger steps, trading the
    batch the LR was scaled for for a fraction of a step.  Timed as full rows: how much padding a batch carries
    depends on the data (the memory estimate takes the worst case, a padded batch's explicit mask; for time that
    would favour batch 1 for no real reason)."""
    from .throughput import step_time

    accum = req.accumulation(micro)
    setup = dataclasses.replace(req.setup(micro, option.gc, option.optim, weights_dtype=option.weights), padded=False)
    t = step_time(req.model, setup, req.gpu, gpus=req.gpus, sharding=option.shard, accumulation=accum,
                  offload=req.offload if option.shard in ZERO_STAGES else "none")
    if t is None:
        return None
    dataset = req.dataset_size or defaults.ASSUMED_DATASET_SIZE
    eff = micro * accum * req.gpus
    examples = dataset * req.epochs
    seconds = (examples / eff * accum * t.micro_step
               + examples / req.target_batch * (t.seconds_per_step - accum * t.micro_step))
    return _Timed(option, micro, accum, max(1, math.ceil(math.ceil(dataset / eff) * req.epochs)), seconds)


def _resolution(seconds: float) -> float:
    """A predicted time to 3 significant digits: settings closer than that (the optimizer step amortised a little
    differently, a few layers' weight reads) differ by less than the model can claim (its median error on held-out
    rows is 13%, ``benchmarks/time_vs_published.py``), so they tie and the cheaper setting wins.  Rounding keeps the
    choice monotone: more memory adds settings, and the rounded minimum never grows."""
    return float(f"{seconds:.3g}")


def _evened(per_gpu: int, largest: int) -> int:
    """The fewest micro-steps that reach ``per_gpu`` sequences with micro-batches of at most ``largest``, each as
    small as that count allows: 38 fit and the target is 64 -> 2 micro-steps of 32 (not 38 + 38 = 76).  Same number
    of forward / backward passes, less memory, an overshoot below one micro-step; grows with ``largest``, so more
    memory still never gives a smaller micro-batch."""
    return math.ceil(per_gpu / math.ceil(per_gpu / largest))


def _fits_reason(req: PlanRequest, fit: _Fit, escalation: tuple[Escalation, ...]) -> tuple[str, str]:
    """The verdict's reason, full and short."""
    budget = req.budget_bytes
    calibrated = (f"; {req.calibration.describe()}" if req.calibration else "",
                  f"; calibrated {req.calibration.ratio - 1:+.0%}" if req.calibration else "")
    if fit.fits:
        host = fit.estimate.host_bytes
        peak = f"peak {fmt_gib(fit.estimate.total_bytes)} <= budget {fmt_gib(budget)}"
        return (peak + f" ({1 - req.safety_margin:.0%} of {fmt_gib(req.gpu.memory_bytes)})"
                + (f"; the offloaded states need {fmt_gib(host)} of host memory per node" if host else "")
                + calibrated[0],
                peak + (f"; host memory {fmt_gib(host)} per node" if host else "") + calibrated[1])
    first = next((e for e in escalation if e.fits), None)
    tried = ", ".join(x for x in ("gradient checkpointing" if fit.gc else "", fit.optim,
                                  STRATEGY_LABELS.get(fit.shard, "") if fit.shard != "ddp" else "") if x)
    needs = f"batch 1 needs {fmt_gib(fit.estimate.total_bytes)} > {fmt_gib(budget)} budget"
    change = first.change + f" ({fmt_gib(first.peak_memory_bytes)})" if first else ""
    return (f"even {needs} with {tried}; smallest change that fits: "
            + (change or f"none up to {MAX_GPUS} GPUs: shorten --seq-len (logits and activations grow with it)")
            + calibrated[0],
            f"{needs}; " + (f"smallest change that fits: {change}" if first else
                            f"nothing up to {MAX_GPUS} GPUs fits: shorten --seq-len") + calibrated[1])


def _batch_reason(req: PlanRequest, fit: _Fit, cap: int, target: int) -> tuple[str, str]:
    """The micro-batch's reason, full and short."""
    budget, est = req.budget_bytes, fit.estimate
    if not fit.fits:
        return "1: nothing larger can fit (see fits)", "even batch 1 does not fit"
    changes = fit.changes()
    using = f" with {' and '.join(changes)}" if changes else ""
    needs = (f"batch {fit.micro} needs {fmt_gib(est.total_bytes)} of {fmt_gib(budget)} ({req.safety_margin:.0%} "
             "safety margin)" + using)
    brief = f"{fmt_gib(est.total_bytes)} of {fmt_gib(budget)}"  # the fallbacks used have their own rows
    if fit.timed:
        chosen = fit.timed[0]
        others = "; ".join(f"{t.describe()}{' with checkpointing' if t.option.gc else ''}"
                           + (f" ({STRATEGY_LABELS[t.option.shard]})" if t.option.shard in STRATEGY_LABELS else "")
                           for t in fit.timed[1:3])
        return (f"the fastest fitting setting, predicted for {req.gpu.name}: {chosen.describe()} (micro-batches of "
                f"at least {_min_tokens()} tokens timed, up to the largest that fits: {fit.largest}); {needs}"
                + (f"; next: {others}" if others else ""),
                f"fastest predicted: {chosen.describe()}; {brief}")
    if fit.micro < fit.largest:
        steps = math.ceil(math.ceil(target / req.gpus) / fit.micro)
        return (f"{needs}; {steps} micro-steps of {fit.micro} reach the target {target} as {steps} of the largest "
                f"that fits ({fit.largest}) would, with less memory",
                f"{steps} micro-steps of {fit.micro} reach the target {target} ({fit.largest} would fit); {brief}")
    if fit.micro < cap:
        bigger = fit.option.estimate(req, fit.micro + 1).total_bytes
        limit = f"batch {fit.micro + 1} would need {fmt_gib(bigger)}"
        short_limit = f"batch {fit.micro + 1} needs {fmt_gib(bigger)}"
    elif cap < MAX_MICRO_BATCH:
        limit = f"capped at ceil(target {target} / {req.gpus} GPU{'s' if req.gpus > 1 else ''}) = {cap}"
        short_limit = f"the target {target} per GPU"
    else:
        limit = short_limit = f"capped at {MAX_MICRO_BATCH}"
    return f"largest that fits: {needs}; {limit}", f"largest that fits: {brief}; {short_limit}"


def _checkpointing_reason(req: PlanRequest, fit: _Fit) -> tuple[str, str]:
    """Gradient checkpointing's reason, full and short."""
    if req.gradient_checkpointing is not None:
        why = f"{'on' if fit.gc else 'off'}: set by --gradient-checkpointing"
        brief = "set by --gradient-checkpointing"
    elif not fit.fits:
        why = "on: tried, and even with it batch 1 does not fit" if fit.gc else "off"
        brief = "even with it batch 1 does not fit" if fit.gc else "off"
    elif not fit.gc and all(t.micro <= fit.micro for t in fit.timed if t.option.gc):
        why = f"off: batch {fit.micro} fits without it"
        brief = f"batch {fit.micro} fits without it"
    elif not fit.base_fit:
        why, brief = "on: required to fit batch 1", "required to fit batch 1"
    elif fit.timed:
        chosen = fit.timed[0]
        other = next(t for t in fit.timed if t.option.gc != fit.gc)
        state, other_state = ("on", "off") if fit.gc else ("off", "on")
        brief = f"{state}: {chosen.describe()}; {other_state}: {other.describe()} (predicted)"
        why = (f"{state}: the faster run, {chosen.describe()} against {other.describe()} with it {other_state} "
               f"(predicted for {req.gpu.name}: recommender/throughput.py; the fastest micro-batch of each, "
               f"{chosen.steps} and {other.steps} optimizer steps)")
        return (why + (" (recomputes each layer in backward, ~30% more compute)" if fit.gc else ""), brief)
    else:
        why = (f"on: raises the micro-batch from {fit.base_fit}, the most that fit without it (TRL's SFTConfig turns "
               f"it on by default); --no-gradient-checkpointing runs {fit.base_fit} with more accumulation")
        brief = f"micro-batch {fit.largest} instead of {fit.base_fit}"
    return (why + (" (recomputes each layer in backward, ~30% more compute)" if fit.gc else ""),
            brief + ("; ~30% more compute" if fit.gc else ""))


def _optim_reason(req: PlanRequest, fit: _Fit) -> tuple[str, str]:
    """The optimizer's reason, full and short."""
    if req.optim:
        return f"{fit.optim}: set by --optim", "set by --optim"
    if is_eight_bit(fit.optim):
        others = [x for x in ("gradient checkpointing" if fit.gc else "", STRATEGY_LABELS.get(fit.shard, "")) if x]
        return (f"{fit.optim}: 32-bit AdamW states do not fit even at batch 1"
                + (f" with {' and '.join(others)}" if others else "")
                + "; 8-bit paged states take ~2 bytes per trainable parameter instead of 8 (Dettmers et al. 2022)",
                "32-bit AdamW states do not fit at batch 1; 8-bit states take 2 bytes per parameter, not 8")
    return (f"{fit.optim}: transformers' default fused AdamW; its fp32 states fit",
            "default fused AdamW; its fp32 states fit")


def _distributed(req: PlanRequest, fit: _Fit) -> tuple[str, tuple[str, str] | None]:
    """The data-parallel mode and its reason, full and short (None on one GPU without DeepSpeed)."""
    if fit.shard in ZERO_STAGES:
        return fit.shard, _zero_reason(req, fit)
    if req.gpus == 1:
        return "single GPU", None
    timed = _by_strategy(req, fit)
    if fit.shard == "fsdp":
        ddp = fit.largest_without("ddp")
        return "fsdp", (f"FSDP full sharding over {req.gpus} GPUs: weights, gradients and optimizer states split 1/N"
                        + (("; replicated (DDP) even batch 1 does not fit" if not ddp else
                            f"; replicated (DDP) the largest micro-batch is {ddp}, sharded "
                            f"{fit.micro}") if fit.first.shard == "ddp" else "") + timed[0],
                        f"sharded over {req.gpus} GPUs"
                        + ((": replicated, batch 1 does not fit" if not ddp else
                            f": micro-batch {fit.micro}, {ddp} replicated") if fit.first.shard == "ddp" else "")
                        + timed[1])
    return "ddp", (("DDP: the replicated model fits on each GPU" + timed[0],
                    "the replicated model fits on each GPU" + timed[1]) if fit.fits
                   else ("DDP: nothing fits; see fits", "nothing fits"))


def _by_strategy(req: PlanRequest, fit: _Fit) -> tuple[str, str]:
    """Under ``--strategy auto`` on several GPUs, the fastest predicted setting of each data-parallel mode that fits,
    fastest first, as a clause of the reason (full, short); empty without predictions or with a forced strategy."""
    if req.strategy != "auto" or req.gpus == 1 or not fit.timed:
        return "", ""
    fastest: dict[str, _Timed] = {}
    for t in fit.timed:
        fastest.setdefault(t.option.shard, t)
    if len(fastest) < 2:
        return "", ""
    label = {"ddp": "DDP", "fsdp": "FSDP", "zero2": "ZeRO-2", "zero3": "ZeRO-3"}
    full = ", ".join(f"{label[shard]} {t.describe()}{' with checkpointing' if t.option.gc else ''}"
                     for shard, t in fastest.items())
    short = ", ".join(f"{label[shard]} {fmt_run_length(t.seconds)}" for shard, t in fastest.items())
    order = ", ".join(label[shard] for shard in req.sharded_strategies)
    return (f"; the fastest predicted of each that fits (--strategy auto, ties to the earlier of {order}): {full}",
            f"; predicted {short}")


def _zero_reason(req: PlanRequest, fit: _Fit) -> tuple[str, str]:
    stage = ZERO_STAGES[fit.shard]
    split = ("optimizer states and gradients split 1/N, 16-bit weights whole on each GPU" if stage == 2 else
             "16-bit weights, gradients and optimizer states split 1/N, the largest module gathered")
    offload = {"none": "", "optimizer": "; fp32 master weights, Adam states and 32-bit gradients offloaded to the "
               "host (DeepSpeed's CPU Adam steps there)", "all": "; parameters and optimizer offloaded to the host"}
    short_offload = {"none": "", "optimizer": ", optimizer offloaded", "all": ", parameters and optimizer offloaded"}
    host = fit.estimate.host_bytes
    over = f"DeepSpeed ZeRO-{stage} over {req.gpus} GPU{'s' if req.gpus > 1 else ''}"
    timed = _by_strategy(req, fit)
    chosen = "set by --strategy" if req.strategy != "auto" else "the fastest predicted; needs DeepSpeed installed"
    return (f"{over} ({chosen}): {split}"
            + offload[req.offload] + (f"; host memory per node {fmt_gib(host)} (DeepSpeed's estimator, 1.5x buffer)"
                                      if host else "") + timed[0],
            f"{over}{short_offload[req.offload]}" + (f"; host memory {fmt_gib(host)} per node" if host else "")
            + timed[1])


def recommend_plan(req: PlanRequest) -> Plan:
    """The plan for ``req``: the rules of the module docstring, applied in order, each with its reason (full, and
    in one line in ``short``)."""
    reasons: dict[str, str] = {}
    short: dict[str, str] = {}
    reasons["precision"] = (f"bf16: {req.gpu.name} supports bfloat16 (same range as fp32, no loss scaling)"
                            if req.dtype == "bf16" else
                            f"fp16 mixed precision: {req.gpu.name} has no bfloat16 (pre-Ampere); fp32 master weights "
                            "and loss scaling")
    short["precision"] = (f"{req.gpu.name} supports bfloat16" if req.dtype == "bf16" else
                          f"{req.gpu.name} has no bfloat16: fp16 with loss scaling")
    dataset = req.dataset_size or defaults.ASSUMED_DATASET_SIZE
    target = req.target_batch
    cap = max(1, min(MAX_MICRO_BATCH, math.ceil(target / req.gpus)))
    fit = _fit(req, cap)
    escalation = () if fit.fits else _escalate(req)
    reasons["per_device_train_batch_size"], short["per_device_train_batch_size"] = _batch_reason(req, fit, cap, target)
    reasons["fits"], short["fits"] = _fits_reason(req, fit, escalation)
    steps_target = target < min(req.target_effective_batch, dataset)  # lowered for enough optimizer steps
    micro = fit.micro
    accum = req.accumulation(micro)
    eff = micro * accum * req.gpus
    unit = f"packed rows of {req.resolved_seq_len} tokens" if req.packing else "examples"
    lowered = short_lowered = ""
    if target < req.target_effective_batch:
        lowered = (f"; target lowered from {req.target_effective_batch} to {target} so that {dataset} {unit} x "
                   f"{req.epochs:g} epochs make about {MIN_STEPS} optimizer steps (never below "
                   f"{MIN_EFFECTIVE_BATCH} sequences)" if steps_target else
                   f"; target lowered from {req.target_effective_batch} to the {dataset} training {unit}")
        short_lowered = (f"; lowered from {req.target_effective_batch} for about {MIN_STEPS} steps" if steps_target
                         else f"; lowered from {req.target_effective_batch} to the data's size")
    gpus = f"{req.gpus} GPU{'s' if req.gpus > 1 else ''}"
    reasons["gradient_accumulation_steps"] = (f"smallest with {micro} x accumulation x {gpus} >= target {target}: "
                                              f"{accum} (effective batch {eff}){lowered}")
    short["gradient_accumulation_steps"] = f"{micro} x {accum} x {gpus} = {eff} >= target {target}{short_lowered}"
    if fit.option.weights == "bf16":
        reasons["precision"] += (
            "; pure bf16 (weights, gradients and AdamW states in bf16) because fp32 master weights do not fit"
            + (" even with gradient checkpointing" if fit.gc else "")
            + ": updates smaller than 2^-8 of a weight are rounded away (a 2e-5 step on a weight of 0.01), so it "
            "trains less than mixed precision at small learning rates")
        short["precision"] += "; pure bf16 weights: fp32 masters do not fit (small updates round away)"
    reasons["gradient_checkpointing"], short["gradient_checkpointing"] = _checkpointing_reason(req, fit)
    reasons["optim"], short["optim"] = _optim_reason(req, fit)

    steps = max(1, math.ceil(math.ceil(dataset / eff) * req.epochs))
    reasons["total_steps"] = (f"ceil({dataset} {unit} / {eff}) x {req.epochs:g} epochs = {steps}"
                              + ("" if req.dataset_size else
                                 f" (dataset size not given: {defaults.ASSUMED_DATASET_SIZE} assumed)")
                              + ("; with packing TRL packs the examples into rows before training, so the dataset "
                                 "size counts rows (finetune-helper run counts them from the tokenized data)"
                                 if req.packing else "")
                              + (f"; fewer than {MIN_STEPS} optimizer steps even at the smallest effective batch "
                                 f"({MIN_EFFECTIVE_BATCH}): more data or epochs would train the model further"
                                 if steps < MIN_STEPS else ""))
    short["total_steps"] = (f"{dataset} {'packed rows' if req.packing else 'examples'}"
                            + ("" if req.dataset_size else " (assumed)") + f" / {eff} x {req.epochs:g} epochs"
                            + (f"; under {MIN_STEPS}: more data or epochs would train further"
                               if steps < MIN_STEPS else ""))
    lr_args = dict(method=req.method, optim=fit.optim, effective_batch=eff, hidden_size=req.model.hidden_size,
                   lora_r=req.lora_r, lora_alpha=req.lora_alpha, lr_min=req.lr_min, lr_max=req.lr_max)
    lr, reasons["learning_rate"], raw_lr = scaled_learning_rate(**lr_args)
    short["learning_rate"] = scaled_learning_rate(**lr_args, short=True)[1]
    ref_lr = lr_reference_rate(req.method, fit.optim)
    warm_args = (steps, eff, reference_batch(req.method, fit.optim))
    warm, reasons["warmup_ratio"] = warmup_ratio(*warm_args, lr_scale=lr / ref_lr)
    short["warmup_ratio"] = warmup_ratio(*warm_args, lr_scale=lr / ref_lr, short=True)[1]
    if req.scheduler == "one_cycle":  # its rise is the warmup
        warm = ONE_CYCLE_RISE
        reasons["warmup_ratio"] = (f"{ONE_CYCLE_RISE:.0%}: one-cycle's rise from peak/25 (OneCycleLR's pct_start) "
                                   f"-> {math.ceil(warm * steps)} steps")
        short["warmup_ratio"] = f"one-cycle's rise from peak/25 = {math.ceil(warm * steps)} steps"
    reasons["lr_scheduler_type"] = schedule_reason(req.method, fit.optim, req.scheduler)
    short["lr_scheduler_type"] = schedule_reason(req.method, fit.optim, req.scheduler, short=True)
    clip, clip_source = reference_clipping(req.method, fit.optim)
    reasons["max_grad_norm"] = f"{clip}: clip the global gradient norm as the LR reference was tuned ({clip_source})"
    short["max_grad_norm"] = "the clipping the LR reference was tuned with"
    reasons["weight_decay"] = (f"{WEIGHT_DECAY[req.method]}: " + ("AdamW decoupled decay as in Llama 2 SFT"
                               if req.method == "full" else "none on LoRA adapters (QLoRA paper)"))
    short["weight_decay"] = "AdamW decoupled decay" if req.method == "full" else "none on LoRA adapters"
    distributed, why = _distributed(req, fit)
    if why:
        reasons["distributed"], short["distributed"] = why
    reasons["trainer"] = TRAINER_REASONS[req.trainer]
    short["trainer"] = TRAINER_SHORT_REASONS[req.trainer]
    return Plan(
        request=req, per_device_train_batch_size=micro, gradient_accumulation_steps=accum, learning_rate=lr,
        warmup_ratio=warm, gradient_checkpointing=fit.gc, optim=fit.optim, bf16=req.dtype == "bf16",
        fp16=req.dtype == "fp16", fits=fit.fits, estimate=fit.estimate, total_steps=steps, distributed=distributed,
        weight_decay=WEIGHT_DECAY[req.method], reasons=reasons, short_reasons=short, escalation=escalation,
        weights_dtype=fit.option.weights, max_grad_norm=clip, lr_note=lr_bounds_note(lr, raw_lr),
        lr_scheduler_type=req.scheduler, run_seconds=fit.timed[0].seconds if fit.timed else None,
    )
