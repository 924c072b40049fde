"""When a run has diverged: the runner's stop rule, pure Python (its ``Guard`` callback feeds it each log).

* **Non-finite loss**: diverged at once (the weights or the forward are broken).
* **Non-finite gradient norm**: with a loss scaler (fp16 under ``GradScaler``) an overflowing step is skipped and
  the scale lowered -- normal, the first steps of an fp16 run do it several times -- so it is ignored unless the
  loss itself is non-finite.  Without a scaler (bf16, fp32) the optimizer applied it: diverged.
* **Exploding loss**: the smoothed loss (an exponential moving average over logs, bias-corrected as in Smith's and
  fastai's LR range test) stays above ``factor`` x its reference for ``patience`` consecutive logs.  The reference is
  the mean of the first ``patience`` logged losses, so one noisy batch (``logging_steps=1``) neither sets it nor
  trips it.  A loss that ends up well above where training started has diverged (the advice: LR 10x lower).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

#: the smoothed loss this many times its starting value counts as exploding (the runner's long-standing rule)
EXPLODE_FACTOR = 2.0
#: consecutive logs above it before the run is stopped, and how many first logs make the reference
PATIENCE = 3
#: EMA weight of the past: 0.5 halves a single batch's spike while following a real rise within a few logs
SMOOTHING = 0.5


@dataclass
class DivergenceGuard:
    """Feed :meth:`update` every logged loss; it returns why the run diverged, or None."""

    factor: float = EXPLODE_FACTOR
    patience: int = PATIENCE
    smoothing: float = SMOOTHING
    #: a reference carried over from an earlier part of the run (resume), else None
    reference: float | None = None
    _first: list[float] = field(default_factory=list)
    _avg: float = 0.0
    _n: int = 0
    _above: int = 0

    def __post_init__(self) -> None:
        if not self.factor > 1 or self.patience < 1 or not 0 <= self.smoothing < 1:
            raise ValueError("need factor > 1, patience >= 1 and 0 <= smoothing < 1")

    def update(self, loss: float, grad_norm: float | None = None, *, loss_scaler: bool = False) -> str | None:
        if not math.isfinite(loss):
            return f"the loss is {loss}"
        if grad_norm is not None and not math.isfinite(grad_norm) and not loss_scaler:
            return f"the gradient norm is {grad_norm} (no loss scaler skipped the step: the weights took it)"
        self._n += 1
        self._avg = self.smoothing * self._avg + (1 - self.smoothing) * loss
        smoothed = self._avg / (1 - self.smoothing ** self._n)
        if self.reference is None:
            self._first.append(loss)
            if len(self._first) == self.patience:
                self.reference = sum(self._first) / len(self._first)
            return None
        self._above = self._above + 1 if smoothed > self.factor * self.reference else 0
        if self._above >= self.patience:
            return (f"the smoothed loss {smoothed:.4g} stayed above {self.factor:g}x its start ({self.reference:.4g}) "
                    f"for {self._above} logs")
        return None
