"""The planner's rules over a grid of catalog models x GPUs x methods on small data: enough optimizer steps, warmup
in 5-10% (or raised to 10 steps, said so), and how often the micro-batch is the largest that fits up to the target
(issue 13 item 3).

    .venv/bin/python benchmarks/plan_rules.py                # 300 examples x 3 epochs, about 30 s
    .venv/bin/python benchmarks/plan_rules.py --examples 5000 --epochs 1
"""

from __future__ import annotations

import argparse
import math

MODELS = ["meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.1-8B", "Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-7B",
          "mistralai/Mistral-7B-v0.1", "google/gemma-2-2b", "google/gemma-2-9b", "microsoft/Phi-3-mini-4k-instruct"]
GPUS = ["RTX 4090", "A100 80GB", "L4"]
METHODS = ["full", "lora", "qlora"]


def main() -> None:
    import finetune_helper as fh
    from finetune_helper.recommender.plan import MAX_MICRO_BATCH, _largest_batch, _Option
    from finetune_helper.recommender.rules import MIN_STEPS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=300)
    parser.add_argument("--epochs", type=float, default=3)
    args = parser.parse_args()
    rows, enough, warm_ok, raised, largest, fitting, evened, for_batch = [], 0, 0, 0, 0, 0, 0, 0
    for model in MODELS:
        for gpu in GPUS:
            for method in METHODS:
                plan = fh.recommend(model, gpu=gpu, method=method, dataset_size=args.examples, epochs=args.epochs)
                if not plan.fits:
                    rows.append((model, gpu, method, "-", "-", "-", "-", "does not fit"))
                    continue
                fitting += 1
                req = plan.request
                # an independent search: the largest batch under the plan's numerics, with or without checkpointing
                cap = max(1, min(math.ceil(req.target_batch / req.gpus), MAX_MICRO_BATCH))
                most = max(_largest_batch(req, _Option(gc, plan.optim, "none", plan.weights_dtype), cap)
                           for gc in (False, True))
                micro = plan.per_device_train_batch_size
                per_gpu = math.ceil(req.target_batch / req.gpus)
                even = math.ceil(per_gpu / math.ceil(per_gpu / most))  # same micro-steps, less overshoot
                largest += micro == most
                evened += micro == even < most
                for_batch += plan.reasons["gradient_checkpointing"].startswith("on: raises the micro-batch")
                enough += plan.total_steps >= 0.9 * MIN_STEPS or "fewer than" in plan.reasons["total_steps"]
                in_range = 0.05 <= plan.warmup_ratio <= 0.10
                warm_ok += in_range or "raised to 10 warmup steps" in plan.reasons["warmup_ratio"]
                raised += not in_range
                rows.append((model, gpu, method, str(micro), str(most),
                             str(plan.effective_batch_size), str(plan.total_steps), f"{plan.warmup_ratio:.1%}"))
    print(f"{'model':34s} {'gpu':10s} {'method':6s} {'micro':>5s} {'fits':>5s} {'eff':>4s} {'steps':>5s} warmup")
    for r in rows:
        print(f"{r[0]:34s} {r[1]:10s} {r[2]:6s} {r[3]:>5s} {r[4]:>5s} {r[5]:>4s} {r[6]:>5s} {r[7]}")
    print(f"\n{len(rows)} plans for {args.examples} examples x {args.epochs:g} epochs, {fitting} fit:")
    print(f"  at least ~{MIN_STEPS} optimizer steps, or the shortfall said: {enough} of {fitting}")
    print(f"  warmup in [5%, 10%], or raised to 10 steps and said: {warm_ok} of {fitting} ({raised} raised)")
    print(f"  micro-batch = the largest that fits (with checkpointing if it allows more) up to the target: "
          f"{largest + evened} of {fitting} ({evened} of them as the fewest micro-steps of the largest allow, "
          "each as small as that count allows: 2 x 32 for a target of 64 when 38 fit)")
    print(f"  checkpointing on although batch 1 fits without it (it raises the micro-batch toward the target): "
          f"{for_batch} of {fitting}")

if __name__ == "__main__":
    main()
