"""The learning-rate schedule of a run, step by step, exactly as the Hugging Face ``Trainer`` will apply it.

Pure Python (only :mod:`math`): the app plots the planned curve without importing torch or transformers.
Every formula here mirrors transformers (5.x, checked against 5.23; the same code since 4.x) and is tested
against the real objects in ``tests/recommender/test_schedule.py``:

* :func:`warmup_steps_for` is ``TrainingArguments.get_warmup_steps`` (``training_args.py``)::

      int(self.warmup_steps) if self.warmup_steps >= 1 else math.ceil(num_training_steps * self.warmup_steps)

  In transformers 5 ``warmup_steps`` is a float and a value in [0, 1) is a ratio of the total steps;
  ``warmup_ratio`` is gone.  In 4.x a ``warmup_ratio`` was rounded the same way
  (``math.ceil(num_training_steps * warmup_ratio)``), so a ratio means the same number of steps in both.
* :func:`lr_at` is ``peak_lr * lr_lambda(step)`` (``torch.optim.lr_scheduler.LambdaLR.get_lr``: ``base_lr *
  lmbda(last_epoch)``) with the lambdas of ``transformers.optimization``:
  ``_get_linear_schedule_with_warmup_lr_lambda`` ("linear"),
  ``_get_cosine_schedule_with_warmup_lr_lambda`` with ``num_cycles=0.5`` ("cosine"),
  ``_get_constant_lambda`` ("constant", which ignores warmup),
  ``_get_constant_schedule_with_warmup_lr_lambda`` ("constant_with_warmup"),
  ``_get_cosine_with_min_lr_schedule_with_warmup_lr_rate_lambda`` ("cosine_warmup_with_min_lr", one-cycle) and
  ``_get_wsd_scheduler_lambda`` ("warmup_stable_decay"), as built by
  ``transformers.get_scheduler`` from ``Trainer.create_scheduler``
  (``num_warmup_steps=self.args.get_warmup_steps(num_training_steps)``).
* :func:`logged_lr` is the ``learning_rate`` the Trainer writes to its logs (``trainer.state.log_history``, the
  console, W&B/TensorBoard) at a ``global_step``.  In ``Trainer._inner_training_loop`` (transformers >= 4.51,
  PR #36973 "Log the correct learning rate", so all of 5.x)::

      self.optimizer.step()
      ...
      # get leaning rate before update
      learning_rate = self._get_learning_rate()          # lr_scheduler.get_last_lr()[0]
      ...
          self.lr_scheduler.step()
      model.zero_grad()
      self.state.global_step += 1
      ...
      self._maybe_log_save_evaluate(..., learning_rate=learning_rate)   # logs["learning_rate"] = learning_rate

  so the value logged at ``global_step == s`` is the LR the optimizer used for its ``s``-th step, i.e. 0-based
  optimizer step ``s - 1``: ``logged_lr(s) == lr_at(s - 1)``.  Before 4.51 the Trainer read the LR after
  ``lr_scheduler.step()`` and logged the *next* step's LR (``lr_at(s)``): pass
  ``logged_after_scheduler_step=True`` for those versions.

Steps: optimizer step ``k`` (0-based, ``0 <= k < total_steps``) is the ``k+1``-th optimizer update; with gradient
accumulation one optimizer step spans several micro-batches.  ``total_steps`` is the Trainer's
``num_training_steps`` (``max_steps``, or epochs x update steps per epoch).
"""

from __future__ import annotations

import math

from ..errors import FinetuneHelperError

#: the ``lr_scheduler_type`` values modelled here (a subset of ``transformers.SchedulerType``, and step decay); four
#: take ``lr_scheduler_kwargs``: ``min_lr_rate`` (``cosine_with_min_lr``), ``min_lr_rate`` / ``warmup_lr_rate``
#: (``cosine_warmup_with_min_lr``), ``num_decay_steps`` / ``decay_type`` / ``min_lr_ratio``
#: (``warmup_stable_decay``, ``get_wsd_schedule``) and ``milestones`` / ``gamma`` (``step_decay``)
SCHEDULERS: tuple[str, ...] = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_min_lr",
                               "cosine_warmup_with_min_lr", "warmup_stable_decay", "step_decay")
#: ``step_decay`` is not transformers': ``finetune-helper run`` gives the Trainer a ``LambdaLR`` of :func:`lr_at`
#: (``constant_with_warmup``'s warmup, then x ``gamma`` at each ``milestones`` fraction of the steps)

#: ``num_cycles`` of transformers' ``get_cosine_schedule_with_warmup`` default (a half cosine from peak to 0)
COSINE_NUM_CYCLES = 0.5


def _check_scheduler(scheduler: str) -> str:
    if scheduler not in SCHEDULERS:
        raise FinetuneHelperError(
            "lr_scheduler_type",
            f"unknown or unsupported scheduler {scheduler!r}; allowed: {', '.join(SCHEDULERS)}")
    return scheduler


def _check_total(total_steps: int) -> int:
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise FinetuneHelperError("max_steps", f"total training steps must be an integer >= 1, got {total_steps!r}")
    return total_steps


def _check_warmup_steps(warmup_steps: int) -> int:
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise FinetuneHelperError("warmup_steps",
                                  f"warmup steps must be an integer >= 0 (use warmup_steps_for() to convert a "
                                  f"ratio), got {warmup_steps!r}")
    return warmup_steps


def warmup_steps_for(warmup: float | int, total_steps: int) -> int:
    """The number of warmup steps the Trainer uses: ``TrainingArguments.get_warmup_steps(total_steps)``.

    ``warmup`` is the ``warmup_steps`` setting: a value >= 1 is a step count (truncated by ``int()``, as
    transformers does: 2.7 -> 2), a value in [0, 1) a ratio of ``total_steps`` rounded *up*
    (``math.ceil(total_steps * warmup)``: 0.03 of 100 steps -> 3, of 101 steps -> 4).  The result can exceed
    ``total_steps`` (a step count larger than the run); the Trainer does not clip it, nor does this.
    """
    if isinstance(warmup, bool) or not isinstance(warmup, (int, float)) or not math.isfinite(warmup) or warmup < 0:
        raise FinetuneHelperError("warmup_steps",
                                  f"must be a number >= 0 (a step count, or a ratio in [0, 1)), got {warmup!r}")
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 0:
        raise FinetuneHelperError("max_steps", f"total training steps must be an integer >= 0, got {total_steps!r}")
    return int(warmup) if warmup >= 1 else math.ceil(total_steps * warmup)


def _cosine(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * float(COSINE_NUM_CYCLES) * 2.0 * progress))


def _wsd(step: int, total_steps: int, warmup_steps: int, kw: dict) -> float:
    """``_get_wsd_scheduler_lambda`` with ``get_wsd_schedule``'s defaults (linear warmup, the stable phase what is
    left of ``total_steps``)."""
    decay = int(kw["num_decay_steps"])
    decay_type, floor = kw.get("decay_type", "cosine"), float(kw.get("min_lr_ratio", 0))
    stable = total_steps - warmup_steps - decay
    if step < warmup_steps:
        progress = float(step) / float(max(1, warmup_steps))
        return max(0.0, progress * (1.0 - floor) + floor)
    if step < warmup_steps + stable:
        return 1.0
    if step < warmup_steps + stable + decay:
        progress = float(step - warmup_steps - stable) / float(max(1, decay))
        factor = {"linear": lambda p: 1.0 - p, "cosine": _cosine, "1-sqrt": lambda p: 1.0 - math.sqrt(p)
                  }[decay_type](progress)
        return max(0.0, factor * (1.0 - floor) + floor)
    return floor


def _warmup_rate_cosine(step: int, total_steps: int, warmup_steps: int, kw: dict) -> float:
    """``_get_cosine_with_min_lr_schedule_with_warmup_lr_rate_lambda`` (``num_cycles=0.5``): a linear rise from
    ``warmup_lr_rate`` and a cosine to ``min_lr_rate``."""
    floor, start = float(kw.get("min_lr_rate", 0.0)), kw.get("warmup_lr_rate")
    if step < warmup_steps:
        if start is None:
            return (float(step) + 1.0) / max(1.0, float(warmup_steps))
        return float(start) + (1.0 - float(start)) * float(step) / max(1, warmup_steps - 1)
    progress = (float(step) - float(warmup_steps) + 1.0) / max(1.0, float(total_steps) - float(warmup_steps))
    return max(0, _cosine(progress) * (1 - floor) + floor)


def _step_decay(step: int, total_steps: int, warmup_steps: int, kw: dict) -> float:
    """``constant_with_warmup``'s lambda times ``gamma`` for each milestone (a fraction of ``total_steps``, floored to
    a step) already reached."""
    if step < warmup_steps:
        return float(step) / float(max(1.0, warmup_steps))
    passed = sum(step >= int(m * total_steps) for m in kw.get("milestones", ()))
    return float(kw.get("gamma", 0.1)) ** passed


def _factor(step: int, total_steps: int, warmup_steps: int, scheduler: str, kw: dict | None = None) -> float | int:
    """The ``lr_lambda(step)`` of transformers' scheduler, operation for operation (``kw``: the
    ``lr_scheduler_kwargs`` the Trainer passes as ``scheduler_specific_kwargs``); ``step_decay``'s is this
    module's own, which the runner's ``LambdaLR`` calls."""
    kw = kw or {}
    if scheduler == "warmup_stable_decay":
        return _wsd(step, total_steps, warmup_steps, kw)
    if scheduler == "cosine_warmup_with_min_lr":
        return _warmup_rate_cosine(step, total_steps, warmup_steps, kw)
    if scheduler == "step_decay":
        return _step_decay(step, total_steps, warmup_steps, kw)
    if scheduler == "constant":  # _get_constant_lambda: returns the int 1, warmup ignored
        return 1
    if step < warmup_steps:  # the same warmup expression in all three warmup lambdas
        if scheduler == "constant_with_warmup":
            return float(step) / float(max(1.0, warmup_steps))
        return float(step) / float(max(1, warmup_steps))
    if scheduler == "constant_with_warmup":
        return 1.0
    if scheduler == "linear":
        return max(0.0, float(total_steps - step) / float(max(1, total_steps - warmup_steps)))
    # cosine, and cosine_with_min_lr (the same lambda with min_lr_rate)
    progress = float(step - warmup_steps) / float(max(1, total_steps - warmup_steps))
    if scheduler == "cosine_with_min_lr":
        floor = float(kw.get("min_lr_rate", 0.0))
        return max(0, _cosine(progress) * (1 - floor) + floor)
    return max(0.0, _cosine(progress))


def lr_at(step: int, peak_lr: float, total_steps: int, warmup_steps: int, scheduler: str = "linear",
          options: dict | None = None) -> float:
    """The learning rate the optimizer uses for optimizer step ``step`` (0-based) of a ``total_steps`` run.

    ``peak_lr`` is ``TrainingArguments.learning_rate``, ``warmup_steps`` an integer step count (convert a ratio
    with :func:`warmup_steps_for` first), ``scheduler`` one of :data:`SCHEDULERS`.  Steps past the end follow the
    same formula (linear stays at 0), as transformers' lambdas do.  ``options``: ``lr_scheduler_kwargs``.
    """
    _check_scheduler(scheduler)
    _check_total(total_steps)
    _check_warmup_steps(warmup_steps)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise FinetuneHelperError("step", f"optimizer step must be an integer >= 0, got {step!r}")
    if scheduler == "warmup_stable_decay" and "num_decay_steps" not in (options or {}):
        raise FinetuneHelperError("lr_scheduler_kwargs", "warmup_stable_decay needs num_decay_steps")
    return peak_lr * _factor(step, total_steps, warmup_steps, scheduler, options)


def logged_lr(global_step: int, peak_lr: float, total_steps: int, warmup_steps: int, scheduler: str = "linear",
              *, logged_after_scheduler_step: bool = False, options: dict | None = None) -> float:
    """The ``learning_rate`` the Trainer logs at ``global_step`` (the ``step`` of a ``log_history`` entry).

    transformers >= 4.51 (all of 5.x) logs the LR of the optimizer step it has just taken, read before
    ``lr_scheduler.step()``: at ``global_step == s`` that is 0-based optimizer step ``s - 1``, so this returns
    ``lr_at(global_step - 1, ...)``.  The first log (``logging_steps=1``) is at ``global_step == 1`` and shows the
    LR of the first update (0 for a warmup schedule); the last, at ``global_step == total_steps``, shows the LR of
    the last update.  With ``logged_after_scheduler_step=True`` (transformers < 4.51, which logged the LR already
    advanced to the next step) it returns ``lr_at(global_step, ...)``.

    To overlay a live plot whose x axis is the logged ``global_step`` on the planned curve, plot the plan with
    :func:`logged_schedule_points` (or shift :func:`schedule_points` by +1).
    """
    if isinstance(global_step, bool) or not isinstance(global_step, int) or global_step < 1:
        raise FinetuneHelperError("global_step",
                                  f"the Trainer logs from global_step 1 on; got {global_step!r}")
    step = global_step if logged_after_scheduler_step else global_step - 1
    return lr_at(step, peak_lr, total_steps, warmup_steps, scheduler, options)


def _plot_steps(total_steps: int, warmup_steps: int, max_points: int) -> list[int]:
    """0-based optimizer steps to plot: all of them, or an even subsample that keeps the corners."""
    if isinstance(max_points, bool) or not isinstance(max_points, int) or max_points < 4:
        raise FinetuneHelperError("max_points", f"must be an integer >= 4, got {max_points!r}")
    last = total_steps - 1
    if total_steps <= max_points:
        return list(range(total_steps))
    # step 0, the last warmup step, the first step after warmup (the peak of a warmup schedule), the last step
    corners = {s for s in (0, warmup_steps - 1, warmup_steps, last) if 0 <= s <= last}
    k = max_points - len(corners)  # evenly spaced interior points, strictly between 0 and last
    even = {round(i * last / (k + 1)) for i in range(1, k + 1)}
    return sorted(corners | even)


def schedule_points(peak_lr: float, total_steps: int, warmup_steps: int, scheduler: str = "linear",
                    max_points: int = 400, options: dict | None = None) -> list[tuple[int, float]]:
    """``(step, lr)`` pairs of the whole run for plotting; ``step`` is the 0-based optimizer step.

    Every step ``0 .. total_steps - 1`` when ``total_steps <= max_points``; otherwise at most ``max_points`` steps,
    evenly spaced, always including step 0, the last warmup step (``warmup_steps - 1``), the first step after
    warmup (``warmup_steps``, where a warmup schedule reaches ``peak_lr``) and the last step, so the warmup corner is
    drawn exactly.  Each ``lr`` is exactly :func:`lr_at` of its step.
    """
    _check_scheduler(scheduler)
    _check_total(total_steps)
    _check_warmup_steps(warmup_steps)
    return [(s, lr_at(s, peak_lr, total_steps, warmup_steps, scheduler, options))
            for s in _plot_steps(total_steps, warmup_steps, max_points)]


def logged_schedule_points(peak_lr: float, total_steps: int, warmup_steps: int, scheduler: str = "linear",
                           max_points: int = 400, options: dict | None = None) -> list[tuple[int, float]]:
    """The planned curve in the coordinates of the Trainer's logs: ``(global_step, logged learning_rate)``.

    :func:`schedule_points` shifted by one step (``global_step = step + 1``, 1 .. ``total_steps``), so the value at
    each ``global_step`` is :func:`logged_lr` of it (transformers >= 4.51) and the live LR plot lands on this curve.
    """
    return [(s + 1, lr) for s, lr in schedule_points(peak_lr, total_steps, warmup_steps, scheduler, max_points,
                                                     options)]
