"""Operators per micro-step of the runner's step, per decoder layer: the ``host_ops`` table of the time model.

Eager PyTorch issues every operator from the host; a micro-step of a large model on few tokens is bound by that
(``finetune_helper/measure/host_ops.py``).  This counts the operators of one ``training_step`` (forward, loss,
backward; not the optimizer step) of the runner's own step on tiny random Llama models of 2 and 4 layers, for
each method with and without gradient checkpointing, and LoRA on all seven linears and on q, v only:

    per layer        = (ops at 4 layers - ops at 2 layers) / 2
    fixed            = ops at 2 layers - 2 x per layer        (embedding, final norm, LM head and loss)
    per LoRA linear  = (LoRA all-linear - LoRA q,v) per layer / 5    (dropout, A, B, scaling, add, their backward)
    LoRA layer base  = LoRA all-linear per layer - 7 x per LoRA linear

and prints them as ``finetune_helper/recommender/data/throughput.yaml``'s ``host_ops`` block.  It also prints the
host time per operator on this machine (tiny tensors, one thread), for reference: the GPU host's rate is
calibrated on published rows (``benchmarks/time_vs_published.py --calibrate``), not taken from this CPU.

    .venv/bin/python benchmarks/host_ops.py          # about 2 minutes on 2 cores
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

#: tiny Llama (GQA 2/1 heads); only the operator count matters, which does not depend on the sizes
TINY = dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=2,
            num_key_value_heads=1, head_dim=32, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
            eos_token_id=2, tie_word_embeddings=True)
QV = ["q_proj", "v_proj"]
#: name -> (method section, training section); the runner's defaults otherwise (bf16 autocast, fp32 LoRA weights)
VARIANTS = {
    "full": ({"type": "full"}, {"bf16": True}),
    "full+gc": ({"type": "full"}, {"bf16": True, "gradient_checkpointing": True}),
    "lora": ({"type": "lora", "lora_r": 8}, {"bf16": True}),
    "lora+gc": ({"type": "lora", "lora_r": 8}, {"bf16": True, "gradient_checkpointing": True}),
    "lora-qv": ({"type": "lora", "lora_r": 8, "target_modules": QV}, {"bf16": True}),
    "lora-qv+gc": ({"type": "lora", "lora_r": 8, "target_modules": QV}, {"bf16": True, "gradient_checkpointing": True}),
    "qlora": ({"type": "qlora", "lora_r": 8}, {"bf16": True}),
    "qlora+gc": ({"type": "qlora", "lora_r": 8}, {"bf16": True, "gradient_checkpointing": True}),
}
ALL_LINEARS = 7  # Llama: q, k, v, o, gate, up, down


def tiny_model(root: Path, layers: int) -> Path:
    out = root / f"llama-{layers}"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from finetune_helper.train.tiny import build_tokenizer

    cfg = dict(TINY, num_hidden_layers=layers)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg)).save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    return out


def write_rows(path: Path) -> Path:
    from finetune_helper.train.tiny import write_dataset

    write_dataset(path, [{"text": " ".join(str((i * 7 + j) % 10) for j in range(60))} for i in range(64)])
    return path


def recipe(model: Path, data: Path, method: dict, training: dict):
    from finetune_helper.train.recipe import recipe_from_dict

    return recipe_from_dict({"model": {"name": str(model)}, "method": dict(method),
                             "data": {"path": str(data), "max_length": 32}, "hardware": {"gpu": "16GiB"},
                             "training": {"per_device_train_batch_size": 1, **training}, "seed": 0})


def count(name: str, layers: int, root: Path, data: Path, timed: int = 0):
    from finetune_helper.measure.host_ops import count_micro_step_ops

    method, training = VARIANTS[name]
    return count_micro_step_ops(recipe(tiny_model(root, layers), data, method, training),
                                run_dir=root / f"run-{name}-{layers}", timed_steps=timed)


def table(counts: dict[tuple[str, int], int]) -> dict[str, dict[str, int]]:
    """The ``host_ops`` block from the counts at 2 and 4 layers."""
    per_layer = {name: (counts[name, 4] - counts[name, 2]) / 2 for name in VARIANTS}
    fixed = {name: counts[name, 2] - 2 * per_layer[name] for name in VARIANTS}
    lora_linear = {gc: (per_layer[f"lora{gc}"] - per_layer[f"lora-qv{gc}"]) / (ALL_LINEARS - len(QV))
                   for gc in ("", "+gc")}
    out = {"per_layer": {}, "fixed": {}}
    for name in ("full", "full+gc", "lora", "lora+gc", "qlora", "qlora+gc"):
        gc = "+gc" if name.endswith("+gc") else ""
        base = per_layer[name] - (ALL_LINEARS * lora_linear[gc] if name.startswith(("lora", "qlora")) else 0)
        out["per_layer"][name] = round(base)
        out["fixed"][name] = round(fixed[name])
    out["per_lora_linear"] = {"plain": round(lora_linear[""]), "gc": round(lora_linear["+gc"])}
    return out


def main() -> int:
    import torch
    import yaml

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="host-ops-"))
    data = write_rows(root / "rows.jsonl")
    counts, rates = {}, []
    print(f"{'variant':12} {'layers':>6} {'ops':>6} {'us/op here':>10}")
    for name in VARIANTS:
        for layers in (2, 4):
            c = count(name, layers, root, data, timed=10)
            counts[name, layers] = c.ops
            rates.append(c.seconds_per_op)
            print(f"{name:12} {layers:6d} {c.ops:6d} {c.seconds_per_op * 1e6:10.1f}", flush=True)
    print(f"\nhost time per operator on this machine (median of {len(rates)}): "
          f"{sorted(rates)[len(rates) // 2] * 1e6:.1f} us  (reference only)")
    print("\nhost_ops block for finetune_helper/recommender/data/throughput.yaml:")
    print(yaml.safe_dump({"host_ops": table(counts)}, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
