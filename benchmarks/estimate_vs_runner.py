"""The memory estimate against the measured peak of the runner's own training steps, on CPU, over a grid.

Each configuration is a recipe run through ``finetune_helper.measure.runner_step.measure_recipe``: the runner's
``prepare`` (plan, SFTConfig, data, collator) and ``_trainer`` (model loading, PEFT, quantization), then three real
``SFTTrainer`` optimizer steps under the live-tensor-bytes tracker.  The estimate is asked for the setup that ran
(``train.setup.executed_setup``: the same object the runner loads and configures the model from) at the batch shape
the collator produced; it never sees the measurement.  Error = (estimated - tracked) / tracked, per step; a
configuration's error is that of its highest step.

    .venv/bin/python benchmarks/estimate_vs_runner.py                     # measure the grid (about 5 minutes)
    .venv/bin/python benchmarks/estimate_vs_runner.py --only llama        # a subset (substring of the name)
    .venv/bin/python benchmarks/estimate_vs_runner.py --from out.json     # re-estimate saved measurements

The grid: 8 architectures (tiny random models, 2 layers, GQA) x full mixed precision (fp32 weights under bf16
autocast) / full pure bf16 / full fp32 / LoRA (all linears, and q,v only) / QLoRA (bitsandbytes' CPU path) x
gradient checkpointing on and off x padded batches (rows of different lengths: an explicit attention mask) and
unpadded ones (every row as long as ``max_length``) x packing (padding-free rows).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

#: tiny configs: 2 layers, hidden 128, GQA 4/2 heads, head_dim 32, vocab 512 (the tiny tokenizer's ~390 tokens fit)
BASE = dict(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
            eos_token_id=2, tie_word_embeddings=True)
ARCHS = {
    "llama": dict(model_type="llama"),
    "mistral": dict(model_type="mistral", sliding_window=4096),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=False),
    "qwen3": dict(model_type="qwen3"),
    "gemma": dict(model_type="gemma"),
    "gemma2": dict(model_type="gemma2", final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                   sliding_window=4096, query_pre_attn_scalar=32),
    "gemma3_text": dict(model_type="gemma3_text", sliding_window=4096, query_pre_attn_scalar=32),
    "phi3": dict(model_type="phi3", tie_word_embeddings=False),
}
#: name -> (method section, training section, data kind); every architecture gets every variant
VARIANTS = {
    "full-mixed": ({"type": "full"}, {"bf16": True}, "padded"),
    "full-mixed-gc": ({"type": "full"}, {"bf16": True, "gradient_checkpointing": True}, "unpadded"),
    "full-bf16": ({"type": "full", "weights_dtype": "bf16"}, {"bf16": True}, "unpadded"),
    "full-fp32": ({"type": "full"}, {}, "padded"),
    "lora-all": ({"type": "lora", "lora_r": 8, "lora_dropout": 0.05}, {"bf16": True}, "padded"),
    "lora-qv-gc": ({"type": "lora", "lora_r": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
                   {"bf16": True, "gradient_checkpointing": True}, "unpadded"),
    "qlora": ({"type": "qlora", "lora_r": 8}, {}, "padded"),
    "packed": ({"type": "full"}, {"bf16": True}, "packed"),
}
MAX_LENGTH, BATCH = 64, 4


def save_random_model(out: Path, cfg: dict) -> Path:
    """A random-init model of the config ``cfg`` (with its ``model_type``) and the project's tiny tokenizer, saved to
    ``out`` once."""
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from finetune_helper.train.tiny import build_tokenizer

    cfg = dict(cfg)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    return out


def model_dir(arch: str, root: Path) -> Path:
    """A random-init model of ``arch`` with the project's tiny tokenizer, saved once."""
    return save_random_model(root / arch, {**BASE, **ARCHS[arch]})


def write_data(root: Path) -> dict[str, Path]:
    """Plain-text rows of digits: ``unpadded`` rows are all longer than ``max_length`` (truncated to it: no padding);
    ``padded`` rows alternate between long and short, so every batch is ``max_length`` long and padded."""
    from finetune_helper.train.tiny import write_dataset

    rng = random.Random(0)

    def row(n: int) -> dict:
        return {"text": " ".join(str(rng.randrange(10)) for _ in range(n))}

    paths = {"unpadded": root / "long.jsonl", "padded": root / "mixed.jsonl"}
    write_dataset(paths["unpadded"], [row(200) for _ in range(64)])
    write_dataset(paths["padded"], [row(200 if i % 2 else rng.randrange(5, 30)) for i in range(64)])
    paths["packed"] = paths["padded"]
    return paths


def recipe_for(arch: str, variant: str, models: Path, data: dict[str, Path]) -> dict:
    method, training, kind = VARIANTS[variant]
    if arch == "phi3" and method.get("target_modules") == ["q_proj", "v_proj"]:
        method = {**method, "target_modules": ["qkv_proj"]}  # Phi-3 fuses q, k and v into one linear
    return {"model": {"name": str(model_dir(arch, models))}, "method": dict(method),
            "data": {"path": str(data[kind]), "max_length": MAX_LENGTH, "packing": kind == "packed"},
            "hardware": {"gpu": "16GiB"},
            "training": {"per_device_train_batch_size": BATCH, "gradient_accumulation_steps": 1, **training},
            "seed": 0}


def measure(raw: dict, run_dir: Path) -> dict:
    from finetune_helper.measure.runner_step import measure_recipe
    from finetune_helper.train.recipe import recipe_from_dict

    m = measure_recipe(recipe_from_dict(raw), steps=3, run_dir=run_dir)
    config = json.loads((Path(raw["model"]["name"]) / "config.json").read_text())
    return {"config": config, "steps": [{"step": s.step, "tracked": s.tracked_bytes, "op": s.peak_op, "by_phase": s.by_phase}
                      for s in m.steps],
            "batches": [[list(shape), padded] for shape, padded in m.batches], "sft_kwargs": m.sft_kwargs}


def estimate(raw: dict, result: dict) -> list[int]:
    """The estimate of each measured step, for the setup that ran at the batch shape it ran with."""
    from finetune_helper.recommender.memory import estimate_memory
    from finetune_helper.recommender.model import ModelSpec
    from finetune_helper.train.recipe import recipe_from_dict
    from finetune_helper.train.setup import executed_setup

    recipe = recipe_from_dict(raw)
    spec = ModelSpec.from_config(result["config"], name=recipe.model.name)
    out = []
    for (shape, padded) in result["batches"]:
        setup = executed_setup(recipe, spec, result["sft_kwargs"], device="cpu", batch_shape=tuple(shape),
                               padded=padded)
        out.append(estimate_memory(spec, setup).allocated_peak)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="measure only configurations whose name contains this")
    ap.add_argument("--from", dest="source", default=None, help="re-estimate measurements saved by --save")
    ap.add_argument("--save", default=None, help="write the measurements as JSON here")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    tmp = Path(tempfile.mkdtemp(prefix="estimate-vs-runner-"))
    try:
        if args.source:
            results = json.loads(Path(args.source).read_text())
        else:
            data = write_data(tmp)
            results = {}
            for arch in ARCHS:
                for variant in VARIANTS:
                    name = f"{arch}/{variant}"
                    if args.only not in name:
                        continue
                    raw = recipe_for(arch, variant, tmp / "models", data)
                    try:
                        results[name] = {"recipe": raw, **measure(raw, tmp / "runs" / name)}
                    except Exception as exc:  # noqa: BLE001 - reported in the table, the grid goes on
                        results[name] = {"recipe": raw, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
                    print(f"measured {name}", file=sys.stderr, flush=True)
            if args.save:
                Path(args.save).write_text(json.dumps(results, indent=1))
        report(results)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


def report(results: dict) -> None:
    errors = []
    print(f"{'configuration':28} {'batch':>9} {'tracked MiB':>11} {'estimate MiB':>12} {'error':>7}  peak op")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:28} measurement failed: {r['error']}")
            continue
        est = estimate(r["recipe"], r)
        worst = max(range(len(r["steps"])), key=lambda i: r["steps"][i]["tracked"])
        tracked, predicted = r["steps"][worst]["tracked"], est[worst]
        err = (predicted - tracked) / tracked
        errors.append((abs(err), name, err))
        shape, padded = r["batches"][worst]
        print(f"{name:28} {'x'.join(map(str, shape)) + (' pad' if padded else ''):>9} {tracked / 2**20:11.2f} "
              f"{predicted / 2**20:12.2f} {err:+7.1%}  {r['steps'][worst]['op']}")
    if errors:
        worst = max(errors)
        print(f"\n{len(errors)} configurations; worst error {worst[2]:+.1%} ({worst[1]}); "
              f"mean |error| {sum(e[0] for e in errors) / len(errors):.1%}")


if __name__ == "__main__":
    raise SystemExit(main())
