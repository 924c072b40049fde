"""The doctor's rules on curves shaped like the cases that fool simple rules (real runs: benchmarks/doctor_runs.py,
tests/benchmarks/test_doctor_runs.py)."""

from __future__ import annotations

import math

from finetune_helper.train.doctor import diagnose


def logs(losses, evals=(), every=10, grad=1.0):
    records = [{"step": i + 1, "loss": loss, "learning_rate": 1e-4, "grad_norm": grad} for i, loss in enumerate(losses)]
    records += [{"step": every * (k + 1), "eval_loss": e, "epoch": k + 1} for k, e in enumerate(evals)]
    return sorted(records, key=lambda r: r["step"])


def falling(n=60):
    return [2.0 * math.exp(-i / 20) + 0.5 for i in range(n)]


def test_a_falling_loss_is_healthy_and_a_flat_one_stuck():
    assert diagnose(logs(falling())).diagnosis == "healthy"
    flat = diagnose(logs([2.0 + 0.01 * (-1) ** i for i in range(60)]))
    assert flat.diagnosis == "stuck" and "raise the learning rate" in flat.advice


def test_eval_rising_while_train_falls_is_overfitting_but_not_when_train_rises_too():
    evals = [1.5, 1.2, 1.0, 1.05, 1.1, 1.2]
    assert diagnose(logs(falling(), evals)).diagnosis == "overfitting"
    rising_train = list(reversed(falling()))
    assert diagnose(logs(rising_train[:30] + [rising_train[29]] * 30, evals)).diagnosis != "overfitting"


def test_fp16_overflow_steps_are_not_divergence_but_nan_weights_are():
    records = logs(falling())
    for r in records[:3]:
        r["grad_norm"] = math.inf
    assert diagnose(records, loss_scaler=True).diagnosis == "healthy"
    assert diagnose(records, loss_scaler=False).diagnosis == "diverged"


def test_a_run_the_runner_stopped_is_diverged_with_its_message():
    d = diagnose(logs(falling(5)), stopped="loss diverged at step 5 (the loss is nan)")
    assert d.diagnosis == "diverged" and "step 5" in d.evidence and "10x" in d.advice
