"""The doctor labels real runs of the tiny model as what they are (``benchmarks/doctor_runs.py``: a healthy, a
diverging, a stuck and an overfitting run, each trained for real here), and calls none of 50 noisy healthy
synthetic curves anything but healthy while still seeing the failure modes in theirs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHMARK = ROOT / "benchmarks" / "doctor_runs.py"


def benchmark(*args: str, timeout: int) -> dict:
    out = subprocess.run([sys.executable, str(BENCHMARK), "--json", *args], capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_no_false_labels_on_noisy_healthy_curves_and_the_failures_still_seen():
    """Pure Python (the synthetic curves only): at most one false label on the 50 healthy curves (over 3,000 such
    curves the rate is 0.3-0.7%); at least 3 in 4 curves of each failure mode labelled so (a doctor that answers
    "healthy" to everything would pass the first part)."""
    result = benchmark("--synthetic", timeout=120)
    assert result["runs"] == [] and result["false_label_rate"]["synthetic_healthy"] <= 1 / 50, result["synthetic"]
    for kind, found in result["synthetic"].items():
        assert found["curves"] == 50 and found["right"] >= 0.75 * found["curves"], (kind, found)


@pytest.mark.integration
@pytest.mark.slow
def test_each_real_run_gets_its_label():
    result = benchmark(timeout=1800)
    runs = result["runs"]
    assert [r["diagnosis"] for r in runs] == [r["expected"] for r in runs], runs
    assert result["false_label_rate"]["real_runs"] == 0
    by_label = {r["expected"]: r for r in runs}
    assert by_label["diverged"]["exit_code"] == 3 and by_label["healthy"]["exit_code"] == 0
    assert "peak 1e-08" in by_label["stuck"]["advice"]
    assert "x the train loss" in by_label["overfitting"]["evidence"]  # the gap, stated
