"""``finetune-helper probe`` on this machine's CPU: the runner's real steps measured next to the estimate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

#: integration tier (make test-integration): real torch / transformers / trainer / server work
pytestmark = pytest.mark.integration

TINY = Path(__file__).resolve().parents[2] / "recipes" / "tiny-demo.yaml"


def probe(*args: str, store: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, FINETUNE_HELPER_CALIBRATION=str(store), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "finetune_helper", "probe", str(TINY), *args], capture_output=True,
                          text=True, env=env, timeout=300)


def test_probe_measures_the_recommended_and_a_larger_batch_and_stores_the_calibration(tmp_path):
    store = tmp_path / "calibration.json"
    # 600 examples x 15 epochs: enough steps at the full target batch of 64 (smaller data lowers it, issue 13)
    proc = probe("data.max_examples=600", "--steps", "2", "--json", "--output-dir", str(tmp_path / "probe"),
                 store=store)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["device"] == "cpu" and result["measure"] == "tracked live tensor bytes"
    rows = result["rows"]
    assert [r["micro_batch"] for r in rows][:2] == [64, 128]
    for row in rows:
        assert abs(row["error"]) < 0.05 and row["measured_bytes"] > 0
    assert rows[1]["measured_bytes"] > rows[0]["measured_bytes"]
    stored = json.loads(store.read_text())
    (entry,) = stored.values()
    assert entry["device"] == "cpu" and entry["method"] == "full" and abs(entry["ratio"] - 1) < 0.05
    assert entry["measured_bytes"] == rows[0]["measured_bytes"]


def test_bad_probe_input_is_one_line_exit_2(tmp_path):
    proc = probe("--steps", "0", store=tmp_path / "c.json")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "finetune-helper: error: --steps: must be from 1 to 20, got 0"]
    assert not (tmp_path / "c.json").exists()
