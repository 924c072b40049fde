"""Reading a run's loss curves for the known failure modes (the practical tuning guide's three, and a healthy run).

:func:`diagnose` takes the records of ``metrics.jsonl`` (one per log: ``loss``, ``learning_rate``, ``grad_norm``;
``eval_loss`` for evaluations; the step-0 record with the loss before training and the uniform loss,
:func:`.callbacks.start_record`) and names, in this order of precedence:

* **diverged**: the runner's own stop rules (:class:`.divergence.DivergenceGuard`: a non-finite loss, the smoothed
  loss at 2x the loss before training, a collapse to the uniform loss ln(vocabulary), a gradient norm of exactly 0
  with a constant loss), or the runner stopped the run -- or the train loss **rose**: its last two tenths each
  clearly above its lowest tenth (by :data:`RISE` and by :data:`CLEAR` standard errors of the means): unstable,
  not stuck.  The learning rate is too high -- 10x lower, more warmup, a lower clipping threshold;
* **overfitting**: the smoothed eval loss (the running median of :data:`EVAL_WINDOW` evaluations) no longer
  improving -- risen above its best by more than :data:`OVERFIT_MARGIN`, or no gain of that much for
  :data:`OVERFIT_EVALS` evaluations -- while the train loss clearly fell over the same stretch (by
  :data:`TRAIN_FALL` and :data:`CLEAR` standard errors); the evidence states the train/eval gap.  Fewer epochs
  (stop near the best evaluation), more dropout or weight decay, more data;
* **stuck**: over at least :data:`MIN_LOGS` logs, the train loss's last tenth within :data:`STUCK_DROP` of its
  first tenth, or less than :data:`NOISY_DROP` below it and not clearly: the learning rate is too low (or the
  labels are all masked): raise it;
* **healthy** otherwise (or "too early" with fewer logs than that).

"Clearly" is measured against the run's own noise: the spread of one logged loss around its trend
(:func:`.divergence.log_noise`, from consecutive logs, robust to spikes).  Every diagnosis carries its evidence in
numbers.  Pure Python: the CLI (``finetune-helper doctor``) and the app (the Runs tab, live while a run trains) call
it.  ``benchmarks/doctor_runs.py`` measures the false-label rate on noisy healthy curves and on real runs of the
tiny model.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any

from . import run_folder
from .divergence import CLEAR, DivergenceGuard, log_noise

#: logs needed before "stuck" or "healthy" can be told apart from noise
MIN_LOGS = 10
#: a loss that fell by less than this fraction from its first tenth to its last tenth is flat
STUCK_DROP = 0.02
#: a fall below this fraction that is not clear of the noise (CLEAR standard errors) is flat too: the demo at LR 1e-8
#: logs 2% noise per step, so its first and last three logs differ by up to 5% with nothing learnt
NOISY_DROP = 0.1
#: a last tenth this fraction above the lowest tenth is a rise (the issue's example: 1.0 -> 1.8), if also clear
RISE = 0.1
#: evaluations in the smoothed eval loss, their running median: one noisy evaluation does not move it at all
EVAL_WINDOW = 3
#: the smoothed eval loss must improve on its best by more than this fraction to count as still improving
OVERFIT_MARGIN = 0.02
#: evaluations without such a gain (or its rise above the best by as much) before it has stopped improving: as many as
#: the median spans, so that the stretch holds one whole window past the best
OVERFIT_EVALS = EVAL_WINDOW
#: the train loss must fall by at least this fraction over that stretch (the gap widening, not noise)
TRAIN_FALL = 0.1
#: the standard error of a median over that of a mean, for normal noise: sqrt(pi / 2)
MEDIAN_ERROR = math.sqrt(math.pi / 2)
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


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def diagnose(records: list[dict[str, Any]], *, stopped: str | None = None, loss_scaler: bool = False) -> Diagnosis:
    """The diagnosis of a run's ``metrics.jsonl`` records (in step order).  ``stopped``: the runner's own message
    when it stopped the run as diverged (``summary.json``); ``loss_scaler``: an fp16 run, whose non-finite gradient
    norms are skipped steps, not divergence."""
    train = [r for r in records if _number(r.get("loss"))]
    evals = [r for r in records if _number(r.get("eval_loss")) and math.isfinite(r["eval_loss"])]
    start = next((r for r in records if r.get("step") == 0 and _number(r.get("start_loss"))), {})
    lr = max((r["learning_rate"] for r in train if _number(r.get("learning_rate"))), default=None)
    lr_text = f"peak {lr:.2g}" if lr else "the current one"
    verdict = _diverged(train, start, lr_text, loss_scaler)
    if verdict is None and stopped:
        verdict = Diagnosis("diverged", f"the run stopped itself: {stopped}", _DIVERGED_ADVICE.format(lr=lr_text))
    if verdict:
        return verdict
    if len(train) < MIN_LOGS:
        return _overfitting(train, evals) or Diagnosis(
            "healthy", f"too early to tell: {len(train)} logged steps (the doctor needs {MIN_LOGS})",
            "nothing to change yet")
    return _rising(train, lr_text) or _overfitting(train, evals) or _stuck_or_healthy(train, evals, lr_text)


def _stuck_or_healthy(train: list[dict[str, Any]], evals: list[dict[str, Any]], lr_text: str) -> Diagnosis:
    """Stuck when the train loss did not clearly fall from its first tenth to its last, else healthy."""
    losses = [float(r["loss"]) for r in train]
    tenth = max(3, len(losses) // 10)
    first, last = _mean(losses[:tenth]), _mean(losses[-tenth:])
    drop = (first - last) / abs(first) if first else 0.0
    fell = _clear_change(losses[:tenth], losses[-tenth:], log_noise(losses), STUCK_DROP)
    span = f"steps {train[0].get('step')}-{train[-1].get('step')}"
    if drop < STUCK_DROP or (drop < NOISY_DROP and (fell is None or fell > 1)):
        return Diagnosis("stuck", f"train loss {first:.4g} -> {last:.4g} ({-drop:+.1%}) over {span}, mean of the first "
                         f"and last {tenth} logs", f"raise the learning rate ({lr_text}; try 10x), and check "
                         "that the labels are not all masked (answer tokens in the data, max_length long enough)")
    eval_text = ""
    if evals:
        now, best = evals[-1]["eval_loss"], min(r["eval_loss"] for r in evals)
        eval_text = f"; eval loss {now:.4g} (best {best:.4g})"
    return Diagnosis("healthy", f"train loss {first:.4g} -> {last:.4g} ({-drop:+.1%}) over {span}{eval_text}",
                     "nothing to change")


_DIVERGED_ADVICE = ("lower the learning rate 10x ({lr} now), use more warmup steps and a lower max_grad_norm "
                    "(0.3-0.5); restart from the last checkpoint before the rise")


def _diverged(train: list[dict[str, Any]], start: dict[str, Any], lr_text: str,
              loss_scaler: bool) -> Diagnosis | None:
    """The runner's stop rules over the logged losses, judged against the loss before training when recorded."""
    uniform = start.get("uniform_loss")
    guard = DivergenceGuard(reference=start.get("start_loss"), uniform=uniform if _number(uniform) else None)
    for r in train:
        grad = r.get("grad_norm")
        why = guard.update(float(r["loss"]), float(grad) if _number(grad) else None, loss_scaler=loss_scaler,
                           step=r.get("step") if _number(r.get("step")) else None)
        if why:
            spikes = sum(1 for a, b in zip(train, train[1:]) if math.isfinite(b["loss"]) and b["loss"] > 2 * a["loss"])
            return Diagnosis("diverged", f"at step {r.get('step')}: {why}"
                             + (f"; {spikes} single-log spikes above 2x the previous loss" if spikes else ""),
                             _DIVERGED_ADVICE.format(lr=lr_text))
    return None


def _clear_change(before: list[float], after: list[float], noise: float, fraction: float) -> float | None:
    """The change of the loss from ``before`` to ``after`` (their medians, so that one bad batch does not make it) as
    a ratio (after / before), when its size is at least ``fraction`` and :data:`CLEAR` standard errors of the two
    medians' log-difference (a median's is 1.25x a mean's, for normal noise); else None."""
    if not before or not after or min(before + after) <= 0:
        return None
    a, b = (statistics.median(math.log(x) for x in window) for window in (before, after))
    error = MEDIAN_ERROR * noise * math.sqrt(1 / len(before) + 1 / len(after))
    if abs(b - a) >= max(abs(math.log1p(fraction if b > a else -fraction)), CLEAR * error):
        return math.exp(b - a)
    return None


def _rising(train: list[dict[str, Any]], lr_text: str) -> Diagnosis | None:
    """The train loss's last two tenths each clearly above its lowest tenth before them (tenths counted back from the
    last log): a rise that lasts, not one tenth that happened to be high against one that happened to be low."""
    losses = [float(r["loss"]) for r in train]
    tenth = max(3, len(losses) // 10)
    windows = [losses[max(0, end - tenth):end] for end in range(len(losses), 0, -tenth)]
    windows = [w for w in windows if len(w) == tenth]
    lowest = min(range(len(windows)), key=lambda i: _mean(windows[i]))
    if lowest < 2:
        return None
    noise = log_noise(losses)
    ratios = [_clear_change(windows[lowest], windows[i], noise, RISE) for i in (1, 0)]
    if any(r is None or r < 1 for r in ratios):
        return None
    at = len(losses) - lowest * tenth - 1
    return Diagnosis("diverged", f"the train loss rose {_mean(windows[lowest]):.4g} -> {_mean(windows[0]):.4g} "
                     f"({ratios[1] - 1:+.0%}; means of {tenth} logs, the lowest around step {train[at].get('step')}, "
                     f"the last at step {train[-1].get('step')}): unstable, not stuck",
                     _DIVERGED_ADVICE.format(lr=lr_text))


def _overfitting(train: list[dict[str, Any]], evals: list[dict[str, Any]]) -> Diagnosis | None:
    """The smoothed eval loss risen above its best by the margin, or without a gain of the margin for
    :data:`OVERFIT_EVALS` evaluations, while the train loss clearly fell over that stretch."""
    losses = [float(r["eval_loss"]) for r in evals]
    if len(losses) < EVAL_WINDOW + 1 or len(train) < 2:
        return None
    smoothed = [statistics.median(losses[max(0, i - EVAL_WINDOW + 1):i + 1]) for i in range(len(losses))]
    best = min(smoothed)
    since = next(i for i, s in enumerate(smoothed) if s <= (1 + OVERFIT_MARGIN) * best)
    stale, rose = len(losses) - 1 - since, smoothed[-1] > (1 + OVERFIT_MARGIN) * best
    if stale < OVERFIT_EVALS and not rose:
        return None  # still improving (or not for long enough to tell)
    since_step = evals[max(0, since - (EVAL_WINDOW - 1) // 2)].get("step", 0)  # the middle of its window
    tenth = max(3, len(train) // 10)
    before = [float(r["loss"]) for r in train if r.get("step", 0) <= since_step][-tenth:]
    after = [float(r["loss"]) for r in train if r.get("step", 0) > since_step][-tenth:]
    ratio = _clear_change(before, after, log_noise([float(r["loss"]) for r in train]), TRAIN_FALL)
    if ratio is None or ratio > 1:
        return None  # the train loss did not keep falling: not overfitting
    best_eval = min(range(len(losses)), key=losses.__getitem__)
    best_step, epoch = evals[best_eval].get("step", 0), evals[best_eval].get("epoch")
    last_step = evals[-1].get("step", 0)
    train_now = _mean(after)
    trend = (f"{smoothed[-1] / best - 1:+.1%} above its best {best:.4g}" if rose else
             f"no gain over {OVERFIT_MARGIN:.0%} in the {stale} evaluations since step {since_step}")
    return Diagnosis("overfitting", f"smoothed eval loss (median of {EVAL_WINDOW} evaluations) {smoothed[-1]:.4g} at "
                     f"step {last_step}, {trend}, while the train loss fell {_mean(before):.4g} -> {train_now:.4g} "
                     f"({ratio - 1:+.0%}); gap: eval {losses[-1]:.4g} is {losses[-1] / train_now:.1f}x the train "
                     f"loss {train_now:.4g}",
                     f"train fewer epochs (the best eval, {losses[best_eval]:.4g}, was at step {best_step}"
                     + (f", epoch {epoch:.2g}" if _number(epoch) else "")
                     + "), add dropout or weight decay, or more data")


def diagnose_run(run_dir) -> Diagnosis:
    """:func:`diagnose` of a run folder: its metrics, how the runner ended it and whether it ran in fp16, whatever
    its files hold (:func:`diagnose_files`)."""
    records, skipped = run_folder.read_metrics_counted(run_dir)
    return diagnose_files(records, skipped, run_folder.read_json(run_dir / run_folder.SUMMARY),
                          run_folder.read_json(run_dir / run_folder.TRAINING_ARGS))


def diagnose_files(records: list[dict[str, Any]], skipped: int, summary: Any, args: Any) -> Diagnosis:
    """:func:`diagnose` of a run folder's files as read: ``skipped`` lines of metrics.jsonl that were not records are
    counted in the evidence; a summary.json or training_args.json that is not an object is taken as absent."""
    summary, args = _object(summary), _object(args)
    stopped = summary.get("message") if summary.get("status") == "diverged" else None
    found = diagnose(records, stopped=stopped if isinstance(stopped, str) else None,
                     loss_scaler=args.get("fp16") is True)
    if skipped:
        found = dataclasses.replace(found, evidence=f"{found.evidence}; {skipped} unreadable line"
                                    f"{'s' if skipped > 1 else ''} of {run_folder.METRICS} skipped")
    return found


def _object(data: Any) -> dict[str, Any]:
    return data if isinstance(data, dict) else {}
