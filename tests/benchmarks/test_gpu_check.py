"""``benchmarks/gpu_check.sh`` is run only where a GPU is lent: its code is kept working here through ``--smoke``
(the same code on the CPU, two tiny configurations, the tracked peak standing in for the allocator's)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

#: integration tier (make test-integration): real torch / transformers / trainer / server work
pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_runs_the_grid_code_and_writes_the_table(tmp_path):
    results = tmp_path / "RESULTS.md"
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--search", "1",
                          "--results", str(results)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in results.read_text().splitlines() if line.startswith("| tiny-base")]
    assert len(rows) == 2, results.read_text()
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        recommended, largest = int(cells[3]), int(cells[9])
        assert largest >= recommended >= 1, row  # the recommended batch ran, and the search started from it
    assert "recommended batches that ran: 2 of 2" in results.read_text()


def test_without_a_gpu_it_refuses_at_once_and_writes_nothing(tmp_path):
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                         timeout=120, env={"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 2 and "no CUDA GPU" in out.stderr
