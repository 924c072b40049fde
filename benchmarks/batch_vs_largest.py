"""The planner's batch against the largest batch whose tracked peak fits the same budget (real-size, fake tensors).

For each configuration the planner is asked for a plan (``fh.recommend``); its option (checkpointing, optimizer,
weight storage) is kept and the micro-batch is searched twice under the plan's budget (GPU memory minus the safety
margin):

* estimated: the largest batch whose estimate fits -- what the planner proposes when nothing caps it;
* tracked: the largest batch whose tracked peak fits, found by bisection over fake-tensor traces of the runner's step
  (``finetune_helper.measure.replica``, two optimizer steps each, no weights in memory).

Both sides use the kernels that can be traced here (TRL's torch fallback head, CPU SDPA): the estimate is asked for
``device="cpu"`` (no CUDA context or fragmentation on either side).  The target is estimated >= 90% of tracked,
and never above it (a batch above the tracked one would run out of memory).  The ``plan`` column is the
per-device batch the plan prints for the GPU (CUDA kernels, its own target effective batch): the largest that fits,
or the fewest micro-steps of it each as small as that count allows.

    .venv/bin/python benchmarks/batch_vs_largest.py              # the grid (about 10 minutes on 2 cores)
    .venv/bin/python benchmarks/batch_vs_largest.py --only qwen
"""

from __future__ import annotations

import argparse
import dataclasses
import time
import warnings

from finetune_helper.recommender.plan import MAX_MICRO_BATCH

#: (model, GPU, method, seq, gradient checkpointing: None lets the planner decide): real-size catalog models on GPUs
#: where the largest batch is well above 1 and below the cap
CONFIGS = [
    ("meta-llama/Llama-3.1-8B", "a100-40gb", "lora", 2048, True),
    ("meta-llama/Llama-3.1-8B", "l40s", "lora", 512, None),
    ("Qwen/Qwen2.5-7B", "h100-80gb", "lora", 4096, True),
    ("mistralai/Mistral-7B-v0.1", "a100-80gb", "lora", 8192, True),
    ("google/gemma-2-9b", "h100-80gb", "lora", 2048, True),
    ("microsoft/Phi-3-mini-4k-instruct", "a100-80gb", "full", 2048, True),
    ("Qwen/Qwen2.5-1.5B", "rtx-4090", "full", 1024, True),
    ("meta-llama/Llama-3.2-1B", "a10g", "full", 2048, True),
    ("Qwen/Qwen2.5-0.5B", "a10g", "full", 1024, None),
    # without checkpointing: with it the largest batch passes the cap (the planner turns it on when it raises the
    # micro-batch, issue 13)
    ("meta-llama/Llama-3.2-1B", "h100-80gb", "lora", 1024, False),
]
#: the target effective batch is the planner's largest micro-batch, so that it does not cap the micro-batch
TARGET = MAX_MICRO_BATCH


def run(model: str, gpu: str, method: str, seq: int, gc: bool | None) -> dict:
    import finetune_helper as fh
    from finetune_helper.measure.replica import measure_replica
    from finetune_helper.recommender.catalog import find_model
    from finetune_helper.recommender.memory import estimate_memory
    from finetune_helper.recommender.plan import largest_fitting

    plan = fh.recommend(model, gpu, method=method, seq_len=seq, target_effective_batch=TARGET,
                        gradient_checkpointing=gc)
    req = plan.request
    budget = req.budget_bytes
    config = dict(find_model(model)["config"])

    def setup(b: int):
        return dataclasses.replace(plan.setup, micro_batch_size=b, device="cpu", padded=False)

    est_batch = largest_fitting(lambda b: estimate_memory(req.model, setup(b)).total_bytes <= budget, TARGET)
    traces = {}

    def tracked_fits(b: int) -> bool:
        t0 = time.time()
        traces[b] = max(measure_replica(config, setup(b), steps=2, fake=True))
        print(f"    batch {b:3d}: tracked {traces[b] / 2**30:6.2f} GiB ({time.time() - t0:.0f} s)", flush=True)
        return traces[b] <= budget

    # search up to twice the estimated batch: a tracked batch beyond it would mean a large under-use of memory
    tracked_batch = largest_fitting(tracked_fits, max(2 * est_batch, 2))
    return {"plan": plan.per_device_train_batch_size, "gc": plan.gradient_checkpointing, "optim": plan.optim,
            "weights": plan.weights_dtype, "budget": budget, "estimated": est_batch, "tracked": tracked_batch}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    rows = []
    for model, gpu, method, seq, gc in CONFIGS:
        name = f"{model} {gpu} {method} {seq}"
        if args.only.lower() not in name.lower():
            continue
        print(name, flush=True)
        rows.append((name, run(model, gpu, method, seq, gc)))
    print(f"\n{'configuration':58} {'option':28} {'budget':>8} {'plan':>4} {'est.':>4} {'tracked':>7} {'ratio':>6}")
    ratios = []
    for name, r in rows:
        option = f"{'gc' if r['gc'] else 'no gc'}, {r['optim']}" + (f", {r['weights']}" if r["weights"] else "")
        ratio = r["estimated"] / r["tracked"] if r["tracked"] else float("nan")
        ratios.append(ratio)
        print(f"{name:58} {option:28} {r['budget'] / 2**30:6.1f} G {r['plan']:4d} {r['estimated']:4d} "
              f"{r['tracked']:7d} {ratio:6.2f}" + ("  ABOVE the tracked largest" if ratio > 1 else ""))
    if ratios:
        print(f"\n{len(ratios)} configurations; estimated / tracked largest batch: min {min(ratios):.2f}, "
              f"max {max(ratios):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
