"""The planner's rules for the learning rate, warmup and the other optimisation settings, with their sources.

Every constant names where it comes from; where a rule is a heuristic (the width rule) the reason it writes says
so.  Pure functions of numbers: :mod:`.plan` applies them to a request.

* learning rate: a published reference (``data/lr_references.yaml``) moved to the planned effective batch by the
  square-root rule (Adam family: Malladi et al. 2022, "On the SDEs and Scaling Rules for Adaptive Gradient
  Algorithms") or the linear rule (SGD: Goyal et al. 2017, "Accurate, Large Minibatch SGD"), to the model's width
  where the reference gives the widths it covers, to the adapter scale for LoRA, then clamped to the bounds;
* warmup: 5-10% of the steps, longer for large batches and high LRs, never fewer than 10 steps, capped in steps;
* clipping and schedule: the reference's clipping; cosine, with the reference's own schedule named when it differs;
* enough steps: the effective batch lowered on small data so that the run has :data:`MIN_STEPS` updates.
"""

from __future__ import annotations

import math

from .. import defaults
from . import catalog
from .optimizers import OPTIMIZERS

#: Warmup: 5% of the steps, up to 10% when the effective batch or the learning rate is far above the reference's
#: (the practical tuning guide this product follows: warmup 5-10% of steps, more for large batches and high LRs;
#: Goyal et al. 2017 sec. 2.2: a gradual warmup is what makes a large batch / LR trainable): +1.25 points per
#: doubling.  At least 10 steps on short runs (said when that is above 10%); at most 2000 steps on very long ones
#: (the warmup Llama 2's pretraining used, Touvron et al. 2023 sec. 2.2).
WARMUP_BASE, WARMUP_MAX, WARMUP_PER_DOUBLING, WARMUP_MIN_STEPS, WARMUP_MAX_STEPS = 0.05, 0.10, 0.0125, 10, 2000
#: Cosine decay to 0 after warmup: the product's default schedule (Llama 2 SFT; transformers decays to 0); clipping
#: comes with each LR reference (``data/lr_references.yaml``), 1.0 when it gives none (transformers' default).
SCHEDULER, MAX_GRAD_NORM = defaults.SCHEDULER, 1.0
#: The schedules a plan can use, built by ``transformers.get_scheduler`` from ``lr_scheduler_type`` and
#: ``lr_scheduler_kwargs`` (so the Trainer runs exactly what :mod:`.schedule` plots) -- one-cycle as transformers'
#: ``cosine_warmup_with_min_lr`` -- except step decay, which has no ``get_scheduler`` type: ``finetune-helper run``
#: gives the Trainer a ``LambdaLR`` of :func:`.schedule.lr_at` (its TrainingArguments say ``constant_with_warmup``,
#: the same warmup), and ``export`` refuses it.
SCHEDULES = defaults.SCHEDULES
#: the ``lr_scheduler_type`` a schedule runs as, where its name is not one
TRAINER_SCHEDULERS = {"one_cycle": "cosine_warmup_with_min_lr", "step_decay": "constant_with_warmup"}
#: one-cycle (Smith & Topin 2018, "Super-Convergence") with torch's ``OneCycleLR`` defaults: the first 30% of the
#: steps rise from peak/25 to the peak, then a cosine falls to peak/(25 x 10^4) (``pct_start=0.3``, ``div_factor=25``,
#: ``final_div_factor=1e4``); transformers' rise is linear (``OneCycleLR``'s default anneals it by a cosine too)
ONE_CYCLE_RISE, ONE_CYCLE_START, ONE_CYCLE_END = 0.3, 1 / 25, 1 / (25 * 1e4)
#: step decay: the LR divided by 10 at 50% and 75% of the steps (He et al. 2016, "Deep Residual Learning", sec. 4.2:
#: "divide it by 10 at 32k and 48k iterations, and terminate training at 64k iterations")
STEP_DECAY_MILESTONES, STEP_DECAY_GAMMA = (0.5, 0.75), 0.1
#: cosine_with_min_lr decays to 10% of the peak (Llama 2, Touvron et al. 2023 sec. 2.2: "decay final learning rate
#: down to 10% of the peak learning rate")
MIN_LR_RATE = 0.1
#: warmup-stable-decay holds the peak and decays over the last 20% of the steps (Hagele et al. 2024, "Scaling Laws
#: and Compute-Optimal Training Beyond Fixed Training Durations": a cooldown of about 20% of the run matches cosine)
WSD_DECAY_SHARE = 0.2
_SCHEDULE_WHY = {
    "cosine": "cosine decay after warmup (Llama 2 SFT; transformers decays to 0)",
    "linear": "linear decay to 0 after warmup (transformers' default schedule)",
    "constant_with_warmup": "constant after warmup: the peak LR to the end (how QLoRA's reference was tuned)",
    "cosine_with_min_lr": f"cosine decay to {MIN_LR_RATE:.0%} of the peak (Llama 2 sec. 2.2)",
    "warmup_stable_decay": (f"warmup, then the peak held, then a cosine decay over the last {WSD_DECAY_SHARE:.0%} "
                            "of the steps (Hagele et al. 2024: on par with cosine, and the run can be extended)"),
    "one_cycle": (f"one-cycle (Smith & Topin 2018): {ONE_CYCLE_RISE:.0%} of the steps rising from peak/25, then a "
                  "cosine to peak/250000 (torch OneCycleLR's defaults; transformers' cosine_warmup_with_min_lr)"),
    "step_decay": ("step decay: the peak after warmup, divided by 10 at "
                   + " and ".join(f"{m:.0%}" for m in STEP_DECAY_MILESTONES) + " of the steps (He et al. 2016 sec. "
                   "4.2); a LambdaLR finetune-helper run gives the Trainer (no TrainingArguments type)"),
}
#: the same, in a few words for the terminal (``recommend`` without ``--explain``)
_SCHEDULE_SHORT = {
    "cosine": "cosine decay to 0 after warmup",
    "linear": "linear decay to 0 after warmup",
    "constant_with_warmup": "the peak LR from warmup to the end",
    "cosine_with_min_lr": f"cosine decay to {MIN_LR_RATE:.0%} of the peak",
    "warmup_stable_decay": f"the peak held, then a cosine decay over the last {WSD_DECAY_SHARE:.0%} of the steps",
    "one_cycle": f"one-cycle: {ONE_CYCLE_RISE:.0%} of the steps rising from peak/25, then a cosine down",
    "step_decay": ("the peak divided by 10 at " + " and ".join(f"{m:.0%}" for m in STEP_DECAY_MILESTONES)
                   + " of the steps"),
}
#: Enough optimizer steps: on small data the effective batch is lowered (never below ``MIN_EFFECTIVE_BATCH``
#: sequences) so that the run has at least ``MIN_STEPS`` updates: a warmup of 10 steps and a decay of several tens
#: (a heuristic of this product, not a published figure).
MIN_STEPS, MIN_EFFECTIVE_BATCH = 100, 8
#: Weight decay: 0.1 for full fine-tuning (Llama 2), 0 for LoRA adapters (QLoRA paper, app. B.2).
WEIGHT_DECAY = {"full": 0.1, "lora": 0.0, "qlora": 0.0}
#: The fused AdamW is transformers 5's default optimizer and the fastest torch one on GPU.
DEFAULT_OPTIM = "adamw_torch_fused"


def scaled_learning_rate(*, method: str, optim: str, effective_batch: int, hidden_size: int, lora_r: int,
                         lora_alpha: float, lr_min: float, lr_max: float, short: bool = False
                         ) -> tuple[float, str, float]:
    """The reference LR for ``method`` and ``optim``'s family, scaled to ``effective_batch`` (and the width and
    adapter scale where they apply) and clamped to [lr_min, lr_max], with its reason and the unclamped value.
    ``short``: the reason in one line for the terminal (the rule, the reference's rate and batch, the factors and
    the clamp), without the derivation's numbers and the sources."""
    family = OPTIMIZERS[optim].family
    ref = catalog.lr_reference(method, family)
    ratio = effective_batch / ref["effective_batch"]
    if family == "sgd":
        raw, rule = ref["learning_rate"] * ratio, f"linear rule (SGD): {ref['learning_rate']:.1e} x {ratio:.3g}"
        brief = "linear rule (SGD)"
    else:
        raw = ref["learning_rate"] * math.sqrt(ratio)
        rule = (f"square-root rule (Adam family): {ref['learning_rate']:.1e} x "
                f"sqrt({effective_batch}/{ref['effective_batch']})")
        brief = "square-root rule (Adam family)"
    brief += f" from {ref['learning_rate']:.0e} at batch {ref['effective_batch']}"
    if family == "adam" and method == "full" and "hidden_sizes" in ref:
        factor, note = width_factor(hidden_size, *ref["hidden_sizes"])
        if factor != 1:
            raw *= factor
            rule += f" x {note}"
            brief += f", x {factor:.3g} for width {hidden_size} (a heuristic)"
    if method != "full" and "lora_alpha" in ref and ref["lora_alpha"] != lora_alpha:
        # LoRA scales its update by alpha/r. Hu et al. 2021, sec. 4.1: with Adam, "tuning alpha is roughly the same
        # as tuning the learning rate", and the alpha/r scaling "helps to reduce the need to retune hyperparameters
        # when we vary r": the LR moves with alpha alone (1/alpha), not with the rank.
        factor = ref["lora_alpha"] / lora_alpha
        raw *= factor
        rule += (f" x alpha {ref['lora_alpha']} of the reference / {lora_alpha} here = {factor:.3g} (Hu et al. "
                 "2021 sec. 4.1: alpha acts as the LR, the rank does not; a heuristic)")
        brief += f", x {factor:.3g} for alpha {lora_alpha:g}"
    lr = min(max(raw, lr_min), lr_max)
    reason = (f"{rule} = {raw:.2e}; reference {ref['learning_rate']:.0e} at batch {ref['effective_batch']} "
              f"({ref['source']})")
    if lr != raw:
        bound = "--lr-max" if raw > lr_max else "--lr-min"
        reason += f"; clamped to {bound} {lr:.1e}"
        brief += f", clamped to {bound} {lr:.1e}"
        if raw > 2 * lr or raw < lr / 2:
            reason += f" (the rule asks for {raw:.1e}: widen the bounds to use it)"
            brief += f" (rule: {raw:.1e})"
    return lr, brief if short else reason, raw


def lr_bounds_note(lr: float, raw: float) -> str | None:
    """The verdict's line when the rule asks for an LR more than 2x outside the bounds, else None."""
    if raw > 2 * lr:
        return (f"learning rate: the rule asks for {raw:.1e}, {raw / lr:.1f}x the --lr-max bound {lr:.1e} it was "
                f"clamped to; widen it (--lr-max {raw:.0e}, or recommend.lr_max in a recipe) to train at the rule's "
                "rate")
    if raw < lr / 2:
        return (f"learning rate: the rule asks for {raw:.1e}, {lr / raw:.1f}x below the --lr-min bound {lr:.1e} it "
                f"was clamped to; lower it (--lr-min {raw:.0e}, or recommend.lr_min) to train at the rule's rate")
    return None


def reference_clipping(method: str, optim: str) -> tuple[float, str]:
    """The gradient-clipping threshold the LR reference was tuned with, and its source."""
    ref = catalog.lr_reference(method, OPTIMIZERS[optim].family)
    norm = ref.get("max_grad_norm", MAX_GRAD_NORM)
    return norm, ref.get("clipping_source", "transformers' default max_grad_norm")


def scheduler_kwargs(scheduler: str, total_steps: int, warmup_steps: int) -> dict[str, float | int]:
    """The ``lr_scheduler_kwargs`` ``scheduler`` needs for a run of ``total_steps`` (empty for most)."""
    if scheduler == "cosine_with_min_lr":
        return {"min_lr_rate": MIN_LR_RATE}
    if scheduler == "warmup_stable_decay":
        return {"num_decay_steps": min(max(1, math.ceil(WSD_DECAY_SHARE * total_steps)),
                                       max(0, total_steps - warmup_steps))}
    if scheduler == "one_cycle":
        return {"warmup_lr_rate": ONE_CYCLE_START, "min_lr_rate": ONE_CYCLE_END}
    if scheduler == "step_decay":
        return {"milestones": list(STEP_DECAY_MILESTONES), "gamma": STEP_DECAY_GAMMA}
    return {}


def schedule_reason(method: str, optim: str, scheduler: str = SCHEDULER, *, short: bool = False) -> str:
    """Why this schedule, and what the LR reference was tuned with when that differs (``short``: in a few words,
    without the sources)."""
    ref = catalog.lr_reference(method, OPTIMIZERS[optim].family)
    why = (_SCHEDULE_SHORT if short else _SCHEDULE_WHY)[scheduler]
    if scheduler in ("one_cycle", "step_decay"):  # chosen for itself: the reference's schedule is not the point
        return why
    tuned = {"constant": "constant_with_warmup"}.get(ref.get("schedule", ""), ref.get("schedule", scheduler))
    if tuned != scheduler:
        why += (f"; the LR reference's: --scheduler {tuned}" if short else
                f"; the LR reference was tuned with a {ref['schedule']} schedule (--scheduler {tuned}, "
                "recommend.scheduler in a recipe, reproduces it)")
    return why


def lr_reference_rate(method: str, optim: str) -> float:
    """The learning rate of the reference for ``method`` and ``optim``'s family."""
    return catalog.lr_reference(method, OPTIMIZERS[optim].family)["learning_rate"]


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


def _ratio_for(steps: int, total_steps: int) -> float:
    """The ratio whose ``ceil(ratio x total_steps)`` (transformers' ``get_warmup_steps``) is ``steps``: the plain
    fraction, or half a step under it where float rounding would tip the ceiling over."""
    ratio = steps / total_steps
    return ratio if math.ceil(ratio * total_steps) == steps else (steps - 0.5) / total_steps


def warmup_ratio(total_steps: int, effective_batch: int, reference_batch: int, *, lr_scale: float = 1.0,
                 short: bool = False) -> tuple[float, str]:
    """The warmup share of ``total_steps`` and its reason (see :data:`WARMUP_BASE`); ``lr_scale``: the planned LR
    over the reference's; ``short``: the reason in one line for the terminal (the share, what raised or capped it,
    the steps), without the sources."""
    ratio, why = WARMUP_BASE, [f"{WARMUP_BASE:.0%} of {total_steps} steps (5-10% of steps)"]
    brief = f"{WARMUP_BASE:.0%} of {total_steps} steps"
    batch_scale = effective_batch / reference_batch
    scale = max(batch_scale, lr_scale)
    if scale >= 2:
        extra = min(WARMUP_MAX - WARMUP_BASE, WARMUP_PER_DOUBLING * math.log2(scale))
        ratio += extra
        what = (f"an effective batch {batch_scale:.3g}x" if batch_scale >= lr_scale else f"a learning rate "
                f"{lr_scale:.3g}x")
        why.append(f"+{extra:.2%} for {what} the reference's (Goyal et al. 2017 sec. 2.2: longer warmup)")
        brief += (f", +{extra:.2%} for a batch {batch_scale:.3g}x" if batch_scale >= lr_scale else
                  f", +{extra:.2%} for an LR {lr_scale:.3g}x") + " the reference's"
    if ratio * total_steps < WARMUP_MIN_STEPS:
        # the floor, but never the whole run: at most half of it (a run of 10 steps or fewer would otherwise only warm
        # up, and a ratio of 1.0 is no warmup ratio transformers takes)
        floor = min(WARMUP_MIN_STEPS, total_steps // 2)
        ratio = _ratio_for(floor, total_steps)
        why.append(("no warmup on a run of one step" if floor == 0 else
                    f"raised to {floor} warmup steps on a short run"
                    + (f" (the {WARMUP_MIN_STEPS}-step floor capped at half of its {total_steps} steps)"
                       if floor < WARMUP_MIN_STEPS else ""))
                   + (f" ({ratio:.0%}, above the 10% ceiling)" if ratio > WARMUP_MAX else ""))
        brief += ", no warmup on one step" if floor == 0 else f", raised to {floor} steps on a short run"
    elif ratio * total_steps > WARMUP_MAX_STEPS:
        # half a step under the cap, so that the Trainer's ceil(ratio x steps) is the cap whatever the float rounding
        ratio = (WARMUP_MAX_STEPS - 0.5) / total_steps
        why.append(f"capped at {WARMUP_MAX_STEPS} steps on a long run (Llama 2's warmup, Touvron et al. 2023 "
                   "sec. 2.2)")
        brief += f", capped at {WARMUP_MAX_STEPS} steps on a long run"
    else:
        ratio = round(ratio, 4)
    n = math.ceil(ratio * total_steps)
    if short:
        return ratio, brief + f" = {n} step{'s' if n != 1 else ''}"
    return ratio, "; ".join(why) + f" -> {ratio:.2%} = {n} step{'s' if n != 1 else ''}"
