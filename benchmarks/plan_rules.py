"""The planner's rules over a grid of catalog models x GPUs x methods x 1 or 8 GPUs on small data: enough optimizer
steps, warmup in 5-10% (or raised to 10 steps, said so), and the setting chosen by predicted time (issue 21 item 4):
an independent search over every micro-batch that fits, with and without checkpointing, and on 8 GPUs under each of
DDP, FSDP, ZeRO-2 and ZeRO-3 (``--strategy auto``; ZeRO only with fp32 master weights and 32-bit AdamW states, as
PlanRequest requires), finds none predicted faster than the plan's, and checkpointing is on only where it makes the
run faster or batch 1 needs it.

    .venv/bin/python benchmarks/plan_rules.py                # 300 examples x 3 epochs, about a minute
    .venv/bin/python benchmarks/plan_rules.py --examples 5000 --epochs 1
"""

from __future__ import annotations

import argparse
import itertools
import math

MODELS = ["meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.1-8B", "Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-7B",
          "mistralai/Mistral-7B-v0.1", "google/gemma-2-2b", "google/gemma-2-9b", "microsoft/Phi-3-mini-4k-instruct"]
GPUS = ["RTX 4090", "A100 80GB", "L4"]
METHODS = ["full", "lora", "qlora"]
GPU_COUNTS = [1, 8]


def main() -> None:
    import finetune_helper as fh
    from finetune_helper.recommender.plan import MAX_MICRO_BATCH, _largest_batch, _Option, time_setting
    from finetune_helper.recommender.rules import MIN_STEPS
    from finetune_helper.recommender.throughput import constants

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=300)
    parser.add_argument("--epochs", type=float, default=3)
    args = parser.parse_args()
    rows, enough, warm_ok, raised, largest, fitting = [], 0, 0, 0, 0, 0
    gc_needed = gc_faster = gc_wrong = 0
    chosen: dict[str, int] = {}
    min_tokens = constants()["min_tokens_per_micro_step"]
    for model, gpu, method, gpus in itertools.product(MODELS, GPUS, METHODS, GPU_COUNTS):
        plan = fh.recommend(model, gpu=gpu, gpus=gpus, method=method, dataset_size=args.examples, epochs=args.epochs)
        where = f"{gpus}x {gpu}"
        if not plan.fits:
            rows.append((model, where, method, "-", "-", "-", "-", "does not fit", "-"))
            continue
        fitting += 1
        req = plan.request
        # an independent search: every micro-batch that fits under the plan's numerics, with and without
        # checkpointing (not only the evened ones the planner times), on several GPUs under every
        # data-parallel mode, each timed by the planner's own time_setting
        cap = max(1, min(math.ceil(req.target_batch / req.gpus), MAX_MICRO_BATCH))
        zero_ok = plan.weights_dtype is None and plan.optim in ("adamw_torch", "adamw_torch_fused")
        shards = ["none"] if gpus == 1 else ["ddp", "fsdp"] + (["zero2", "zero3"] if zero_ok else [])
        alternatives = {}
        most = 0
        for shard in shards:
            for gc in (False, True):
                option = _Option(gc, plan.optim, shard, plan.weights_dtype)
                fit = _largest_batch(req, option, cap)
                most = max(most, fit)
                micros = [m for m in range(1, fit + 1) if m * req.resolved_seq_len >= min_tokens] or \
                    ([fit] if fit else [])
                alternatives[shard, gc] = [(time_setting(req, option, m).seconds, m) for m in micros]
        best_of = {key: min(times) if times else None for key, times in alternatives.items()}
        best = {gc: min((t for (_, g), t in best_of.items() if g == gc and t), default=None)
                for gc in (False, True)}
        fastest = min(t for t in best.values() if t)
        chosen[plan.option.shard] = chosen.get(plan.option.shard, 0) + 1
        micro = plan.per_device_train_batch_size
        largest += plan.run_seconds <= fastest[0] * (1 + 5e-3)  # the planner's 3 significant digits
        gc_needed += plan.gradient_checkpointing and best[False] is None
        gc_faster += plan.gradient_checkpointing and best[False] is not None
        gc_wrong += plan.gradient_checkpointing and best[False] is not None and best[False][0] < best[True][0] \
            * (1 - 5e-3)
        enough += plan.total_steps >= 0.9 * MIN_STEPS or "fewer than" in plan.reasons["total_steps"]
        in_range = 0.05 <= plan.warmup_ratio <= 0.10
        warm_ok += in_range or "raised to 10 warmup steps" in plan.reasons["warmup_ratio"]
        raised += not in_range
        rows.append((model, where, method, str(micro) + ("+gc" if plan.gradient_checkpointing else ""), str(most),
                     str(plan.effective_batch_size), str(plan.total_steps), f"{plan.warmup_ratio:.1%}",
                     plan.option.shard))
    print(f"{'model':34s} {'gpus':13s} {'method':6s} {'micro':>5s} {'fits':>5s} {'eff':>4s} {'steps':>5s} "
          f"{'warmup':>7s} sharding")
    for r in rows:
        print(f"{r[0]:34s} {r[1]:13s} {r[2]:6s} {r[3]:>5s} {r[4]:>5s} {r[5]:>4s} {r[6]:>5s} {r[7]:>7s} {r[8]}")
    print(f"\n{len(rows)} plans for {args.examples} examples x {args.epochs:g} epochs, {fitting} fit:")
    print(f"  at least ~{MIN_STEPS} optimizer steps, or the shortfall said: {enough} of {fitting}")
    print(f"  warmup in [5%, 10%], or raised to 10 steps and said: {warm_ok} of {fitting} ({raised} raised)")
    print(f"  the plan's predicted run is the fastest of every fitting micro-batch with and without checkpointing, "
          f"on 8 GPUs under each data-parallel mode (micro-steps of at least {min_tokens} tokens where one fits): "
          f"{largest} of {fitting}")
    print("  data-parallel mode chosen: " + ", ".join(f"{k} {v}" for k, v in sorted(chosen.items())))
    print(f"  checkpointing on: {gc_needed + gc_faster} of {fitting} ({gc_needed} to fit batch 1, {gc_faster} for a "
          f"faster run); on although off was predicted faster: {gc_wrong}")



if __name__ == "__main__":
    main()
