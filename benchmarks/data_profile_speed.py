"""How long `recommend --data` takes on 100k examples, and how far its sampled figures are from the full computation.

    .venv/bin/python benchmarks/data_profile_speed.py [--examples 100000] [--sample 10000] [--format alpaca] [--full]
    .venv/bin/python benchmarks/data_profile_speed.py --write data.jsonl   # only the data, for trying it by hand

Writes a .jsonl of generated examples of varied length (addition problems followed by a skewed run of digits, which
the tiny tokenizer splits one token per digit: about 20 to 300 tokens), then runs
`finetune-helper recommend --model finetune_helper/train/tiny-base --gpu 24GB --data FILE --json` in a fresh process
with an empty `datasets` cache (so reading the file into Arrow is counted) and again with the cache filled, and prints
the wall times (the target: under 30 s on 2 cores) and the figures with their stated sampling error.  With `--full`
it also profiles every example (`--data-sample 0`, at the sampled run's max_length) and prints how far each sampled
figure is from the full one, in units of its stated error.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from finetune_helper.train.data_profile import Z95  # noqa: E402
from finetune_helper.train.tiny import base_model_dir, format_example  # noqa: E402


def write_data(path: Path, n: int, fmt: str, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(n):
            a, b = rng.randrange(10, 100), rng.randrange(10, 100)
            filler = "".join(str(rng.randrange(10)) for _ in range(int(rng.expovariate(1 / 40))))
            f.write(json.dumps(format_example(f"What is {a} + {b}? {filler}".strip(), str(a + b), fmt=fmt)) + "\n")


def recommend(data: Path, cache: Path, sample: int, *extra: str) -> tuple[float, dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(cache),
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "finetune_helper", "recommend", "--model", str(base_model_dir()), "--gpu", "24GB",
           "--data", str(data), "--data-sample", str(sample), "--json", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(proc.stderr)
    return seconds, json.loads(proc.stdout)


def show(seconds: dict[str, float], plan: dict) -> None:
    d = plan["data"]
    print(f"{d['examples']:,} examples ({d['format']}), {d['sample_size']:,} tokenized (sampled: {d['sampled']})")
    for what, s in seconds.items():
        print(f"  recommend --data, {what}: {s:.1f} s")
    t, b = d["tokens"], d["percentile_bounds_95"]
    print("  tokens: " + ", ".join(f"{k} {t[k]} (95% bounds {b[k][0]}-{b[k][1]})" for k in ("p50", "p90", "p99"))
          + f", max {t['max']}")
    print(f"  max_length {d['max_length']} ({d['max_length_source']}): truncated {d['truncated_share']:.2%} "
          f"+- {Z95 * d['truncated_share_se']:.2%}, dropped by TRL {d['dropped_share']:.2%} "
          f"+- {Z95 * d['dropped_share_se']:.2%}")
    p = d["padding"]
    print(f"  padding at micro-batch {p['batch']}: {p['waste']:.2%} +- {Z95 * p['waste_se']:.2%}")
    k = d["packing"]
    print(f"  packed rows at {k['max_length']}: {k['rows']:,} +- {Z95 * k['rows_se']:,.0f}; pays: {k['pays']}")
    print(f"  plan: seq_len {plan['seq_len']}, micro-batch {plan['per_device_train_batch_size']}, "
          f"{plan['total_steps']} steps")


def compare(est: dict, full: dict) -> None:
    """Each sampled figure's distance from the full computation, in units of its stated standard error."""
    e, f = est["data"], full["data"]
    print("sampled vs every example:")
    for k in ("p50", "p90", "p99"):
        low, high = e["percentile_bounds_95"][k]
        inside = low <= f["tokens"][k] <= high
        print(f"  {k}: {e['tokens'][k]} vs {f['tokens'][k]} ({'within' if inside else 'OUTSIDE'} the 95% bounds "
              f"{low}-{high})")
    rows = [("truncated share", e["truncated_share"], f["truncated_share"], e["truncated_share_se"]),
            ("dropped share", e["dropped_share"], f["dropped_share"], e["dropped_share_se"]),
            ("packed rows", e["packing"]["rows"], f["packing"]["rows"], e["packing"]["rows_se"])]
    if e["padding"]["batch"] == f["padding"]["batch"]:
        se = (e["padding"]["waste_se"] ** 2 + f["padding"]["waste_se"] ** 2) ** 0.5  # two random orders
        rows.append(("padding waste", e["padding"]["waste"], f["padding"]["waste"], se))
    for name, a, b, se in rows:
        z = abs(a - b) / se if se else float("inf") if a != b else 0.0
        print(f"  {name}: {a:.6g} vs {b:.6g}: {z:.2f} standard errors ({'within' if z <= Z95 else 'OUTSIDE'} 95%)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=100_000)
    ap.add_argument("--sample", type=int, default=10_000, help="--data-sample (default: %(default)s)")
    ap.add_argument("--format", default="alpaca", choices=("alpaca", "messages", "text", "prompt_completion"))
    ap.add_argument("--full", action="store_true", help="also profile every example and compare")
    ap.add_argument("--write", metavar="PATH", help="only write the generated data to PATH (a .jsonl) and exit")
    args = ap.parse_args()
    if args.write:
        write_data(Path(args.write), args.examples, args.format)
        print(f"wrote {args.examples:,} {args.format} examples to {args.write}")
        return
    with tempfile.TemporaryDirectory(prefix="fh-data-speed-") as tmp:
        data = Path(tmp) / "data.jsonl"
        write_data(data, args.examples, args.format)
        cache = Path(tmp) / "datasets-cache"
        cold, plan = recommend(data, cache, args.sample)
        warm, _ = recommend(data, cache, args.sample)
        show({"cold (empty datasets cache, fresh process)": cold, "datasets cache filled": warm}, plan)
        if args.full:  # at the sampled run's max_length, so that the figures are of the same thing
            seconds, full = recommend(data, cache, 0, "--seq-len", str(plan["data"]["max_length"]))
            print(f"every example (--data-sample 0 --seq-len {plan['data']['max_length']}): {seconds:.1f} s")
            compare(plan, full)


if __name__ == "__main__":
    main()
