"""How fast the recommender answers: plans per second in-process, and the CLI's cold start.

    .venv/bin/python benchmarks/recommend_speed.py [--repeat 200]

Prints recommendations per second over a grid of catalog models x GPUs x methods, then the wall time of
`finetune-helper recommend` / `estimate` / `export` in fresh processes next to `python -c pass` (the floor), and
whether torch or transformers got imported (they must not be).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import finetune_helper as fh

MODELS = ["Qwen/Qwen2.5-0.5B", "meta-llama/Llama-3.2-3B", "meta-llama/Llama-3.1-8B", "Qwen/Qwen2.5-72B",
          "google/gemma-2-9b"]
GPUS = ["T4", "RTX 4090", "A100 80GB", "H100"]
METHODS = ["full", "lora", "qlora"]


def in_process(repeat: int) -> None:
    specs = [fh.resolve_model(m) for m in MODELS]
    gpus = [fh.resolve_gpu(g) for g in GPUS]
    grid = [(s, g, m) for s in specs for g in gpus for m in METHODS]
    extra: dict = {}
    t0 = time.perf_counter()
    n = 0
    while n < repeat:
        for spec, gpu, method in grid:
            fh.recommend(spec, gpu, method=method, **extra.get(spec.name, {}))
            n += 1
    dt = time.perf_counter() - t0
    print(f"in-process: {n} recommendations in {dt:.2f} s = {n / dt:.0f} per second "
          f"({dt / n * 1e3:.1f} ms each; grid of {len(grid)} model x GPU x method)")


def cold(cmd: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=240)
    ap.add_argument("--runs", type=int, default=5, help="cold starts per command (median reported)")
    args = ap.parse_args()
    in_process(args.repeat)
    py = sys.executable
    floor = cold([py, "-c", "pass"], args.runs)
    print(f"\ncold start, median of {args.runs} (2-core machine):")
    print(f"  {'python -c pass':72s} {floor * 1e3:7.0f} ms")
    commands = {
        "recommend --model llama-3.1-8b --gpu a100-80gb --method lora":
            ["recommend", "--model", "llama-3.1-8b", "--gpu", "a100-80gb", "--method", "lora"],
        "estimate --model qwen2.5-7b --method qlora --json":
            ["estimate", "--model", "qwen2.5-7b", "--method", "qlora", "--json"],
        "export --model qwen2.5-0.5b --gpu 24GB --format yaml":
            ["export", "--model", "qwen2.5-0.5b", "--gpu", "24GB", "--format", "yaml"],
    }
    for label, argv in commands.items():
        t = cold([py, "-m", "finetune_helper", *argv], args.runs)
        print(f"  {'finetune-helper ' + label:72s} {t * 1e3:7.0f} ms  (+{(t - floor) * 1e3:.0f} ms over python)")
    t = cold([py, "-c", "import torch"], max(1, args.runs // 2))
    label = 'python -c "import torch" (for scale)'
    print(f"  {label:72s} {t * 1e3:7.0f} ms")


if __name__ == "__main__":
    main()
