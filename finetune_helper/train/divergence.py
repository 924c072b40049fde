"""When a run has diverged: the runner's stop rule, pure Python (its ``Guard`` callback feeds it each log).

Every rule judges against the loss before training (the runner measures it on the first optimizer step, before
any update: :func:`.callbacks.watch_start_loss`), not against the first logs: a learning rate far too high has
blown the loss up by then (the demo at LR 50 on one x86 CPU, issue 19: 67,219 at step 2, 2.2 million at step 4),
and a reference taken there would make any later loss look fine.

* **Non-finite loss**: diverged at once (the weights or the forward are broken).
* **Non-finite gradient norm**: with a loss scaler (fp16 under ``GradScaler``) an overflowing step is skipped and
  the scale lowered -- normal, the first steps of an fp16 run do it several times -- so it is ignored unless the
  loss itself is non-finite.  Without a scaler (bf16, fp32) the optimizer applied it: diverged.
* **Exploding loss**: the smoothed loss (an exponential moving average over logs, bias-corrected as in Smith's and
  fastai's LR range test) stays above ``factor`` x the loss before training for ``patience`` consecutive logs.  That
  start is one optimizer step's loss (the plan's effective batch, 64 examples by default), as noisy as one step:
  the threshold is widened by :data:`CLEAR` standard deviations of the run's own noise of one step
  (:func:`log_noise` of the logs, times the square root of the steps a log averages; before there are enough logs
  to tell, a single small batch's noise is assumed), so a start that happened to be low does not stop a healthy
  run; spikes of single batches are halved by the smoothing and outlasted by the patience.  Without a start (a run
  folder from before it was recorded) the reference is the mean of the first ``patience`` logged losses, not
  widened.
* **Collapsed to a uniform prediction**: the loss sits at ln(vocabulary size) -- the cross-entropy of predicting
  every token with the same probability -- for ``patience`` logs, when training started away from it.  A model
  whose logits have all become equal has lost what it knew (the demo at LR 50: exactly ln 512 = 6.238 from step 6
  on); its loss is no longer far above the start, and it can even be below it, so the factor rule misses it.
* **Dead weights**: a gradient norm of exactly 0.0 with the loss constant for ``patience`` logs: nothing flows back,
  the weights will never move again (the same collapsed demo run logs ``grad_norm`` 0.0 from step 6 on).

The advice for each: the learning rate was too high (10x lower, more warmup).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

#: the smoothed loss this many times the loss before training counts as exploding (the runner's long-standing rule)
EXPLODE_FACTOR = 2.0
#: consecutive logs a rule must hold before the run is stopped, and how many first logs make the fallback reference
PATIENCE = 3
#: EMA weight of the past: 0.5 halves a single batch's spike while following a real rise within a few logs
SMOOTHING = 0.5
#: "at" a value: within this fraction of it.  Equal logits give ln(V) on every batch, as dead weights give the same
#: loss on every batch: the tiny model with its weights zeroed logs 6.238317-6.238325 (1e-6 apart; ln 512 =
#: 6.238325).  The loss of a learning model moves by percents from one log to the next (the demo: 2-4%), so it does
#: not stay this close to a value for ``patience`` logs in a row
AT_VALUE = 1e-3
#: the uniform-loss rule needs a start further than this fraction from ln(V): a model trained from scratch starts near
#: the uniform loss (ln(V) plus about half the variance of its small random logits), and sitting there is then no
#: collapse.  Measured on a demo batch, re-initialised (seeds 0-4): the shipped tiny Llama's shape (hidden 128)
#: within 2% of ln 512, 1024 wide within 7% (tests/train/test_divergence_start.py); 4096 wide 9-17% (seeds 0-2, once).
#: The pre-trained tiny model starts 44% above it (its chat tokens are new)
UNIFORM_START = 0.25
#: standard deviations a change must exceed to be clear of the noise (a one-sided 3-sigma test: 0.13% by chance)
CLEAR = 3.0
#: the logs whose noise is estimated: the latest ones, as the noise changes along a run
NOISE_LOGS = 100
#: until this many logs give an estimate of the run's own noise, one step's loss is taken to be as noisy as a single
#: small batch: a standard deviation of 35% (the +-60% single-batch logs of tests/train/test_divergence.py; single
#: examples of the demo data spread 21% around their mean, measured on the shipped model before training).  The
#: threshold is then 2 x e^(3 x 0.35) = 5.7x the start: a blow-up (the demo at LR 50: 6,600x) still stops at once.
#: Ten logs: the median absolute deviation of 9 log-ratios is within about 40% of the spread (1.17 / sqrt(9))
NOISE_MIN_LOGS = 10
PRIOR_NOISE = 0.35


def log_noise(losses: list[float]) -> float:
    """The spread of one logged loss around its trend, as a fraction: from the log-ratios of consecutive logs (each
    the noise of two logs; the trend barely moves in one log) by their median absolute deviation (1.4826 x MAD
    estimates a normal's sigma), so a spike or a blow-up among them does not inflate it."""
    steps = [math.log(b / a) for a, b in zip(losses, losses[1:]) if a > 0 and b > 0]
    if len(steps) < 2:
        return 0.0
    centre = statistics.median(steps)
    return 1.4826 * statistics.median(abs(x - centre) for x in steps) / math.sqrt(2)


def uniform_loss(vocab_size: int | None) -> float | None:
    """The cross-entropy of a uniform prediction over ``vocab_size`` tokens: ln(vocab_size)."""
    return math.log(vocab_size) if vocab_size and vocab_size > 1 else None


@dataclass
class DivergenceGuard:
    """Feed :meth:`update` every logged loss; it returns why the run diverged, or None.

    ``reference``: the loss before training (or a resumed run's, :func:`.callbacks.resume_reference`); without it
    the mean of the first ``patience`` logs.  ``uniform``: ln(vocabulary size) (:func:`uniform_loss`), or None
    when unknown (that rule is then off)."""

    factor: float = EXPLODE_FACTOR
    patience: int = PATIENCE
    smoothing: float = SMOOTHING
    reference: float | None = None
    uniform: float | None = None
    _measured: bool = False
    _first: list[float] = field(default_factory=list)
    _recent: list[float] = field(default_factory=list)
    _gaps: list[int] = field(default_factory=list)
    _step: int | None = None
    _start: float | None = None
    _avg: float = 0.0
    _n: int = 0
    _above: int = 0
    _at_uniform: int = 0
    _dead: int = 0
    _dead_loss: float = 0.0

    def __post_init__(self) -> None:
        if not self.factor > 1 or self.patience < 1 or not 0 <= self.smoothing < 1:
            raise ValueError("need factor > 1, patience >= 1 and 0 <= smoothing < 1")
        self._measured = self.reference is not None
        self._start = self.reference

    def update(self, loss: float, grad_norm: float | None = None, *, loss_scaler: bool = False,
               step: int | None = None) -> str | None:
        """``step``: the log's optimizer step (the steps between logs tell how many steps one log averages)."""
        if step is not None and self._step is not None and step > self._step:
            self._gaps = (self._gaps + [step - self._step])[-NOISE_LOGS:]
        self._step = step
        if not math.isfinite(loss):
            return f"the loss is {loss}"
        if grad_norm is not None and not math.isfinite(grad_norm) and not loss_scaler:
            return f"the gradient norm is {grad_norm} (no loss scaler skipped the step: the weights took it)"
        if self._start is None:
            self._start = loss  # no loss before training known: the first log stands for it
        return self._dead_weights(loss, grad_norm) or self._collapsed(loss) or self._exploding(loss)

    def _exploding(self, loss: float) -> str | None:
        self._recent = (self._recent + [loss])[-NOISE_LOGS:]
        self._n += 1
        self._avg = self.smoothing * self._avg + (1 - self.smoothing) * loss
        smoothed = self._avg / (1 - self.smoothing ** self._n)
        if self.reference is None:
            self._first.append(loss)
            if len(self._first) == self.patience:
                self.reference = sum(self._first) / len(self._first)
            return None
        widen = math.exp(CLEAR * self._step_noise()) if self._measured else 1.0
        self._above = self._above + 1 if smoothed > self.factor * widen * self.reference else 0
        if self._above >= self.patience:
            start = "the loss before training" if self._measured else f"its start (its first {self.patience} logs)"
            noise = f", widened {widen:.2f}x for the noise of one step" if widen > 1.005 else ""
            return (f"the smoothed loss {smoothed:.4g} stayed above {self.factor:g}x {start} ({self.reference:.4g}"
                    f"{noise}) for {self._above} logs")
        return None

    def _step_noise(self) -> float:
        """The noise of one optimizer step's loss (as the start is): a log's, times the square root of the steps one
        log averages; :data:`PRIOR_NOISE` until :data:`NOISE_MIN_LOGS` logs."""
        if len(self._recent) < NOISE_MIN_LOGS:
            return PRIOR_NOISE
        steps = statistics.median(self._gaps) if self._gaps else 1
        return log_noise(self._recent) * math.sqrt(steps)

    def _collapsed(self, loss: float) -> str | None:
        if self.uniform is None or abs(self._start - self.uniform) <= UNIFORM_START * self.uniform:
            return None
        self._at_uniform = self._at_uniform + 1 if abs(loss - self.uniform) <= AT_VALUE * self.uniform else 0
        if self._at_uniform >= self.patience:
            return (f"the loss sat at {loss:.4g} = ln(vocabulary size {round(math.exp(self.uniform))}) for "
                    f"{self._at_uniform} logs: a uniform prediction, the model collapsed (it started at "
                    f"{self._start:.4g})")
        return None

    def _dead_weights(self, loss: float, grad_norm: float | None) -> str | None:
        if grad_norm != 0.0 or loss <= 0:
            self._dead = 0
            return None
        same = self._dead and abs(loss - self._dead_loss) <= AT_VALUE * self._dead_loss
        self._dead, self._dead_loss = (self._dead + 1, self._dead_loss) if same else (1, loss)
        if self._dead >= self.patience:
            return (f"the gradient norm was exactly 0 with the loss constant at {loss:.4g} for {self._dead} logs: "
                    "the weights are dead and will not move again")
        return None
