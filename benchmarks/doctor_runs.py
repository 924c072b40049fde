"""The doctor on real runs of the tiny model and on synthetic curves: how often does it call a run what it is not?

1. Real runs: one for each failure mode and a healthy one, trained here with ``finetune-helper run
   recipes/tiny-demo.yaml`` (``seed=S``, ``OMP_NUM_THREADS=T``), then read by ``finetune-helper doctor``.  The
   false-label rate is the share of runs labelled other than what they are.
2. Synthetic curves (pure Python, seeded): 50 noisy healthy runs, to count false labels on runs with nothing wrong,
   and 50 of each failure mode, to show the rules still see them (a doctor that says "healthy" to everything has no
   false labels on healthy runs).  How they are made: :func:`healthy_curve` and the functions after it.

    .venv/bin/python benchmarks/doctor_runs.py                  # the four runs (the recipe's seed) and the curves
    .venv/bin/python benchmarks/doctor_runs.py --seeds 0 1 2 3 4 --threads 1 2    # 40 runs: the labels' spread
    .venv/bin/python benchmarks/doctor_runs.py --json           # the same as JSON (the tests read it)
    .venv/bin/python benchmarks/doctor_runs.py --synthetic      # the curves only (a second)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: the package is the checkout's

from finetune_helper.train.doctor import diagnose  # noqa: E402

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
#: synthetic curves of each kind
CURVES = 50


def run_one(workdir: Path, scenario: tuple[str, str, list[str]], seed: int | None, threads: int | None) -> dict:
    """One real run of ``scenario`` and the doctor's verdict on it."""
    what, expected, overrides = scenario
    run_dir = workdir / f"{expected}-s{seed}-t{threads}"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.time()
    ran = subprocess.run([sys.executable, "-m", "finetune_helper", "run", str(TINY), "--output-dir", str(run_dir),
                          *overrides, *([f"seed={seed}"] if seed is not None else [])],
                         capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    seconds = time.time() - t0
    doc = subprocess.run([sys.executable, "-m", "finetune_helper", "doctor", str(run_dir), "--json"],
                         capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    found = json.loads(doc.stdout) if doc.returncode == 0 else {"diagnosis": "error", "evidence": doc.stderr}
    return {"run": what, "expected": expected, "seed": seed, "threads": threads, "exit_code": ran.returncode,
            "seconds": round(seconds, 1), "run_dir": str(run_dir), **found}


# ------------------------------------------------------------------------------------------- synthetic curves
def _trend(rng: random.Random, n: int) -> tuple[float, float, float]:
    """A falling loss ``floor + amp * exp(-i / tau)`` over ``n`` logs: (floor, amp, tau); the shortest time constants
    reach the floor in a fifth of the run, so that the eval loss sits on a plateau for many evaluations."""
    floor = rng.uniform(0.2, 1.5)
    return floor, floor * rng.uniform(0.5, 5.0), n * rng.uniform(0.04, 0.5)


def _records(rng: random.Random, train: list[float], evals: list[float], every: int, *, start: float,
             grads: list[float] | None = None, vocab: int | None = None) -> list[dict]:
    """metrics.jsonl records: a train log every ``every`` steps, the evaluations evenly spaced, the step-0 record
    (the vocabulary one of the tiny model's, Llama 2's and Llama 3's unless given)."""
    vocab = vocab or rng.choice([512, 32000, 128256])
    records = [{"step": 0, "start_loss": start, "uniform_loss": math.log(vocab), "vocab_size": vocab}]
    records += [{"step": every * (i + 1), "loss": loss, "learning_rate": 1e-4,
                 "grad_norm": grads[i] if grads else rng.lognormvariate(0, 0.3)} for i, loss in enumerate(train)]
    steps = every * len(train)
    records += [{"step": round(steps * (j + 1) / len(evals)), "eval_loss": e} for j, e in enumerate(evals)]
    return sorted(records, key=lambda r: (r["step"], "eval_loss" in r))


def _noisy(rng: random.Random, values: list[float], noise: float, *, spike: bool) -> list[float]:
    """``values`` times uniform noise of +-``noise`` (one batch per log at 0.6: logging_steps=1, small batches), and
    with ``spike`` one bad batch at 3-4x."""
    out = [v * (1 + noise * (2 * rng.random() - 1)) for v in values]
    if spike:
        i = rng.randrange(len(out) // 4, len(out))
        out[i] *= rng.uniform(3, 4)
    return out


def _setting(rng: random.Random) -> tuple[int, int, int, float, float, float]:
    """logs, logging_steps, evaluations, train noise, eval noise (a normal's sigma, as a fraction), train/eval gap."""
    return (rng.randint(30, 300), rng.choice([1, 5, 10]), rng.randint(4, 16), rng.uniform(0.02, 0.6),
            rng.uniform(0.002, 0.02), rng.uniform(1.0, 1.3))


def healthy_curve(rng: random.Random) -> list[dict]:
    """A healthy run: the train loss falls as ``floor + amp * exp(-i / tau)`` with noise (2-60% per log, one bad
    batch in a third of the runs; the loss before training is one step's, noisier by sqrt(logging_steps), at most
    60%); the eval loss follows the same trend times a constant gap (1.0-1.3), with normal
    noise of 0.2-2% per evaluation (the issue's 1.508 -> 1.512 -> 1.525 -> 1.541 is within it)."""
    n, every, k, noise, eval_noise, gap = _setting(rng)
    floor, amp, tau = _trend(rng, n)
    trend = [floor + amp * math.exp(-i / tau) for i in range(n)]
    train = _noisy(rng, trend, noise, spike=rng.random() < 1 / 3)
    evals = [gap * trend[min(n - 1, round(n * (j + 1) / k) - 1)] * (1 + rng.gauss(0, eval_noise)) for j in range(k)]
    step_noise = min(0.6, noise * math.sqrt(every))  # the start is one step's loss; a log averages ``every`` steps
    return _records(rng, train, evals, every, start=trend[0] * (1 + step_noise * (2 * rng.random() - 1)))


def overfitting_curve(rng: random.Random) -> list[dict]:
    """The train loss keeps falling (to a floor of 0.05-0.3) while the eval loss, after following it for 30-70% of
    the run, stays flat or rises by up to 30% by the end."""
    n, every, k, noise, eval_noise, gap = _setting(rng)
    floor, amp, tau = rng.uniform(0.05, 0.3), rng.uniform(1.0, 5.0), n * rng.uniform(0.2, 0.5)
    trend = [floor + amp * math.exp(-i / tau) for i in range(n)]
    turn, rise = rng.uniform(0.3, 0.7), rng.uniform(0.0, 0.3)
    at = [min(n - 1, round(n * (j + 1) / k) - 1) for j in range(k)]
    knee = trend[round(turn * (n - 1))]
    evals = [gap * (trend[i] if i < turn * n else knee * (1 + rise * (i - turn * n) / ((1 - turn) * n)))
             * (1 + rng.gauss(0, eval_noise)) for i in at]
    return _records(rng, _noisy(rng, trend, noise, spike=False), evals, every, start=trend[0])


def unstable_curve(rng: random.Random) -> list[dict]:
    """The train loss falls for 20-60% of the run, then climbs to 1.5-3x its lowest by the end (the LR too high for
    the later steps); it never leaves 2x the start, so only the rise rule can see it."""
    n, every, k, noise, eval_noise, gap = _setting(rng)
    floor, amp, tau = _trend(rng, n)
    turn, factor = rng.uniform(0.2, 0.6), rng.uniform(1.5, 3.0)
    low = floor + amp * math.exp(-turn * n / tau)
    trend = [floor + amp * math.exp(-i / tau) if i < turn * n else
             low * (1 + (factor - 1) * (i - turn * n) / ((1 - turn) * n)) for i in range(n)]
    trend = [min(t, 1.9 * trend[0]) for t in trend]
    noise = min(noise, 0.3)
    evals = [gap * trend[min(n - 1, round(n * (j + 1) / k) - 1)] for j in range(k)]
    return _records(rng, _noisy(rng, trend, noise, spike=False), evals, every, start=trend[0])


def stuck_curve(rng: random.Random) -> list[dict]:
    """A flat loss with noise: the learning rate far too low."""
    n, every, k, noise, eval_noise, gap = _setting(rng)
    level = rng.uniform(0.5, 10.0)
    evals = [gap * level * (1 + rng.gauss(0, eval_noise)) for _ in range(k)]
    return _records(rng, _noisy(rng, [level] * n, min(noise, 0.3), spike=False), evals, every, start=level)


def collapsed_curve(rng: random.Random) -> list[dict]:
    """The issue's LR-50 run: a blow-up over the first logs (67,219 at step 2, 2.2M at step 4 from 10.2), then the
    loss at exactly ln(V) with a gradient norm of 0 -- or, without the blow-up, a collapse to ln(V) alone."""
    n, every, k, noise, eval_noise, gap = _setting(rng)
    vocab = rng.choice([512, 32000, 128256])
    start = rng.uniform(1.0, 0.7 * math.log(vocab))
    blow = [start, 67219.0, 1.0e6, 2.2e6, 1.0e3] if rng.random() < 0.5 else [start * 1.1] * 5
    train = blow + [math.log(vocab)] * (n - len(blow))
    grads = [rng.uniform(1, 100) for _ in blow] + [0.0] * (n - len(blow))
    return _records(rng, train, [math.log(vocab)] * k, every, start=start, grads=grads, vocab=vocab)


KINDS = {"healthy": healthy_curve, "overfitting": overfitting_curve, "diverged": unstable_curve,
         "stuck": stuck_curve, "diverged (collapse)": collapsed_curve}


def synthetic(curves: int = CURVES, seed: int = 0) -> dict[str, dict]:
    """For each kind of curve: how many of ``curves`` the doctor labels as what they are, and its labels."""
    out = {}
    for kind, make in KINDS.items():
        rng = random.Random(f"{seed}-{kind}")
        labels = Counter(diagnose(make(rng)).diagnosis for _ in range(curves))
        right = labels[kind.split()[0]]
        out[kind] = {"curves": curves, "right": right, "wrong": curves - right, "labels": dict(labels)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--synthetic", action="store_true", help="the synthetic curves only, no real runs")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seed=S overrides (default: the recipe's)")
    parser.add_argument("--threads", type=int, nargs="+", default=None, help="OMP_NUM_THREADS values")
    parser.add_argument("--keep", action="store_true", help="keep the run folders (printed)")
    args = parser.parse_args(argv)
    curves = synthetic()
    runs: list[dict] = []
    if not args.synthetic:
        tmp = Path(tempfile.mkdtemp(prefix="doctor-runs-"))
        try:
            for threads in args.threads or [None]:
                for seed in args.seeds or [None]:
                    for scenario in SCENARIOS:
                        runs.append(run_one(tmp, scenario, seed, threads))
                        if not args.json:
                            _print_run(runs[-1])
        finally:
            if args.keep:
                print(f"run folders: {tmp}", file=sys.stderr)
            else:
                shutil.rmtree(tmp, ignore_errors=True)
    wrong = sum(r["diagnosis"] != r["expected"] for r in runs)
    healthy = curves["healthy"]
    rates = {"synthetic_healthy": healthy["wrong"] / healthy["curves"],
             "real_runs": wrong / len(runs) if runs else None}
    if args.json:
        print(json.dumps({"runs": runs, "synthetic": curves, "false_label_rate": rates}))
        return 0
    print(f"\nsynthetic curves ({CURVES} of each kind; how they are made: this file's *_curve functions)")
    for kind, c in curves.items():
        print(f"  {kind:20s} labelled so: {c['right']:3d} / {c['curves']}   labels: {c['labels']}")
    print(f"\nfalse-label rate: {rates['synthetic_healthy']:.0%} of {healthy['curves']} noisy healthy curves"
          + (f"; {rates['real_runs']:.0%} of {len(runs)} real runs ({wrong} mislabelled)" if runs else ""))
    return 0


def _print_run(r: dict) -> None:
    mark = "" if r["diagnosis"] == r["expected"] else f"  (expected {r['expected']})"
    where = f"seed {r['seed']}, {r['threads']} thr" if r["seed"] is not None or r["threads"] else "recipe seed"
    print(f"{r['run']:46s} {where:16s} exit {r['exit_code']:3d} {r['diagnosis']:12s} {r['evidence']}{mark}",
          flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
