"""The learning-rate range test on a recipe's real model, data and micro-batch.

Smith 2017 ("Cyclical Learning Rates for Training Neural Networks", sec. 3.3, the "LR range test"): train for a
few hundred iterations while the learning rate grows from tiny to large, and read the loss against it.  The form
here is fastai's ``lr_find`` (exponential sweep, bias-corrected exponential smoothing of the loss with beta 0.98,
stop when the smoothed loss passes 4x its best): ``start`` to ``end`` over ``steps`` optimizer steps (each one the
recipe's micro-batch x accumulation), suggestions at the steepest descent of the smoothed loss against log10(LR)
and at fastai's "valley" (halfway along the longest stretch of falling loss).

It is known to point high on pretrained transformers (the steepest descent of a model that already fits its data is
often 10-100x above the LR that fine-tunes it best); ``benchmarks/lr_grid.py`` measures that on the tiny demo.  The
sweep runs in its own process on a fresh copy of the model and saves nothing: no weight or optimizer state of it
reaches a later run.  The curve arithmetic is pure Python; :func:`range_test` loads the stack.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

#: fastai ``lr_find`` defaults: the smoothing of the loss and when the sweep stops
SMOOTHING, STOP_FACTOR = 0.98, 4.0
#: the sweep: Smith's range test reads about 100 iterations; fastai's default is 1e-7 to 10 over 100
START, END, STEPS = 1e-7, 1e-1, 100


def sweep(start: float, end: float, steps: int) -> list[float]:
    """The learning rate of each optimizer step: exponential from ``start`` to ``end``."""
    if not (0 < start < end) or steps < 2:
        raise ValueError("need 0 < start < end and at least 2 steps")
    return [start * (end / start) ** (i / (steps - 1)) for i in range(steps)]


def smooth(losses: list[float], beta: float = SMOOTHING) -> list[float]:
    """Bias-corrected exponential moving average (fastai's ``SmoothenValue``)."""
    out, avg = [], 0.0
    for i, loss in enumerate(losses, start=1):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** i))
    return out


def steepest(lrs: list[float], smoothed: list[float]) -> float | None:
    """The LR where the smoothed loss falls fastest against log10(LR), up to the loss's minimum."""
    end = min(range(len(smoothed)), key=smoothed.__getitem__)
    if end < 2:
        return None
    slopes = [(smoothed[i + 1] - smoothed[i - 1]) / (math.log10(lrs[i + 1]) - math.log10(lrs[i - 1]))
              for i in range(1, end)]
    return lrs[1 + min(range(len(slopes)), key=slopes.__getitem__)]


def valley(lrs: list[float], smoothed: list[float]) -> float | None:
    """fastai's "valley": the longest run of falling loss (longest decreasing subsequence ending at each point),
    and the LR halfway along it (fastai's index: its start plus a third plus a sixth of its length)."""
    n = len(smoothed)
    if n < 3:
        return None
    longest = [1] * n
    best_end = 0
    for i in range(1, n):
        for j in range(i):
            if smoothed[i] < smoothed[j] and longest[i] < longest[j] + 1:
                longest[i] = longest[j] + 1
        if longest[i] > longest[best_end]:
            best_end = i
    start = best_end - longest[best_end]
    third = (best_end - start) / 3
    return lrs[max(0, start + int(third) + int(third / 2))]


@dataclass
class RangeTest:
    """The sweep's curve and what it suggests."""

    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    stopped_early: bool = False

    @property
    def smoothed(self) -> list[float]:
        return smooth(self.losses)

    def suggestions(self) -> dict[str, float | None]:
        finite = [(lr, s) for lr, s in zip(self.lrs, self.smoothed) if math.isfinite(s)]
        lrs, values = [lr for lr, _ in finite], [s for _, s in finite]
        return {"steepest": steepest(lrs, values) if lrs else None,
                "valley": valley(lrs, values) if lrs else None}

    def record(self, lr: float, loss: float) -> bool:
        """Add a step; True when the sweep should stop (the smoothed loss passed 4x its best, or went non-finite)."""
        self.lrs.append(lr)
        self.losses.append(loss)
        s = self.smoothed
        if not math.isfinite(s[-1]) or (len(s) > 5 and s[-1] > STOP_FACTOR * min(s)):
            self.stopped_early = True
            return True
        return False


def range_test(recipe, *, start: float = START, end: float = END, steps: int = STEPS,
               log: Callable[[str], None] = print,
               progress: Callable[[RangeTest], None] | None = None) -> tuple[RangeTest, Any]:
    """Run the sweep on ``recipe``'s model and data at its planned micro-batch and accumulation; returns the curve
    and the preparation (its plan holds the rule-based LR and the bounds).  ``progress`` sees the curve after each
    step (the app plots it live)."""
    import torch
    from transformers import TrainerCallback

    from . import runner

    lrs = sweep(start, end, steps)
    curve = RangeTest()
    with tempfile.TemporaryDirectory(prefix="finetune-helper-lr-find-") as scratch:
        prep, tokenizer = runner.prepare(recipe, Path(scratch) / "run", log)
        kwargs = {k: v for k, v in prep.sft_kwargs.items() if k not in ("warmup_ratio", "eval_steps")}
        kwargs.update(output_dir=scratch, max_steps=len(lrs), learning_rate=start, warmup_steps=0,
                      lr_scheduler_type="constant", logging_steps=1, save_strategy="no", eval_strategy="no",
                      report_to="none", load_best_model_at_end=False)

        class Record(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs and state.global_step <= len(lrs):
                    if curve.record(lrs[state.global_step - 1], float(logs["loss"])):
                        control.should_training_stop = True
                    if progress is not None:
                        progress(curve)

        trainer = runner.build_trainer(prep, tokenizer, kwargs, [Record()])
        trainer.create_optimizer()
        ratio = end / start
        trainer.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            trainer.optimizer, lambda step: ratio ** (min(step, len(lrs) - 1) / (len(lrs) - 1)))
        trainer.train()
    return curve, prep


def plot(curve: RangeTest, path: Path, *, marks: dict[str, float | None]) -> Path:
    """The loss (raw and smoothed) against the LR on a log axis, the suggestions marked; a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(curve.lrs, curve.losses, color="0.75", lw=1, label="loss")
    ax.plot(curve.lrs, curve.smoothed, color="C0", lw=2, label="smoothed")
    for (name, lr), color in zip(marks.items(), ("C3", "C2", "C1", "C4")):
        if lr:
            ax.axvline(lr, color=color, ls="--", lw=1, label=f"{name} {lr:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    finite = [s for s in curve.smoothed if math.isfinite(s)]
    if finite:
        ax.set_ylim(min(finite) * 0.95, min(max(finite), STOP_FACTOR * min(finite)) * 1.05)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
