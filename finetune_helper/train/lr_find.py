"""The learning-rate range test on a recipe's real model, data and micro-batch.

Smith 2017 ("Cyclical Learning Rates for Training Neural Networks", sec. 3.3, the "LR range test"): train for a
few hundred iterations while the learning rate grows from tiny to large, and read the loss against it.  The form
here is fastai's ``lr_find`` (exponential sweep, bias-corrected exponential smoothing of the loss with beta 0.98,
stop when the smoothed loss passes 4x its best): ``start`` to ``end`` over ``steps`` optimizer steps (each one the
recipe's micro-batch x accumulation), suggestions at the steepest descent of the smoothed loss against log10(LR)
and at fastai's "valley" (halfway along the longest stretch of falling loss).  The suggested LR is their geometric
mean (:data:`SUGGESTION`), and no suggestion at all when the loss never fell past the noise of its first steps, or
rose from the first step.

How far its readings land from the LR that trains best is measured on the tiny demo by ``benchmarks/lr_grid.py``
(a grid of real runs at equal compute): the steepest descent points high there (up to 15x), the valley low (up to
12x).  The sweep runs in its own process on a fresh copy of the model and saves nothing: no weight or optimizer
state of it reaches a later run.  The curve arithmetic is pure Python; :func:`range_test` loads the stack.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .outcome import EXIT_INTERRUPTED, RunStopped

#: the rule behind the suggested LR (reported with it).  fastai made the valley its default suggestion (fastai PR
#: #3377, "New and Improved LR Suggestion Paradigm"); on the tiny demo's curves the two readings bracket the grid's
#: best LR, the steepest descent mostly above it (2.3e-3 to 4.6e-3), the valley mostly below (2.2e-4 to 7.6e-4), so the
#: suggestion is their middle on the log10(LR) axis the sweep is laid out on: the geometric mean.  Measured
#: (benchmarks/lr_grid.py, seeds 0-4 x batch 16/32/64 on 2 threads, grid 1e-4..1e-2 at equal compute): within 3x of
#: the grid's best LR in 11 of 15 (worst 5.1x); steepest 5 of 15 (worst 15.5x), valley 8 of 15 (worst 12.1x)
SUGGESTION = "geometric mean of steepest descent and valley"
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
    #: the signal that ended the sweep early (``SIGINT``: Ctrl-C; ``SIGTERM``: the app's Stop), else None
    interrupted: str | None = None

    @property
    def smoothed(self) -> list[float]:
        return smooth(self.losses)

    def no_suggestion(self) -> str | None:
        """Why the curve suggests nothing, or None: the loss rose from the first step (every later loss above the
        model's first one: the sweep started above any useful LR), or its smoothed minimum never went below the
        lowest loss of the first tenth of the sweep (the noise band of a curve that has not started to fall): a
        bottom that low is a fall, not noise."""
        smoothed = self.smoothed
        finite = [i for i, value in enumerate(smoothed) if math.isfinite(value)]
        if not finite:
            return "no finite loss"
        if len(self.losses) > 1 and all(not loss <= self.losses[0] for loss in self.losses[1:]):  # NaN is a rise
            return (f"the loss rose from the first step, at LR {self.lrs[0]:.2g}: the sweep started above any useful "
                    "LR; start lower (--start)")
        low = min(finite, key=smoothed.__getitem__)
        floor = min(self.losses[:max(2, len(self.losses) // 10)])
        if smoothed[low] >= floor:
            return (f"the loss never fell past the noise of its first steps (smoothed best {smoothed[low]:.4g}, "
                    f"lowest early loss {floor:.4g}, LR {self.lrs[0]:.2g} to {self.lrs[-1]:.2g}): sweep higher "
                    "(--end), or more steps (--steps)")
        return None

    def suggestions(self) -> dict[str, Any]:
        """``steepest`` and ``valley`` of the smoothed curve, ``suggested`` (:data:`SUGGESTION`), and ``why_none``
        when there is none."""
        why = self.no_suggestion()
        if why is not None:
            return {"steepest": None, "valley": None, "suggested": None, "why_none": why}
        finite = [(lr, value) for lr, value in zip(self.lrs, self.smoothed) if math.isfinite(value)]
        lrs, values = [lr for lr, _ in finite], [value for _, value in finite]
        steep, low = steepest(lrs, values), valley(lrs, values)
        found = [lr for lr in (steep, low) if lr]
        suggested = math.exp(sum(map(math.log, found)) / len(found)) if found else None
        return {"steepest": steep, "valley": low, "suggested": suggested,
                "why_none": None if found else "no stretch of falling loss"}

    def record(self, lr: float, loss: float) -> bool:
        """Add a step; True when the sweep should stop (the smoothed loss passed 4x its best, or went non-finite)."""
        self.lrs.append(lr)
        self.losses.append(loss)
        s = self.smoothed
        if not math.isfinite(s[-1]) or (len(s) > 5 and s[-1] > STOP_FACTOR * min(s)):
            self.stopped_early = True
            return True
        return False


#: the strategies a one-process sweep cannot run as their engines would: FSDP shards the model over several processes,
#: and DeepSpeed builds its own optimizer and scheduler inside ``train()`` (``deepspeed_init``), replacing the sweep's
#: exponential schedule with a constant LR
ENGINE_STRATEGIES = ("fsdp", "zero2", "zero3")


def one_process(recipe):  # -> Recipe
    """``recipe`` as the sweep runs it: one process on one device, so planned for one GPU.  The planner divides the
    target effective batch over ``hardware.gpus``; one process of an N-GPU plan would sweep 1/N of the batch the LR is
    for, so the sweep plans ``hardware.gpus=1`` and reaches the same effective batch by accumulation.  A recipe that
    shards (FSDP) or runs DeepSpeed is refused, naming the field: the sweep would not run what it plans."""
    from ..errors import FinetuneHelperError

    allowed = "lr-find sweeps in one process with the Trainer's own optimizer and schedule: use auto or ddp (the LR " \
              "found is for the same effective batch)"
    if recipe.hardware.strategy in ENGINE_STRATEGIES:
        raise FinetuneHelperError("hardware.strategy", f"{recipe.hardware.strategy} is not swept: {allowed}")
    for key in ("deepspeed", "fsdp"):
        if recipe.training.get(key):
            raise FinetuneHelperError(f"training.{key}", f"is not swept: {allowed}; leave it out for lr-find")
    if recipe.hardware.gpus == 1 and recipe.hardware.strategy == "auto":
        return recipe
    return dataclasses.replace(recipe, hardware=dataclasses.replace(recipe.hardware, gpus=1, strategy="auto"))


def range_test(recipe, *, start: float = START, end: float = END, steps: int = STEPS,
               log: Callable[[str], None] = print,
               progress: Callable[[RangeTest], None] | None = None) -> tuple[RangeTest, Any]:
    """Run the sweep on ``recipe``'s model and data at the micro-batch and accumulation planned for one process
    (:func:`one_process`); returns the curve and the preparation (its plan holds the rule-based LR and the bounds, its
    ``sft_kwargs`` the batch that ran).  ``progress`` sees the curve after each step (the app plots it live).  The
    caller picks the device: on a host with several GPUs, one of them (``CUDA_VISIBLE_DEVICES``, before CUDA starts),
    as ``finetune-helper lr-find`` does.  SIGINT / SIGTERM end the sweep after the current step (``curve.interrupted``
    names the signal), or, before it starts, raise :class:`~.outcome.RunStopped`; the scratch folder is removed either
    way."""
    planned = one_process(recipe)  # refused at once, before anything loads
    if planned is not recipe:
        log(f"lr-find: one process, planned for one GPU (the recipe's hardware.gpus={recipe.hardware.gpus}, strategy "
            f"{recipe.hardware.strategy}): its effective batch by accumulation")
    curve = RangeTest()
    phase = {"now": "preparing"}

    def on_signal(signum, frame):  # noqa: ARG001
        name = signal.Signals(signum).name
        if phase["now"] == "preparing":  # nothing swept yet: leave now (the scratch folder goes with the exception)
            raise RunStopped(EXIT_INTERRUPTED, f"interrupted by {name} before the sweep started")
        curve.interrupted = name  # the sweep ends after this step, its curve so far kept

    handled = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
    previous = {s: signal.signal(s, on_signal) for s in handled}
    try:
        return _sweep(planned, curve, phase, start=start, end=end, steps=steps, log=log, progress=progress)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _sweep(recipe, curve: RangeTest, phase: dict[str, str], *, start: float, end: float, steps: int,
           log: Callable[[str], None], progress: Callable[[RangeTest], None] | None) -> tuple[RangeTest, Any]:
    import torch
    from transformers import TrainerCallback

    from . import runner

    lrs = sweep(start, end, steps)
    with tempfile.TemporaryDirectory(prefix="finetune-helper-lr-find-") as scratch:
        prep, tokenizer = runner.prepare(recipe, Path(scratch) / "run", log)
        kwargs = {k: v for k, v in prep.sft_kwargs.items() if k not in ("warmup_ratio", "eval_steps")}
        kwargs.update(output_dir=scratch, max_steps=len(lrs), learning_rate=start, warmup_steps=0,
                      lr_scheduler_type="constant", logging_steps=1, save_strategy="no", eval_strategy="no",
                      report_to="none", load_best_model_at_end=False)

        class Record(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if curve.interrupted:
                    control.should_training_stop = True

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs and state.global_step <= len(lrs):
                    if curve.record(lrs[state.global_step - 1], float(logs["loss"])) or curve.interrupted:
                        control.should_training_stop = True
                    if progress is not None:
                        progress(curve)

        trainer = runner.build_trainer(prep, tokenizer, kwargs, [Record()])
        trainer.create_optimizer()
        ratio = end / start
        trainer.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            trainer.optimizer, lambda step: ratio ** (min(step, len(lrs) - 1) / (len(lrs) - 1)))
        phase["now"] = "sweeping"
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
