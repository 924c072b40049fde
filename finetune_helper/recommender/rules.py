"""The planner's rules for the learning rate, warmup and the other optimisation settings, with their sources.

Every constant names where it comes from; where a rule is a heuristic (the width rule) the reason it writes says
so.  Pure functions of numbers: :mod:`.plan` applies them to a request.

* learning rate: a published reference (``data/lr_references.yaml``) moved to the planned effective batch by the
  square-root rule (Adam family: Malladi et al. 2022, "On the SDEs and Scaling Rules for Adaptive Gradient
  Algorithms") or the linear rule (SGD: Goyal et al. 2017, "Accurate, Large Minibatch SGD"), to the model's width
  where the reference gives the widths it covers, to the adapter scale for LoRA, then clamped to the bounds;
* warmup: a share of the steps, longer for large batches, never fewer than a few steps, capped.
"""

from __future__ import annotations

import math

from . import catalog
from .optimizers import OPTIMIZERS

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


def scaled_learning_rate(*, method: str, optim: str, effective_batch: int, hidden_size: int, lora_r: int,
                         lora_alpha: float, lr_min: float, lr_max: float) -> tuple[float, str]:
    """The reference LR for ``method`` and ``optim``'s family, scaled to ``effective_batch`` (and the width and
    adapter scale where they apply) and clamped to [lr_min, lr_max], with its reason."""
    family = OPTIMIZERS[optim].family
    ref = catalog.lr_reference(method, family)
    ratio = effective_batch / ref["effective_batch"]
    if family == "sgd":
        raw, rule = ref["learning_rate"] * ratio, f"linear rule (SGD): {ref['learning_rate']:.1e} x {ratio:.3g}"
    else:
        raw = ref["learning_rate"] * math.sqrt(ratio)
        rule = f"square-root rule (Adam family): {ref['learning_rate']:.1e} x sqrt({effective_batch}/{ref['effective_batch']})"
    if family == "adam" and method == "full" and "hidden_sizes" in ref:
        factor, note = width_factor(hidden_size, *ref["hidden_sizes"])
        if factor != 1:
            raw *= factor
            rule += f" x {note}"
    if method != "full" and "lora_alpha" in ref:
        # The adapter's update to W is scaled by alpha/r (Hu et al. 2021, sec. 4.1: tuning alpha is roughly tuning
        # the learning rate), so a reference taken at another alpha/r is rescaled to ours.
        factor = (ref["lora_alpha"] / ref["lora_r"]) / (lora_alpha / lora_r)
        raw *= factor
        rule += (f" x (alpha/r {ref['lora_alpha']}/{ref['lora_r']} of the reference / {lora_alpha}/{lora_r} "
                 f"here = {factor:.3g})")
    lr = min(max(raw, lr_min), lr_max)
    reason = f"{rule} = {raw:.2e}; reference {ref['learning_rate']:.0e} at batch {ref['effective_batch']} ({ref['source']})"
    if lr != raw:
        bound = "--lr-max" if raw > lr_max else "--lr-min"
        reason += f"; clamped to {bound} {lr:.1e}"
        if raw > 2 * lr or raw < lr / 2:
            reason += f" (the rule asks for {raw:.1e}: widen the bounds to use it)"
    return lr, reason


def reference_batch(method: str, optim: str) -> int:
    """The effective batch the learning-rate reference for ``method`` and ``optim`` was tuned at."""
    return catalog.lr_reference(method, OPTIMIZERS[optim].family)["effective_batch"]


def width_factor(hidden_size: int, narrowest: int, widest: int) -> tuple[float, str]:
    """Adam's learning rate for a model outside the widths a reference covers: scaled by 1/width from the nearest
    covered width (muP, Yang et al. 2022, "Tensor Programs V", Table 3: Adam's hidden-weight LR ~ 1/fan_in).
    A heuristic extrapolation; 1 inside the covered range."""
    edge = narrowest if hidden_size < narrowest else widest if hidden_size > widest else hidden_size
    factor = edge / hidden_size
    return factor, (f"width {edge}/{hidden_size} (the reference covers hidden sizes {narrowest}-{widest}; beyond "
                    "them Adam's LR ~ 1/width, muP (Yang et al. 2022, Tensor Programs V, Table 3), a heuristic)")


def warmup_ratio(total_steps: int, effective_batch: int, reference_batch: int) -> tuple[float, str]:
    """The warmup share of ``total_steps`` and its reason (see :data:`WARMUP_BASE`)."""
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
