"""Reading a run's loss curves for the known failure modes (the practical tuning guide's three, and a healthy run).

:func:`diagnose` takes the records of ``metrics.jsonl`` (one per log: ``loss``, ``learning_rate``, ``grad_norm``;
``eval_loss`` for evaluations) and names, in this order of precedence:

* **diverged**: a non-finite loss, or the smoothed loss rising to 2x its start and staying there
  (:class:`.divergence.DivergenceGuard`, the rule that stops a run): the learning rate is too high -- 10x lower,
  more warmup, a lower clipping threshold;
* **overfitting**: the eval loss rising for :data:`RISING_EVALS` evaluations in a row and ending at least
  :data:`OVERFIT_MARGIN` above its best, while the train loss kept falling: fewer epochs (stop near the best
  evaluation), more dropout or weight decay, more data;
* **stuck**: the train loss's last tenth within :data:`STUCK_DROP` of its first tenth over at least
  :data:`MIN_LOGS` logs: the learning rate is too low (or the labels are all masked): raise it;
* **healthy** otherwise (or "too early" with fewer logs than that).

Every diagnosis carries its evidence in numbers.  Pure Python: the CLI (``finetune-helper doctor``) and the app
(the Runs tab, live while a run trains) call it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from . import run_folder
from .divergence import DivergenceGuard

#: logs needed before "stuck" or "healthy" can be told apart from noise
MIN_LOGS = 10
#: a loss that fell by less than this fraction from its first tenth to its last tenth is flat
STUCK_DROP = 0.02
#: consecutive rising evaluations that count as a trend, and how far above its best the eval loss must end
RISING_EVALS = 2
OVERFIT_MARGIN = 0.02
LABELS = ("diverged", "overfitting", "stuck", "healthy")


@dataclass(frozen=True)
class Diagnosis:
    """What the curves show: one of :data:`LABELS`, the numbers behind it, and what to do."""

    diagnosis: str
    evidence: str
    advice: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def diagnose(records: list[dict[str, Any]], *, stopped: str | None = None, loss_scaler: bool = False) -> Diagnosis:
    """The diagnosis of a run's ``metrics.jsonl`` records (in step order).  ``stopped``: the runner's own message
    when it stopped the run as diverged (``summary.json``); ``loss_scaler``: an fp16 run, whose non-finite gradient
    norms are skipped steps, not divergence."""
    train = [r for r in records if isinstance(r.get("loss"), (int, float))]
    evals = [r for r in records if isinstance(r.get("eval_loss"), (int, float))]
    lr = max((r["learning_rate"] for r in train if isinstance(r.get("learning_rate"), (int, float))), default=None)
    lr_text = f"peak {lr:.2g}" if lr else "the current one"
    verdict = _diverged(train, lr_text, loss_scaler)
    if verdict is None and stopped:
        verdict = Diagnosis("diverged", f"the run stopped itself: {stopped}", _DIVERGED_ADVICE.format(lr=lr_text))
    if verdict:
        return verdict
    verdict = _overfitting(train, evals)
    if verdict:
        return verdict
    if len(train) < MIN_LOGS:
        return Diagnosis("healthy", f"too early to tell: {len(train)} logged steps (the doctor needs {MIN_LOGS})",
                         "nothing to change yet")
    tenth = max(3, len(train) // 10)
    start, end = _mean([r["loss"] for r in train[:tenth]]), _mean([r["loss"] for r in train[-tenth:]])
    drop = (start - end) / abs(start) if start else 0.0
    span = f"steps {train[0].get('step')}-{train[-1].get('step')}"
    if drop < STUCK_DROP:
        return Diagnosis("stuck", f"train loss {start:.4g} -> {end:.4g} ({drop:+.1%}) over {span}, mean of the first "
                         f"and last {tenth} logs", f"raise the learning rate ({lr_text}; try 10x), and check "
                         "that the labels are not all masked (answer tokens in the data, max_length long enough)")
    eval_text = ""
    if evals:
        last, best = evals[-1]["eval_loss"], min(r["eval_loss"] for r in evals)
        eval_text = f"; eval loss {last:.4g} (best {best:.4g})"
    return Diagnosis("healthy", f"train loss {start:.4g} -> {end:.4g} ({-drop:+.1%}) over {span}{eval_text}",
                     "nothing to change")


_DIVERGED_ADVICE = ("lower the learning rate 10x ({lr} now), use more warmup steps and a lower max_grad_norm "
                    "(0.3-0.5); restart from the last checkpoint before the rise")


def _diverged(train: list[dict[str, Any]], lr_text: str, loss_scaler: bool) -> Diagnosis | None:
    guard = DivergenceGuard()
    for r in train:
        grad = r.get("grad_norm")
        why = guard.update(float(r["loss"]), float(grad) if isinstance(grad, (int, float)) else None,
                           loss_scaler=loss_scaler)
        if why:
            spikes = sum(1 for a, b in zip(train, train[1:]) if math.isfinite(b["loss"]) and b["loss"] > 2 * a["loss"])
            return Diagnosis("diverged", f"at step {r.get('step')}: {why}"
                             + (f"; {spikes} single-log spikes above 2x the previous loss" if spikes else ""),
                             _DIVERGED_ADVICE.format(lr=lr_text))
    return None


def _overfitting(train: list[dict[str, Any]], evals: list[dict[str, Any]]) -> Diagnosis | None:
    if len(evals) < RISING_EVALS + 1:
        return None
    losses = [float(r["eval_loss"]) for r in evals]
    tail = losses[-(RISING_EVALS + 1):]
    rising = all(b > a for a, b in zip(tail, tail[1:]))
    best = min(range(len(losses)), key=losses.__getitem__)
    if not rising or losses[-1] < (1 + OVERFIT_MARGIN) * losses[best]:
        return None
    best_step, last_step = evals[best].get("step", 0), evals[-1].get("step", 0)
    at_best = [r["loss"] for r in train if r.get("step", 0) <= best_step][-3:]
    at_last = [r["loss"] for r in train if r.get("step", 0) <= last_step][-3:]
    if not at_best or not at_last or _mean(at_last) >= _mean(at_best):
        return None  # the train loss rose too: not overfitting
    epoch = evals[best].get("epoch")
    return Diagnosis("overfitting", f"eval loss {losses[best]:.4g} at step {best_step} -> {losses[-1]:.4g} at step "
                     f"{last_step} (rising {RISING_EVALS + 1} evaluations in a row) while the train loss fell "
                     f"{_mean(at_best):.4g} -> {_mean(at_last):.4g}",
                     f"train fewer epochs (the best eval was at step {best_step}"
                     + (f", epoch {epoch:.2g}" if isinstance(epoch, (int, float)) else "")
                     + "), add dropout or weight decay, or more data")


def diagnose_run(run_dir) -> Diagnosis:
    """:func:`diagnose` of a run folder: its metrics, how the runner ended it and whether it ran in fp16."""
    summary = run_folder.read_json(run_dir / run_folder.SUMMARY) or {}
    args = run_folder.read_json(run_dir / run_folder.TRAINING_ARGS) or {}
    stopped = summary.get("message") if summary.get("status") == "diverged" else None
    return diagnose(run_folder.read_metrics(run_dir), stopped=stopped, loss_scaler=bool(args.get("fp16")))
