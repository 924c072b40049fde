"""The embedded demo over seeds and thread counts: does it learn on every machine, and by how much?

Runs `finetune-helper run recipes/tiny-demo.yaml seed=S` as a separate process for each seed S and each torch
thread count T (``OMP_NUM_THREADS=T``), exactly as `make demo` runs it, and prints held-out exact match before and
after, the loss, the optimizer steps and the wall time of each run, then min / median / max.  The seed picks the
training problems, their order and the evaluation split; the base model is the shipped one.

    .venv/bin/python benchmarks/demo_seeds.py                 # seeds 0-4, 1 and 2 threads (about 10 minutes)
    .venv/bin/python benchmarks/demo_seeds.py --seeds 0 1 --threads 2 --keep
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "tiny-demo.yaml"


def run_once(seed: int, threads: int, out: Path, extra: list[str]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "finetune_helper", "run", str(RECIPE), "--output-dir", str(out),
                           f"seed={seed}", *extra], env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"seed {seed}, {threads} threads: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    s = json.loads((out / "summary.json").read_text())
    return {"seed": seed, "threads": threads, "steps": s["global_step"], "before": s["exact_match_before"],
            "after": s["exact_match_after"], "loss_first": s["train_loss_first"], "loss_last": s["train_loss_last"],
            "eval_loss": s.get("eval_loss"), "train_s": s["wall_seconds"], "wall_s": round(wall, 1)}


def spread(values: list[float]) -> str:
    return f"min {min(values):.3g} / median {statistics.median(values):.3g} / max {max(values):.3g}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--keep", action="store_true", help="keep the run folders (printed)")
    ap.add_argument("overrides", nargs="*", help="recipe overrides for every run, e.g. recommend.epochs=8")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="demo-seeds-"))
    rows = []
    print(f"{'seed':>4} {'thr':>3} {'steps':>5} {'before':>7} {'after':>7} {'loss first':>10} {'loss last':>9} "
          f"{'eval':>7} {'train s':>7} {'wall s':>6}", flush=True)
    try:
        for threads in args.threads:
            for seed in args.seeds:
                r = run_once(seed, threads, tmp / f"s{seed}-t{threads}", args.overrides)
                rows.append(r)
                print(f"{r['seed']:>4} {r['threads']:>3} {r['steps']:>5} {r['before']:>7.1%} {r['after']:>7.1%} "
                      f"{r['loss_first']:>10.4f} {r['loss_last']:>9.4f} {r['eval_loss']:>7.4f} {r['train_s']:>7.1f} "
                      f"{r['wall_s']:>6.1f}", flush=True)
    finally:
        if args.keep:
            print(f"run folders: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nexact match after ({len(rows)} runs): {spread([r['after'] for r in rows])}")
    print(f"exact match before: {spread([r['before'] for r in rows])}")
    print(f"last logged train loss: {spread([r['loss_last'] for r in rows])}")
    print(f"wall seconds per run (process start to exit): {spread([r['wall_s'] for r in rows])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
