"""Operators per micro-step of the runner's step, per decoder layer: the ``host_ops`` table of the time model.

Eager PyTorch issues every operator from the host; a micro-step of a large model on few tokens is bound by that
(``finetune_helper/measure/host_ops.py``).  This counts the operators of one ``training_step`` (forward, loss,
backward; not the optimizer step) of the runner's own step on tiny random models of 2 and 4 layers of each
architecture of ``estimate_vs_runner.py``'s grid, for each method with and without gradient checkpointing, and LoRA
on every linear and on q, v only (Phi-3: its fused qkv):

    per layer        = (ops at 4 layers - ops at 2 layers) / 2
    fixed            = ops at 2 layers - 2 x per layer        (embedding, final norm, LM head and loss)
    per LoRA linear  = (LoRA all-linear - LoRA q,v) per layer / (linears - q,v linears)
                       (dropout, A, B, scaling, add, their backward): Llama's is the table's, the others printed
    LoRA layer base  = LoRA all-linear per layer - linears x the table's per LoRA linear

and prints them as ``finetune_helper/recommender/data/throughput.yaml``'s ``host_ops`` block.  It also prints the
host time per operator on this machine (tiny tensors, one thread), for reference: the GPU host's rate is
calibrated on published rows (``benchmarks/time_vs_published.py --calibrate``), not taken from this CPU.

    .venv/bin/python benchmarks/host_ops.py                 # every architecture, about 5 minutes on 2 cores
    .venv/bin/python benchmarks/host_ops.py --only llama    # one architecture
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from estimate_vs_runner import ARCHS, save_random_model  # noqa: E402

#: tiny models (GQA 2/1 heads); only the operator count matters, which does not depend on the sizes
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1,
            head_dim=32, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            tie_word_embeddings=True)
#: LoRA on q and v only; Phi-3 fuses q, k and v into one linear
QV = {"phi3": ["qkv_proj"]}
#: name -> (method section, training section); the runner's defaults otherwise (bf16 autocast, fp32 LoRA weights)
VARIANTS = {
    "full": ({"type": "full"}, {"bf16": True}),
    "full+gc": ({"type": "full"}, {"bf16": True, "gradient_checkpointing": True}),
    "lora": ({"type": "lora", "lora_r": 8}, {"bf16": True}),
    "lora+gc": ({"type": "lora", "lora_r": 8}, {"bf16": True, "gradient_checkpointing": True}),
    "lora-qv": ({"type": "lora", "lora_r": 8, "target_modules": "qv"}, {"bf16": True}),
    "lora-qv+gc": ({"type": "lora", "lora_r": 8, "target_modules": "qv"},
                   {"bf16": True, "gradient_checkpointing": True}),
    "qlora": ({"type": "qlora", "lora_r": 8}, {"bf16": True}),
    "qlora+gc": ({"type": "qlora", "lora_r": 8}, {"bf16": True, "gradient_checkpointing": True}),
}
TABLED = ("full", "full+gc", "lora", "lora+gc", "qlora", "qlora+gc")


def config(arch: str, layers: int) -> dict:
    return {**TINY, **ARCHS[arch], "num_hidden_layers": layers}


def qv_targets(arch: str) -> list[str]:
    return QV.get(arch, ["q_proj", "v_proj"])


def linears(arch: str, targets) -> int:
    from finetune_helper.recommender.model import ModelSpec

    return len(ModelSpec.from_config(config(arch, 2)).lora_linears(targets))


def tiny_model(root: Path, arch: str, layers: int) -> Path:
    return save_random_model(root / f"{arch}-{layers}", config(arch, layers))


def write_rows(path: Path) -> Path:
    from finetune_helper.train.tiny import write_dataset

    write_dataset(path, [{"text": " ".join(str((i * 7 + j) % 10) for j in range(60))} for i in range(64)])
    return path


def recipe(model: Path, data: Path, method: dict, training: dict):
    from finetune_helper.train.recipe import recipe_from_dict

    return recipe_from_dict({"model": {"name": str(model)}, "method": dict(method),
                             "data": {"path": str(data), "max_length": 32}, "hardware": {"gpu": "16GiB"},
                             "training": {"per_device_train_batch_size": 1, **training}, "seed": 0})


def count(arch: str, name: str, layers: int, root: Path, data: Path, timed: int = 0):
    from finetune_helper.measure.host_ops import count_micro_step_ops

    method, training = VARIANTS[name]
    if method.get("target_modules") == "qv":
        method = {**method, "target_modules": qv_targets(arch)}
    return count_micro_step_ops(recipe(tiny_model(root, arch, layers), data, method, training),
                                run_dir=root / f"run-{arch}-{name}-{layers}", timed_steps=timed)


def per_lora_linear(arch: str, per_layer: dict[str, float]) -> dict[str, float]:
    spread = linears(arch, "all-linear") - linears(arch, tuple(qv_targets(arch)))
    return {gc: (per_layer[f"lora{gc}"] - per_layer[f"lora-qv{gc}"]) / spread for gc in ("", "+gc")}


def table(counts: dict[tuple[str, str, int], int]) -> dict:
    """The ``host_ops`` block from the counts at 2 and 4 layers: Llama's operators per LoRA-wrapped linear, and per
    architecture the operators per layer (a LoRA method's without its adapters) and the fixed ones."""
    archs = sorted({arch for arch, _, _ in counts}, key=list(ARCHS).index)
    per_layer = {arch: {name: (counts[arch, name, 4] - counts[arch, name, 2]) / 2 for name in VARIANTS}
                 for arch in archs}
    reference = "llama" if "llama" in archs else archs[0]
    adapter = per_lora_linear(reference, per_layer[reference])
    out = {"per_lora_linear": {"plain": round(adapter[""]), "gc": round(adapter["+gc"])}, "per_layer": {},
           "fixed": {}}
    for arch in archs:
        n = linears(arch, "all-linear")
        out["per_layer"][arch] = {}
        out["fixed"][arch] = {}
        for name in TABLED:
            gc = "+gc" if name.endswith("+gc") else ""
            base = per_layer[arch][name] - (n * round(adapter[gc]) if name.startswith(("lora", "qlora")) else 0)
            out["per_layer"][arch][name] = round(base)
            out["fixed"][arch][name] = round(counts[arch, name, 2] - 2 * per_layer[arch][name])
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    import torch
    import yaml

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="architectures whose name contains this")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="host-ops-"))
    data = write_rows(root / "rows.jsonl")
    counts, rates = {}, []
    print(f"{'architecture':12} {'variant':12} {'layers':>6} {'ops':>6} {'us/op here':>10}")
    for arch in (a for a in ARCHS if args.only in a):
        for name in VARIANTS:
            for layers in (2, 4):
                c = count(arch, name, layers, root, data, timed=5)
                counts[arch, name, layers] = c.ops
                rates.append(c.seconds_per_op)
                print(f"{arch:12} {name:12} {layers:6d} {c.ops:6d} {c.seconds_per_op * 1e6:10.1f}", flush=True)
    print(f"\nhost time per operator on this machine (median of {len(rates)}): "
          f"{sorted(rates)[len(rates) // 2] * 1e6:.1f} us  (reference only)")
    print("operators per LoRA-wrapped linear, per architecture (plain / checkpointed; the table keeps Llama's):")
    for arch in sorted({a for a, _, _ in counts}, key=list(ARCHS).index):
        per_layer = {name: (counts[arch, name, 4] - counts[arch, name, 2]) / 2 for name in VARIANTS}
        adapter = per_lora_linear(arch, per_layer)
        print(f"  {arch:12} {adapter['']:.1f} / {adapter['+gc']:.1f}")
    print("\nhost_ops block for finetune_helper/recommender/data/throughput.yaml:")
    print(yaml.safe_dump({"host_ops": table(counts)}, sort_keys=False, default_flow_style=None, width=120))
    return 0


if __name__ == "__main__":
    sys.exit(main())
