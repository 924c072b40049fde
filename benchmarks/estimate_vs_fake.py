"""The memory estimate against the tracked peak of real-size steps under fake tensors (no weights in memory).

``finetune_helper.measure.replica`` replays the runner's training step (TRL's fused LM head, PEFT, the Trainer's
optimizer, autocast, clipping) on a catalog model built on the meta device and turned into fake tensors; the
live-bytes tracker follows every op of two optimizer steps.  The replica matches the runner's own steps on tiny
models (``tests/measure/test_replica.py``).  What is traced is the CPU path of the kernels (TRL's torch fallback,
CPU SDPA): the estimate is asked for ``device="cpu"``.  The CUDA path needs a GPU (``benchmarks/gpu_check.sh``).

    .venv/bin/python benchmarks/estimate_vs_fake.py              # the grid (about 5 minutes)
    .venv/bin/python benchmarks/estimate_vs_fake.py --only qwen
"""

from __future__ import annotations

import argparse
import itertools
import time
import warnings

MODELS = ["meta-llama/Llama-3.1-8B", "Qwen/Qwen2.5-7B", "mistralai/Mistral-7B-v0.1", "google/gemma-2-9b",
          "microsoft/Phi-3-mini-4k-instruct"]
#: (method, gradient checkpointing)
METHODS = [("full", True), ("lora", True), ("lora", False)]
SEQS = [2048, 8192]


def run(model: str, method: str, gc: bool, seq: int) -> tuple[int, int, str, float]:
    from finetune_helper.measure.replica import measure_replica
    from finetune_helper.recommender.catalog import find_model
    from finetune_helper.recommender.memory import estimate_memory
    from finetune_helper.recommender.model import ModelSpec
    from finetune_helper.recommender.training_setup import TrainingSetup

    entry = find_model(model)
    spec = ModelSpec.from_config(entry["config"], name=entry["id"])
    setup = TrainingSetup(method=method, micro_batch_size=1, seq_len=min(seq, spec.max_position_embeddings),
                          dtype="bf16", optim="adamw_torch_fused", gradient_checkpointing=gc,
                          attn_implementation=spec.default_attn_implementation, device="cpu", padded=False)
    t0 = time.time()
    tracked = max(measure_replica(dict(entry["config"]), setup, steps=2, fake=True))
    est = estimate_memory(spec, setup)
    return tracked, est.allocated_peak, est.peak_phase, time.time() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    errors = []
    print(f"{'model':36} {'method':10} {'seq':>5} {'tracked GiB':>11} {'estimate GiB':>12} {'error':>7}  phase")
    for model, (method, gc), seq in itertools.product(MODELS, METHODS, SEQS):
        name = f"{model} {method}{'+gc' if gc else ''} {seq}"
        if args.only.lower() not in name.lower():
            continue
        tracked, est, phase, seconds = run(model, method, gc, seq)
        err = (est - tracked) / tracked
        errors.append((abs(err), name, err))
        print(f"{model:36} {method + ('+gc' if gc else ''):10} {seq:>5} {tracked / 2**30:11.2f} {est / 2**30:12.2f} "
              f"{err:+7.1%}  {phase} ({seconds:.0f} s)", flush=True)
    if errors:
        worst = max(errors)
        print(f"\n{len(errors)} configurations; worst error {worst[2]:+.1%} ({worst[1]}); "
              f"mean |error| {sum(e[0] for e in errors) / len(errors):.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
