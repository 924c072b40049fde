"""The range test's curve arithmetic on known shapes (the sweep on a real model: tests/commands/test_lr_find.py)."""

from __future__ import annotations

import math

import pytest

from finetune_helper.train.lr_find import RangeTest, smooth, steepest, sweep, valley


def test_the_sweep_is_exponential_from_start_to_end():
    lrs = sweep(1e-7, 1e-1, 100)
    assert lrs[0] == pytest.approx(1e-7) and lrs[-1] == pytest.approx(1e-1) and len(lrs) == 100
    ratios = {round(b / a, 9) for a, b in zip(lrs, lrs[1:])}
    assert len(ratios) == 1
    with pytest.raises(ValueError):
        sweep(1e-3, 1e-4, 10)


def test_smoothing_is_bias_corrected():
    assert smooth([5.0] * 10) == pytest.approx([5.0] * 10)  # no drift towards 0 at the start


def logistic_curve(lrs, center):
    """A loss that falls from 10 to 2 around ``center`` (steepest there on a log axis), then explodes."""
    out = []
    for lr in lrs:
        x = math.log10(lr) - math.log10(center)
        out.append(2 + 8 / (1 + math.exp(4 * x)) + (50 * (lr / (100 * center)) ** 2))
    return out


@pytest.mark.parametrize("center", [1e-5, 3e-4, 1e-3])
def test_steepest_descent_finds_where_the_loss_falls_fastest(center):
    lrs = sweep(1e-7, 1e-1, 200)
    found = steepest(lrs, logistic_curve(lrs, center))
    assert center / 1.2 < found < center * 1.2
    v = valley(lrs, logistic_curve(lrs, center))
    assert v is not None and 1e-7 < v < 100 * center


def test_the_sweep_stops_when_the_smoothed_loss_passes_4x_its_best():
    curve = RangeTest()
    lrs = sweep(1e-6, 1.0, 100)
    losses = [1.0] * 50 + [1.0 * 1.5 ** k for k in range(50)]
    stopped_at = next(i for i, (lr, loss) in enumerate(zip(lrs, losses)) if curve.record(lr, loss))
    assert 50 < stopped_at < 100 and curve.stopped_early
    assert RangeTest().record(1e-3, math.nan)  # a NaN loss stops at once
