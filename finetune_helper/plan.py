"""From model + GPU + data to training settings, each with the rule and the numbers behind it.

spec -> estimate -> **plan** -> export.  Rules, in the order they are applied:
1. precision: bf16 where the GPU has it, else fp16 mixed precision;
2. fit: the largest per-device micro-batch whose estimated peak stays under (1 - safety margin) of GPU memory,
   turning on gradient checkpointing, then an 8-bit optimizer, only when batch 1 does not fit without them;
3. gradient accumulation: the smallest with micro x accumulation x GPUs >= the target effective batch;
4. learning rate: a published reference (``data/lr_references.yaml``) scaled to the effective batch by the
   square-root rule (Adam family) or the linear rule (SGD), clamped to [lr_min, lr_max];
5. warmup: 3% of steps, more for batches far above the reference and for very short runs, capped at 10%;
6. when batch 1 does not fit at all: the escalation LoRA -> QLoRA -> more GPUs (FSDP), naming the first that fits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from . import catalog
from .errors import FinetuneHelperError
from .estimate import MemoryEstimate, estimate_memory
from .gpu_spec import GPUSpec
from .model_spec import ModelSpec
from .optimizers import EIGHT_BIT_FALLBACK, OPTIMIZERS, is_eight_bit
from .training_setup import TrainingSetup
from .units import fmt_gib

#: Default learning-rate bounds (the product's stated defaults).
LR_MIN, LR_MAX = 1e-5, 5e-5
#: Default target effective batch: 64 sequences, as in Llama 2's SFT (Touvron et al. 2023, sec. 3.1).
TARGET_EFFECTIVE_BATCH = 64
#: Fraction of GPU memory kept free for what the estimate cannot see (other processes, allocator spikes, NCCL).
SAFETY_MARGIN = 0.10
#: Warmup: 3% of steps is the common SFT default (Stanford Alpaca and TRL examples use warmup_ratio 0.03); we add
#: up to 2 points for effective batches far above the reference (large-batch training needs longer warmup, Goyal
#: et al. 2017 sec. 2.2) and keep at least 10 warmup steps on short runs, capped at 10% (Llama 2 / GPT-3 practice).
WARMUP_BASE, WARMUP_MAX, WARMUP_MIN_STEPS = 0.03, 0.10, 10
#: Cosine decay to 0 and clipping at 1.0 (Llama 2 SFT; transformers' default max_grad_norm).
SCHEDULER, MAX_GRAD_NORM = "cosine", 1.0
#: Weight decay: 0.1 for full fine-tuning (Llama 2), 0 for LoRA adapters (QLoRA paper, app. B.2).
WEIGHT_DECAY = {"full": 0.1, "lora": 0.0, "qlora": 0.0}
#: The fused AdamW is transformers 5's default optimizer and the fastest torch one on GPU.
DEFAULT_OPTIM = "adamw_torch_fused"
#: Largest per-device micro-batch the planner proposes (beyond it throughput stops improving on any current GPU).
MAX_MICRO_BATCH = 128
#: Examples assumed when the dataset size is not given.
ASSUMED_DATASET_SIZE = 10_000
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
    #: GPUs on the node(s); beyond 1 the run is data parallel (DDP, or FSDP when only sharding fits).
    gpus: int = 1
    method: str = "full"
    #: tokens per sequence; None means min(2048, the model's max_position_embeddings).
    seq_len: int | None = None
    #: training examples (sequences after packing/truncation); None assumes 10,000.
    dataset_size: int | None = None
    epochs: float = 3.0
    target_effective_batch: int = TARGET_EFFECTIVE_BATCH
    #: a ``TrainingArguments.optim`` name, or None to let the planner choose.
    optim: str | None = None
    lr_min: float = LR_MIN
    lr_max: float = LR_MAX
    #: None lets the planner decide; True/False forces it.
    gradient_checkpointing: bool | None = None
    safety_margin: float = SAFETY_MARGIN
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    #: None means the architecture's default (``sdpa``; ``eager`` for Gemma 2).
    attn_implementation: str | None = None

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
        if self.optim is not None and self.optim not in OPTIMIZERS:
            raise FinetuneHelperError("optim", f"{self.optim!r} is not supported; choose from {', '.join(OPTIMIZERS)}")
        self.setup(1, False)  # validates method, LoRA and attention settings early

    @property
    def resolved_seq_len(self) -> int:
        return self.model.sequence_length(self.seq_len)

    @property
    def dtype(self) -> str:
        return "bf16" if self.gpu.bf16 else "fp16"

    def setup(self, micro_batch: int, gradient_checkpointing: bool, optim: str | None = None,
              method: str | None = None) -> TrainingSetup:
        return TrainingSetup(
            method=method or self.method, micro_batch_size=micro_batch, seq_len=self.resolved_seq_len,
            dtype=self.dtype, optim=optim or self.optim or DEFAULT_OPTIM,
            gradient_checkpointing=gradient_checkpointing, lora_r=self.lora_r, lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            attn_implementation=self.attn_implementation or self.model.default_attn_implementation,
        )

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
    """The recommendation. ``reasons`` maps each setting to its one-line justification."""

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
    reasons: dict[str, str] = field(default_factory=dict)
    escalation: tuple[Escalation, ...] = ()

    @property
    def effective_batch_size(self) -> int:
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * self.request.gpus

    @property
    def peak_memory_bytes(self) -> int:
        return self.estimate.total_bytes

    @property
    def warmup_steps(self) -> int:
        return math.ceil(self.warmup_ratio * self.total_steps)

    def training_kwargs(self) -> dict[str, Any]:
        """The plan as ``TrainingArguments`` keyword arguments, version-neutral (4.x names: ``warmup_ratio``,
        ``gradient_checkpointing``); ``export`` adapts them to the installed transformers."""
        return {
            "per_device_train_batch_size": self.per_device_train_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "learning_rate": self.learning_rate,
            "lr_scheduler_type": self.lr_scheduler_type,
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
        }

    def settings_rows(self) -> list[tuple[str, str, str]]:
        """(setting, value, reason) for every recommended value, in the order the CLI and the app show them."""
        r = self.reasons
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
        return rows

    def to_training_arguments(self, output_dir: str, **overrides: Any) -> Any:
        """A real ``transformers.TrainingArguments`` for the installed version (imports transformers)."""
        from .export import to_training_arguments

        return to_training_arguments(self, output_dir=output_dir, **overrides)

    def to_dict(self) -> dict[str, Any]:
        r = self.request
        return {
            "model": r.model.name,
            "parameters": r.model.num_parameters(),
            "gpu": r.gpu.name,
            "gpu_memory_bytes": r.gpu.memory_bytes,
            "gpus": r.gpus,
            "method": r.method,
            "seq_len": r.resolved_seq_len,
            "per_device_train_batch_size": self.per_device_train_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "effective_batch_size": self.effective_batch_size,
            "learning_rate": self.learning_rate,
            "warmup_ratio": self.warmup_ratio,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "lr_scheduler_type": self.lr_scheduler_type,
            "weight_decay": self.weight_decay,
            "max_grad_norm": self.max_grad_norm,
            "gradient_checkpointing": self.gradient_checkpointing,
            "optim": self.optim,
            "bf16": self.bf16,
            "fp16": self.fp16,
            "distributed": self.distributed,
            "fits": self.fits,
            "peak_memory_bytes": self.peak_memory_bytes,
            "budget_bytes": r.budget_bytes,
            "breakdown": self.estimate.breakdown,
            "trainable_parameters": self.estimate.trainable_parameters,
            "reasons": dict(self.reasons),
            "escalation": [{"change": e.change, "fits": e.fits, "peak_memory_bytes": e.peak_memory_bytes}
                           for e in self.escalation],
        }


# --------------------------------------------------------------------------------------------- fitting
def _estimate(req: PlanRequest, micro: int, gc: bool, optim: str, method: str | None = None, gpus: int | None = None,
              sharding: str | None = None) -> MemoryEstimate:
    gpus = gpus or req.gpus
    if sharding is None:
        sharding = "ddp" if gpus > 1 else "none"
    return estimate_memory(req.model, req.setup(micro, gc, optim, method), gpus=gpus, sharding=sharding)


def _largest_batch(req: PlanRequest, gc: bool, optim: str, sharding: str | None, cap: int) -> int:
    """Largest micro-batch in [1, cap] under budget (memory grows with batch, so bisect); 0 if 1 does not fit."""
    def fits(b: int) -> bool:
        return _estimate(req, b, gc, optim, sharding=sharding).total_bytes <= req.budget_bytes

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


def _escalate(req: PlanRequest) -> tuple[Escalation, ...]:
    """Batch 1 does not fit: the ladder gradient checkpointing -> 8-bit optimizer -> LoRA -> QLoRA -> more GPUs,
    each rung with its peak at batch 1, up to the first that fits."""
    steps: list[Escalation] = []
    optim = req.optim or DEFAULT_OPTIM
    sharding = "fsdp" if req.gpus > 1 else None
    if req.gradient_checkpointing is None:
        est = _estimate(req, 1, True, optim, sharding=sharding)
        steps.append(Escalation("gradient checkpointing", False, est.total_bytes))
    if req.optim is None:
        est = _estimate(req, 1, req.gradient_checkpointing is not False, EIGHT_BIT_FALLBACK, sharding=sharding)
        steps.append(Escalation(f"--optim {EIGHT_BIT_FALLBACK}" + (" (with gradient checkpointing)"
                                if req.gradient_checkpointing is not False else ""), False, est.total_bytes))
    ladder = {"full": ["lora", "qlora"], "lora": ["qlora"], "qlora": []}[req.method]
    for method in ladder:
        est = _estimate(req, 1, True, optim, method=method, sharding=sharding)
        steps.append(Escalation(f"--method {method} (with gradient checkpointing"
                                + (", FSDP)" if sharding == "fsdp" else ")"), est.total_bytes <= req.budget_bytes,
                                est.total_bytes))
        if steps[-1].fits:
            return tuple(steps)
    for gpus in (2, 4, 8, 16, 32, MAX_GPUS):
        if gpus <= req.gpus:
            continue
        est = _estimate(req, 1, True, optim, gpus=gpus, sharding="fsdp")
        steps.append(Escalation(f"--gpus {gpus} with FSDP full sharding ({req.method}, gradient checkpointing)",
                                est.total_bytes <= req.budget_bytes, est.total_bytes))
        if steps[-1].fits:
            break
    return tuple(steps)


# --------------------------------------------------------------------------------------------- the plan
def scaled_learning_rate(req: PlanRequest, effective_batch: int, optim: str) -> tuple[float, str]:
    """Reference LR scaled to ``effective_batch`` and clamped, with its reason."""
    family = OPTIMIZERS[optim].family
    ref = catalog.lr_reference(req.method, family)
    ratio = effective_batch / ref["effective_batch"]
    if family == "sgd":
        raw, rule = ref["learning_rate"] * ratio, f"linear rule (SGD): {ref['learning_rate']:.1e} x {ratio:.3g}"
    else:
        raw = ref["learning_rate"] * math.sqrt(ratio)
        rule = f"square-root rule (Adam family): {ref['learning_rate']:.1e} x sqrt({effective_batch}/{ref['effective_batch']})"
    if family == "adam" and req.method == "full" and "hidden_sizes" in ref:
        factor, note = width_factor(req.model.hidden_size, *ref["hidden_sizes"])
        if factor != 1:
            raw *= factor
            rule += f" x {note}"
    if req.method != "full" and "lora_alpha" in ref:
        # The adapter's update to W is scaled by alpha/r (Hu et al. 2021, sec. 4.1: tuning alpha is roughly tuning
        # the learning rate), so a reference taken at another alpha/r is rescaled to ours.
        factor = (ref["lora_alpha"] / ref["lora_r"]) / (req.lora_alpha / req.lora_r)
        raw *= factor
        rule += (f" x (alpha/r {ref['lora_alpha']}/{ref['lora_r']} of the reference / {req.lora_alpha}/{req.lora_r} "
                 f"here = {factor:.3g})")
    lr = min(max(raw, req.lr_min), req.lr_max)
    reason = f"{rule} = {raw:.2e}; reference {ref['learning_rate']:.0e} at batch {ref['effective_batch']} ({ref['source']})"
    if lr != raw:
        bound = "--lr-max" if raw > req.lr_max else "--lr-min"
        reason += f"; clamped to {bound} {lr:.1e}"
        if raw > 2 * lr or raw < lr / 2:
            reason += f" (the rule asks for {raw:.1e}: widen the bounds to use it)"
    return lr, reason


def width_factor(hidden_size: int, narrowest: int, widest: int) -> tuple[float, str]:
    """Adam's learning rate for a model outside the widths a reference covers: scaled by 1/width from the nearest
    covered width (muP, Yang et al. 2022, "Tensor Programs V", Table 3: Adam's hidden-weight LR ~ 1/fan_in).
    A heuristic extrapolation; 1 inside the covered range."""
    edge = narrowest if hidden_size < narrowest else widest if hidden_size > widest else hidden_size
    factor = edge / hidden_size
    return factor, (f"width {edge}/{hidden_size} (the reference covers hidden sizes {narrowest}-{widest}; beyond "
                    "them Adam's LR ~ 1/width, muP (Yang et al. 2022, Tensor Programs V, Table 3), a heuristic)")


def warmup_ratio(total_steps: int, effective_batch: int, reference_batch: int) -> tuple[float, str]:
    ratio, why = WARMUP_BASE, [f"{WARMUP_BASE:.0%} of {total_steps} steps (common SFT default)"]
    scale = effective_batch / reference_batch
    if scale >= 2:
        extra = min(0.02, 0.01 * math.log2(scale))
        ratio += extra
        why.append(f"+{extra:.1%} for an effective batch {scale:.3g}x the reference")
    if ratio * total_steps < WARMUP_MIN_STEPS:
        ratio = WARMUP_MIN_STEPS / total_steps
        why.append(f"raised to {WARMUP_MIN_STEPS} warmup steps on a short run")
    if ratio > WARMUP_MAX:
        ratio = WARMUP_MAX
        why.append(f"capped at {WARMUP_MAX:.0%}")
    ratio = round(ratio, 4)
    n = math.ceil(ratio * total_steps)
    return ratio, "; ".join(why) + f" -> {ratio:.2%} = {n} step{'s' if n != 1 else ''}"


def recommend_plan(req: PlanRequest) -> Plan:
    reasons: dict[str, str] = {}
    dtype = req.dtype
    reasons["precision"] = (f"bf16: {req.gpu.name} supports bfloat16 (same range as fp32, no loss scaling)"
                            if dtype == "bf16" else
                            f"fp16 mixed precision: {req.gpu.name} has no bfloat16 (pre-Ampere); fp32 master weights "
                            "and loss scaling")
    dataset = req.dataset_size or ASSUMED_DATASET_SIZE
    target = min(req.target_effective_batch, dataset)  # a batch larger than the data would be one partial step
    cap = max(1, min(MAX_MICRO_BATCH, math.ceil(target / req.gpus)))
    budget = req.budget_bytes
    multi = req.gpus > 1
    optim = req.optim or DEFAULT_OPTIM

    # Cheapest first; each later option is a fallback that costs speed (checkpointing ~30% compute, FSDP
    # communication) or precision (8-bit states). On several GPUs, full fine-tuning shards before it recomputes;
    # LoRA (small gradients and states) recomputes before it shards.
    gc_choices = [req.gradient_checkpointing] if req.gradient_checkpointing is not None else [False, True]
    optim_choices = [optim] if req.optim else [optim, EIGHT_BIT_FALLBACK]
    shard_choices = ["ddp", "fsdp"] if multi else ["none"]
    options: list[tuple[bool, str, str]] = []
    for opt in optim_choices:
        if req.method == "full":
            options += [(gc, opt, shard) for gc in gc_choices for shard in shard_choices]
        else:
            options += [(gc, opt, shard) for shard in shard_choices for gc in gc_choices]
    chosen = None
    fallback_fit = 0  # largest micro-batch the memory-saving fallback would allow (reported, not used)
    for index, (gc, opt, shard) in enumerate(options):
        micro = _largest_batch(req, gc, opt, shard, cap)
        if micro:
            if index > 0:
                # A fallback (checkpointing, FSDP, 8-bit states) was needed to fit batch 1 at all. Stay at micro-batch
                # 1 and reach the target by accumulation: the sequence already fills the GPU's matmuls, and a larger
                # GPU (which needs no fallback) must never be told to use a smaller micro-batch than a smaller GPU.
                fallback_fit, micro = micro, 1
            chosen = (micro, gc, opt, shard)
            break

    escalation: tuple[Escalation, ...] = ()
    if chosen is None:
        fits = False
        gc, opt, shard = options[-1]
        micro = 1
        escalation = _escalate(req)
        first = next((e for e in escalation if e.fits), None)
        est = _estimate(req, 1, gc, opt, sharding=shard)
        tried = ", ".join(x for x in ("gradient checkpointing" if gc else "", opt,
                                      "FSDP sharding" if shard == "fsdp" else "") if x)
        reasons["fits"] = (f"even batch 1 needs {fmt_gib(est.total_bytes)} > {fmt_gib(budget)} budget with {tried}; "
                           "smallest change that fits: "
                           + (first.change + f" ({fmt_gib(first.peak_memory_bytes)})" if first else
                              f"none up to {MAX_GPUS} GPUs: shorten --seq-len (logits and activations grow with it)"))
    else:
        fits = True
        micro, gc, opt, shard = chosen
        est = _estimate(req, micro, gc, opt, sharding=shard)
        reasons["fits"] = (f"peak {fmt_gib(est.total_bytes)} <= budget {fmt_gib(budget)} "
                           f"({1 - req.safety_margin:.0%} of {fmt_gib(req.gpu.memory_bytes)})")
    first_gc, first_opt, first_shard = options[0]
    changes = [c for c, on in (("gradient checkpointing", gc and not first_gc), (opt, opt != first_opt),
                               ("FSDP sharding", shard != first_shard)) if on]
    if fits and fallback_fit:
        reasons["per_device_train_batch_size"] = (
            f"1: without {' and '.join(changes)} even batch 1 exceeds the {fmt_gib(budget)} budget; with "
            f"{'them' if len(changes) > 1 else 'it'} batch 1 needs {fmt_gib(est.total_bytes)}"
            + (f" (up to {fallback_fit} would fit)" if fallback_fit > 1 else "")
            + f"; accumulation reaches the target, as a bigger micro-batch adds little throughput at "
            f"{req.resolved_seq_len} tokens per sequence")
    elif fits:
        if micro < cap:
            limit = f"batch {micro + 1} would need {fmt_gib(_estimate(req, micro + 1, gc, opt, sharding=shard).total_bytes)}"
        elif cap < MAX_MICRO_BATCH:
            limit = f"capped at ceil(target {target} / {req.gpus} GPU{'s' if multi else ''}) = {cap}"
        else:
            limit = f"capped at {MAX_MICRO_BATCH}"
        reasons["per_device_train_batch_size"] = (f"largest that fits: batch {micro} needs {fmt_gib(est.total_bytes)} of "
                                                  f"{fmt_gib(budget)} ({req.safety_margin:.0%} safety margin); {limit}")
    else:
        reasons["per_device_train_batch_size"] = "1: nothing larger can fit (see fits)"

    accum = max(1, math.ceil(target / (micro * req.gpus)))
    eff = micro * accum * req.gpus
    reasons["gradient_accumulation_steps"] = (f"smallest with {micro} x accumulation x {req.gpus} GPU"
                                              f"{'s' if multi else ''} >= target {target}: {accum} "
                                              f"(effective batch {eff})"
                                              + (f"; target lowered from {req.target_effective_batch} to the "
                                                 f"{dataset} training examples" if target < req.target_effective_batch
                                                 else ""))
    if req.gradient_checkpointing is not None:
        ckpt_why = f"{'on' if gc else 'off'}: set by --gradient-checkpointing"
    elif gc:
        ckpt_why = "on: required to fit batch 1" if fits else "on: tried, and even with it batch 1 does not fit"
    else:
        ckpt_why = "off: not needed to fit"
    reasons["gradient_checkpointing"] = ckpt_why + (" (recomputes each layer in backward, ~30% more compute)" if gc else "")
    if req.optim:
        reasons["optim"] = f"{opt}: set by --optim"
    elif is_eight_bit(opt):
        others = [x for x in ("gradient checkpointing" if gc else "", "FSDP sharding" if shard == "fsdp" else "") if x]
        reasons["optim"] = (f"{opt}: 32-bit AdamW states do not fit even at batch 1"
                            + (f" with {' and '.join(others)}" if others else "")
                            + "; 8-bit paged states take ~2 bytes per trainable parameter instead of 8 "
                              "(Dettmers et al. 2022)")
    else:
        reasons["optim"] = f"{opt}: transformers' default fused AdamW; its fp32 states fit"

    steps = max(1, math.ceil(math.ceil(dataset / eff) * req.epochs))
    reasons["total_steps"] = (f"ceil({dataset} examples / {eff}) x {req.epochs:g} epochs = {steps}"
                              + ("" if req.dataset_size else f" (dataset size not given: {ASSUMED_DATASET_SIZE} assumed)"))
    lr, reasons["learning_rate"] = scaled_learning_rate(req, eff, opt)
    ref_batch = catalog.lr_reference(req.method, OPTIMIZERS[opt].family)["effective_batch"]
    warm, reasons["warmup_ratio"] = warmup_ratio(steps, eff, ref_batch)
    reasons["lr_scheduler_type"] = f"{SCHEDULER} decay after warmup (Llama 2 SFT; transformers decays to 0)"
    reasons["max_grad_norm"] = f"{MAX_GRAD_NORM}: clip the global gradient norm (Llama 2 pretraining, sec. 2.2; transformers default)"
    reasons["weight_decay"] = (f"{WEIGHT_DECAY[req.method]}: " + ("AdamW decoupled decay as in Llama 2 SFT"
                               if req.method == "full" else "none on LoRA adapters (QLoRA paper)"))
    distributed = ("single GPU" if not multi else "fsdp" if shard == "fsdp" else "ddp")
    if multi:
        if shard == "fsdp":
            reasons["distributed"] = (f"FSDP full sharding over {req.gpus} GPUs: weights, gradients and optimizer "
                                      "states split 1/N" + ("; replicated (DDP) they do not fit" if
                                                            first_shard == "ddp" else ""))
        else:
            reasons["distributed"] = ("DDP: the replicated model fits on each GPU" if fits else
                                      "DDP: nothing fits; see fits")
    return Plan(
        request=req, per_device_train_batch_size=micro, gradient_accumulation_steps=accum, learning_rate=lr,
        warmup_ratio=warm, gradient_checkpointing=gc, optim=opt, bf16=dtype == "bf16", fp16=dtype == "fp16",
        fits=fits, estimate=est, total_steps=steps, distributed=distributed, weight_decay=WEIGHT_DECAY[req.method],
        reasons=reasons, escalation=escalation,
    )
