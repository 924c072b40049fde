"""The doctor labels real runs of the tiny model as what they are (``benchmarks/doctor_runs.py``: a healthy, a
diverging, a stuck and an overfitting run, each trained for real here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

#: integration tier (make test-integration): real training runs
pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def test_each_real_run_gets_its_label():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "doctor_runs.py"), "--json"], capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads(out.stdout)
    assert [r["diagnosis"] for r in results] == [r["expected"] for r in results], results
    by_label = {r["expected"]: r for r in results}
    assert by_label["diverged"]["exit_code"] == 3 and by_label["healthy"]["exit_code"] == 0
    assert "peak 1e-08" in by_label["stuck"]["advice"]
