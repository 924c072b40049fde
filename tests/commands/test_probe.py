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


def probe(*args: str, store: Path, tmp: Path | None = None) -> subprocess.CompletedProcess:
    """``finetune-helper probe`` of the tiny recipe; ``tmp``: the temporary folder it is given (``TMPDIR``)."""
    env = dict(os.environ, FINETUNE_HELPER_CALIBRATION=str(store), HF_HUB_OFFLINE="1")
    if tmp is not None:
        tmp.mkdir(exist_ok=True)
        env["TMPDIR"] = str(tmp)
    return subprocess.run([sys.executable, "-m", "finetune_helper", "probe", str(TINY), *args], capture_output=True,
                          text=True, env=env, timeout=300)


def left_behind(tmp: Path) -> list[str]:
    """The probe's own folders still in the temporary folder (other libraries' caches, torch's, do not count)."""
    return [p.name for p in tmp.iterdir() if p.name.startswith("finetune-helper-")]


def test_probe_measures_the_recommended_and_a_larger_batch_and_stores_the_calibration(tmp_path):
    store = tmp_path / "calibration.json"
    # 600 examples x 15 epochs: enough steps at the full target batch of 64 (smaller data lowers it, issue 13)
    # no --output-dir: the probe's runs go to a temporary folder, removed when it ends
    proc = probe("data.max_examples=600", "--steps", "2", "--json", store=store, tmp=tmp_path / "tmp")
    assert proc.returncode == 0, proc.stderr
    assert left_behind(tmp_path / "tmp") == []
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


def test_a_failed_probe_removes_its_folder_and_a_file_as_output_dir_is_refused_at_once(tmp_path):
    """The temporary folder goes on failure too (an empty data file, refused once the probe has started); a file
    given as --output-dir is refused before anything loads, in one line (it was the Trainer's NotADirectoryError
    traceback once the recipe had been planned)."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    proc = probe(f"data.path={empty}", store=tmp_path / "c.json", tmp=tmp_path / "tmp")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"finetune-helper: error: data.path: {empty} is empty")
    assert left_behind(tmp_path / "tmp") == []

    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    for folder in (a_file, a_file / "probe"):
        proc = probe("--output-dir", str(folder), store=tmp_path / "c.json")
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
            f"finetune-helper: error: --output-dir: {'' if folder == a_file else f'cannot make {folder}: '}"
            f"{a_file} is a file, not a folder"]
    assert not (tmp_path / "c.json").exists() and a_file.read_text() == "not a folder"
