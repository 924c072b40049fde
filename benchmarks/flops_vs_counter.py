"""The FLOP estimate against ``FlopCounterMode`` over the steps that run, on CPU, over a grid.

Two parts:

* the runner's own steps: ``estimate_vs_runner.py``'s grid (8 architectures, tiny random models x full mixed /
  pure bf16 / fp32, LoRA all linears and q,v, QLoRA, gradient checkpointing, padded and unpadded batches,
  packing), plus ``transformers.Trainer`` and gradient accumulation variants, each three optimizer steps of
  ``measure_recipe(flops=True)`` (``finetune_helper.measure.flops.flop_counter``: torch's counter with the CPU's
  SDPA kernels added); the estimate (``recommender.flops.estimate_flops``) is asked for each micro-batch at the
  shape the collator made, summed over the step;
* real sizes: catalog models under fake tensors (``measure.flops.count_replica_step``: the replica of the runner's
  step, every layer, no weights in memory), full / LoRA, checkpointing, padding, both loss paths.

Error = (estimated - counted) / counted per step; a configuration's is its worst step's.

    .venv/bin/python benchmarks/flops_vs_counter.py                 # both parts (about 8 minutes on 2 cores)
    .venv/bin/python benchmarks/flops_vs_counter.py --only llama    # a subset (substring of the name)
    .venv/bin/python benchmarks/flops_vs_counter.py --part fake     # one part: runner or fake
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from estimate_vs_runner import ARCHS, VARIANTS, recipe_for, write_data  # noqa: E402

#: more variants for the FLOP count: the model's own loss under transformers.Trainer, and accumulation
EXTRA = {
    "transformers-full-gc": ({"type": "full"}, {"bf16": True, "gradient_checkpointing": True}, "padded",
                             "transformers"),
    "lora-accum2": ({"type": "lora", "lora_r": 8}, {"bf16": True, "gradient_accumulation_steps": 2}, "padded",
                    "trl"),
}
#: catalog models at their real sizes, under fake tensors: (model, method, gc, batch, seq, padded, loss)
FAKE = [
    ("meta-llama/Llama-3.1-8B", "full", True, 1, 2048, False, "fused"),
    ("meta-llama/Llama-3.1-8B", "lora", False, 1, 2048, False, "fused"),
    ("meta-llama/Llama-3.1-8B", "lora", True, 2, 1024, True, "logits"),
    ("Qwen/Qwen2.5-7B", "lora", True, 1, 4096, False, "fused"),
    ("Qwen/Qwen2.5-0.5B", "full", False, 4, 1024, True, "fused"),
    ("google/gemma-2-9b", "lora", True, 1, 2048, False, "fused"),
    ("microsoft/Phi-3-mini-4k-instruct", "full", True, 1, 2048, False, "logits"),
    ("mistralai/Mistral-7B-v0.1", "lora", False, 2, 1024, True, "fused"),
    ("meta-llama/Llama-3.2-1B", "full", True, 2, 2048, True, "fused"),
]


def runner_rows(only: str, tmp: Path) -> list[tuple[str, float, float, str]]:
    from finetune_helper.measure.runner_step import measure_recipe
    from finetune_helper.recommender.flops import estimate_flops
    from finetune_helper.recommender.model import ModelSpec
    from finetune_helper.train.recipe import recipe_from_dict
    from finetune_helper.train.setup import executed_setup

    data = write_data(tmp)
    variants = {**{k: (*v, "trl") for k, v in VARIANTS.items()}, **EXTRA}
    rows = []
    for arch in ARCHS:
        for variant, (method, training, kind, trainer) in variants.items():
            name = f"{arch}/{variant}"
            if only not in name:
                continue
            VARIANTS.setdefault(variant, (method, training, kind))
            raw = {**recipe_for(arch, variant, tmp / "models", data), "trainer": trainer}
            recipe = recipe_from_dict(raw)
            try:
                m = measure_recipe(recipe, steps=3, run_dir=tmp / "runs" / name, track=False, flops=True)
            except Exception as exc:  # noqa: BLE001 - reported in the table, the grid goes on
                rows.append((name, 0, 0, f"measurement failed: {type(exc).__name__}: {exc}".splitlines()[0]))
                continue
            spec = ModelSpec.from_config(json.loads((Path(raw["model"]["name"]) / "config.json").read_text()))
            worst = None
            for step in m.steps:
                est = sum(estimate_flops(spec, executed_setup(recipe, spec, m.sft_kwargs, device="cpu",
                                                              batch_shape=shape, padded=padded)).counted
                          for shape, padded in step.batches)
                shapes = "+".join("x".join(map(str, s)) + ("p" if p else "") for s, p in step.batches)
                if worst is None or abs(est - step.flops) / step.flops > abs(worst[1] - worst[0]) / worst[0]:
                    worst = (step.flops, est, shapes)
            rows.append((name, *worst))
            print(f"  measured {name}", file=sys.stderr, flush=True)
    return rows


def fake_rows(only: str) -> list[tuple[str, float, float, str]]:
    from finetune_helper.measure.flops import count_replica_step
    from finetune_helper.recommender.catalog import find_model
    from finetune_helper.recommender.flops import estimate_flops
    from finetune_helper.recommender.model import ModelSpec
    from finetune_helper.recommender.training_setup import TrainingSetup

    rows = []
    for model, method, gc, batch, seq, padded, loss in FAKE:
        name = f"{model} {method}{'+gc' if gc else ''} {loss}"
        if only not in name:
            continue
        config = dict(find_model(model)["config"])
        spec = ModelSpec.from_config(config)
        setup = TrainingSetup(method=method, micro_batch_size=batch, seq_len=seq, gradient_checkpointing=gc,
                              device="cpu", padded=padded, loss=loss,
                              attn_implementation=spec.default_attn_implementation)
        t0 = time.time()
        counted = count_replica_step(config, setup)
        rows.append((name, counted, estimate_flops(spec, setup).counted,
                     f"{batch}x{seq}{'p' if padded else ''} ({time.time() - t0:.0f} s)"))
        print(f"  counted {name}", file=sys.stderr, flush=True)
    return rows


def report(title: str, rows: list[tuple[str, float, float, str]]) -> list[float]:
    print(f"\n{title}\n{'configuration':44} {'counted':>11} {'estimate':>11} {'error':>8}  batch")
    errors = []
    for name, counted, est, note in rows:
        if not counted:
            print(f"{name:44} {note}")
            continue
        err = (est - counted) / counted
        errors.append(err)
        print(f"{name:44} {counted:11.4e} {est:11.4e} {err:+8.3%}  {note}")
    return errors


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="only configurations whose name contains this")
    ap.add_argument("--part", choices=("runner", "fake", "both"), default="both")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    errors = []
    tmp = Path(tempfile.mkdtemp(prefix="flops-vs-counter-"))
    try:
        if args.part in ("runner", "both"):
            errors += report("the runner's steps (tiny models, 3 optimizer steps; worst step)",
                             runner_rows(args.only, tmp))
        if args.part in ("fake", "both"):
            errors += report("real sizes under fake tensors (one optimizer step of the replica)",
                             fake_rows(args.only))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if errors:
        worst = max(errors, key=abs)
        print(f"\n{len(errors)} configurations; worst error {worst:+.3%}; mean |error| "
              f"{sum(map(abs, errors)) / len(errors):.3%}; within 5%: {sum(abs(e) <= 0.05 for e in errors)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
