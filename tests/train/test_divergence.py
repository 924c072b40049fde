"""The divergence stop on loss curves shaped like real runs: fp16 overflow steps and noisy single-batch logs must
not stop a healthy run; a real blow-up and a NaN must."""

from __future__ import annotations

import math
import random

import pytest

from finetune_helper.train.divergence import DivergenceGuard


def first_stop(losses, grad_norms=None, **kw):
    guard = DivergenceGuard()
    for i, loss in enumerate(losses):
        why = guard.update(loss, grad_norms[i] if grad_norms else 1.0, **kw)
        if why:
            return i, why
    return None


def healthy(n=200, seed=0, noise=0.6):
    """A decaying loss logged every step, single-batch noise of +-60% (logging_steps=1 on small batches)."""
    rng = random.Random(seed)
    return [(2.0 * math.exp(-i / 60) + 0.3) * (1 + noise * (2 * rng.random() - 1)) for i in range(n)]


def test_fp16_overflow_steps_do_not_stop_a_healthy_run():
    losses = healthy()
    grads = [math.inf if i in (0, 1, 2, 3, 40, 41, 120) else 1.0 for i in range(len(losses))]
    assert first_stop(losses, grads, loss_scaler=True) is None


def test_a_non_finite_gradient_without_a_scaler_stops():
    losses = healthy(20)
    grads = [math.nan if i == 10 else 1.0 for i in range(20)]
    assert first_stop(losses, grads)[0] == 10


@pytest.mark.parametrize("seed", range(20))
def test_noisy_single_batch_logs_and_one_spike_do_not_stop(seed):
    losses = healthy(seed=seed)
    losses[50] = 4 * losses[0]  # one bad batch
    assert first_stop(losses) is None


def test_the_old_rule_would_have_stopped_that_run():
    """Guard against a test that cannot fail: 2x the first single log is crossed by the same curve."""
    losses = healthy(seed=3)
    losses[50] = 4 * losses[0]
    assert any(loss > 2 * losses[0] for loss in losses)


def test_a_real_blow_up_stops_within_a_few_logs():
    losses = healthy(60) + [3.0 * 1.5 ** k for k in range(20)]
    step, why = first_stop(losses)
    assert 60 <= step <= 66 and "smoothed loss" in why


def test_nan_loss_stops_at_once_even_under_a_scaler():
    losses = healthy(30)
    losses[12] = math.nan
    assert first_stop(losses, loss_scaler=True)[0] == 12


def test_a_resumed_run_keeps_its_reference():
    guard = DivergenceGuard(reference=1.0)
    assert [guard.update(2.5) for _ in range(3)][-1] is not None
