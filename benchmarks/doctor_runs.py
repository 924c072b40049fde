"""The doctor on real runs of the tiny model: a run for each failure mode and a healthy one, trained here with
``finetune-helper run``, then read by ``finetune-helper doctor``; prints what it says next to what each run is.

    .venv/bin/python benchmarks/doctor_runs.py            # the four runs, about a minute on 2 cores
    .venv/bin/python benchmarks/doctor_runs.py --json     # the same as JSON (the test reads it)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny-demo.yaml"
#: (what the run is, the label it should get, its overrides of recipes/tiny-demo.yaml)
SCENARIOS = [
    ("healthy: the demo's own settings, 30 steps", "healthy",
     ["training.max_steps=30", "training.logging_steps=1", "data.max_examples=300"]),
    ("diverging: learning rate 50, no warmup", "diverged",
     ["training.max_steps=30", "training.logging_steps=1", "training.learning_rate=50.0", "training.warmup_steps=0",
      "data.max_examples=300"]),
    ("stuck: learning rate 1e-8", "stuck",
     ["training.max_steps=30", "training.logging_steps=1", "training.learning_rate=1e-8", "data.max_examples=300"]),
    ("overfitting: 30 training examples, 40 epochs", "overfitting",
     ["data.max_examples=40", "data.eval_fraction=0.25", "training.num_train_epochs=40",
      "training.per_device_train_batch_size=8", "training.gradient_accumulation_steps=1", "training.logging_steps=5",
      "training.eval_steps=10", "training.save_steps=1000", "training.learning_rate=2e-3"]),
]


def run_all(workdir: Path) -> list[dict]:
    results = []
    for what, expected, overrides in SCENARIOS:
        run_dir = workdir / expected
        t0 = time.time()
        ran = subprocess.run([sys.executable, "-m", "finetune_helper", "run", str(TINY), "--output-dir", str(run_dir),
                              *overrides], capture_output=True, text=True, timeout=600)
        seconds = time.time() - t0
        doc = subprocess.run([sys.executable, "-m", "finetune_helper", "doctor", str(run_dir), "--json"],
                             capture_output=True, text=True, timeout=120)
        found = json.loads(doc.stdout) if doc.returncode == 0 else {"diagnosis": "error", "evidence": doc.stderr}
        results.append({"run": what, "expected": expected, "exit_code": ran.returncode, "seconds": round(seconds, 1),
                        **found})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="doctor-runs-") as tmp:
        results = run_all(Path(tmp))
    if args.json:
        print(json.dumps(results))
        return
    print(f"{'run':46s} {'exit':>4s} {'doctor says':12s} evidence")
    for r in results:
        mark = "" if r["diagnosis"] == r["expected"] else f"  (expected {r['expected']})"
        print(f"{r['run']:46s} {r['exit_code']:4d} {r['diagnosis']:12s} {r['evidence']}{mark}")
    right = sum(r["diagnosis"] == r["expected"] for r in results)
    print(f"\n{right} of {len(results)} runs labelled as what they are")


if __name__ == "__main__":
    main()
