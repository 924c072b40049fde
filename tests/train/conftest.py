"""Fixtures shared by the training tests (pure Python at import: the unit tier loads this file too)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

TINY = Path(__file__).resolve().parents[2] / "recipes" / "tiny-demo.yaml"

#: the 2-process runs of the tiny recipe that several tests read (name: overrides); launched side by side, on one node,
#: neither choosing a port: test_launch.py's concurrent-launch test checks both; test_runner.py's data-parallel test
#: reads and resumes "ddp"; test_launch.py's resume test is refused on "g2" (and changes nothing there)
TWO_PROCESS_RUNS = {
    "ddp": ["training.max_steps=4", "training.logging_steps=1", "training.save_steps=2", "data.max_examples=300"],
    "g2": ["training.max_steps=2", "training.save_steps=2", "data.max_examples=100"],
}


@pytest.fixture(scope="session")
def two_process_runs(tmp_path_factory, worker_id) -> dict[str, dict]:
    """``run --gpus 2`` of each of :data:`TWO_PROCESS_RUNS`, started at once and waited for (one launch of each
    instead of one per test: a 2-process launch of the tiny model takes ~20 s on 2 cores).  Per name: ``run_dir``,
    ``returncode``, ``stdout``, ``stderr`` and ``summary`` (summary.json as it was when both had ended: a test may
    resume "ddp" afterwards).  Under pytest-xdist the first worker to ask launches them, the others read its record
    (pytest-xdist's recipe for a session fixture shared by the workers)."""
    if worker_id == "master":
        return _launch(tmp_path_factory.mktemp("two-process-runs"))
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent  # the workers' common folder
    record = shared / "two-process-runs.json"
    with FileLock(str(record) + ".lock"):
        if not record.is_file():
            runs = _launch(shared / "two-process-runs")
            record.write_text(json.dumps({name: {**run, "run_dir": str(run["run_dir"])} for name, run in runs.items()}))
        runs = json.loads(record.read_text())
    return {name: {**run, "run_dir": Path(run["run_dir"])} for name, run in runs.items()}


def _launch(root: Path) -> dict[str, dict]:
    root.mkdir(parents=True, exist_ok=True)
    procs = {}
    for name, overrides in TWO_PROCESS_RUNS.items():
        with (root / f"{name}.out").open("w") as out, (root / f"{name}.err").open("w") as err:
            procs[name] = subprocess.Popen([sys.executable, "-m", "finetune_helper", "run", str(TINY), "--gpus", "2",
                                            "--output-dir", str(root / name), *overrides], stdout=out, stderr=err,
                                           stdin=subprocess.DEVNULL)
    runs = {}
    try:
        for name, proc in procs.items():
            code = proc.wait(timeout=400)
            summary = root / name / "summary.json"
            runs[name] = {"run_dir": root / name, "returncode": code, "stdout": (root / f"{name}.out").read_text(),
                          "stderr": (root / f"{name}.err").read_text(),
                          "summary": json.loads(summary.read_text()) if summary.is_file() else None}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return runs
