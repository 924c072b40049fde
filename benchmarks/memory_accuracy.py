"""How close the memory estimate is to what torch really holds.

    .venv/bin/python benchmarks/memory_accuracy.py                  # CPU: activations of tiny models
    python benchmarks/memory_accuracy.py --device cuda [--quick]    # GPU: real-size models, random weights

CPU: over a grid of tiny random-init configs (architectures x method x checkpointing x batch x seq), the bytes saved
for backward, counted with torch.autograd.graph.saved_tensors_hooks (unique storages, parameters excluded), next
to ``estimate_activations(...).saved()``.

CUDA: real-size models from the catalog configs with random weights (nothing is downloaded), trained for two
optimizer steps of two accumulated micro-batches each (so gradients coexist with the next micro-batch's activations,
as in a real run with accumulation), with torch.optim.AdamW (fused), the Trainer's ``use_cache=False``, and PEFT
for LoRA (QLoRA when bitsandbytes is installed).  Prints ``torch.cuda.max_memory_allocated`` next to the
estimate's ``allocated_peak`` (the total less CUDA context and fragmentation) and the error. Target: within 10%.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5 checkpointing renames

from finetune_helper.recommender import catalog  # noqa: E402
from finetune_helper.recommender.activations import estimate_activations  # noqa: E402
from finetune_helper.recommender.memory import estimate_memory  # noqa: E402
from finetune_helper.recommender.model import ModelSpec  # noqa: E402
from finetune_helper.recommender.training_setup import TrainingSetup  # noqa: E402
from finetune_helper.units import GiB  # noqa: E402

TINY = {
    "model_type": None, "vocab_size": 1024, "hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 2,
    "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 1024,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
}
TINY_ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"]


def row(cols, widths):
    return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cols, widths)))


def cpu_grid() -> int:
    from finetune_helper.measure import tools as measure

    widths = [12, 6, 4, 3, 4, 5, 12, 12, 7]
    print(row(["arch", "attn", "meth", "gc", "b", "s", "measured B", "estimated B", "err %"], widths))
    worst = 0.0
    t0 = time.perf_counter()
    for arch in TINY_ARCHS:
        config = {**TINY, "model_type": arch}
        spec = ModelSpec.from_config(config)
        attn = spec.default_attn_implementation
        for method in ("full", "lora"):
            for gc_on in (False, True):
                for b, s in ((1, 64), (2, 128), (4, 256)):
                    setup = TrainingSetup(method=method, micro_batch_size=b, seq_len=s, gradient_checkpointing=gc_on,
                                          lora_r=8, lora_alpha=16, attn_implementation=attn)
                    # what the Trainer trains: fp32 masters (full) or a bf16 base with fp32 adapters (LoRA), under
                    # bf16 autocast
                    model = measure.model_for_setup(config, setup)
                    measured = measure.saved_tensor_bytes(model, b, s, gradient_checkpointing=gc_on)
                    est = estimate_activations(spec, setup, device="cpu").saved()
                    err = 100 * (est - measured) / measured
                    worst = max(worst, abs(err))
                    print(row([arch, attn, method, "on" if gc_on else "off", b, s, measured, est, f"{err:+.2f}"],
                              widths))
    print(f"\nworst |error| {worst:.2f}% over the grid ({time.perf_counter() - t0:.1f} s); target 10%")
    return 0 if worst <= 10 else 1


# ------------------------------------------------------------------------------------------------- CUDA
CUDA_GRID_QUICK = [
    ("Qwen/Qwen2.5-0.5B", "full", 4, 1024, False),
    ("meta-llama/Llama-3.2-1B", "lora", 4, 2048, False),
    ("meta-llama/Llama-3.1-8B", "lora", 1, 2048, True),
    ("meta-llama/Llama-3.1-8B", "qlora", 2, 2048, True),
]
CUDA_GRID = CUDA_GRID_QUICK + [
    ("Qwen/Qwen2.5-0.5B", "full", 8, 2048, True),
    ("Qwen/Qwen2.5-1.5B", "full", 2, 2048, False),
    ("meta-llama/Llama-3.2-3B", "full", 1, 1024, False),
    ("meta-llama/Llama-3.2-3B", "lora", 2, 4096, True),
    ("mistralai/Mistral-7B-v0.1", "lora", 2, 1024, False),
    ("Qwen/Qwen2.5-7B", "qlora", 4, 1024, True),
    ("google/gemma-2-2b", "lora", 2, 1024, False),
    ("Qwen/Qwen3-4B", "lora", 1, 4096, False),
]


def cuda_measure(model_id: str, method: str, batch: int, seq: int, gc_on: bool, accum: int = 2, steps: int = 2):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from finetune_helper.measure import tools as measure

    entry = catalog.find_model(model_id)
    config = dict(entry["config"])
    spec = ModelSpec.from_config(config, name=model_id)
    attn = spec.default_attn_implementation
    kwargs = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "torch_dtype")}
    tf_config = AutoConfig.for_model(config["model_type"], **kwargs)
    tf_config.use_cache = False
    torch.cuda.empty_cache()
    if method == "qlora":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            return None, "bitsandbytes not installed"
        from transformers import BitsAndBytesConfig
        from transformers.integrations.bitsandbytes import replace_with_bnb_linear

        qconf = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        with torch.device("cpu"):
            model = AutoModelForCausalLM.from_config(tf_config, attn_implementation=attn, dtype=torch.bfloat16)
        model = replace_with_bnb_linear(model, quantization_config=qconf)
        model = model.cuda()  # Params4bit quantize on the move to the GPU
    else:
        # full fine-tuning keeps fp32 master weights (mixed precision); LoRA's frozen base is bf16
        weights = torch.float32 if method == "full" else torch.bfloat16
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(tf_config, attn_implementation=attn, dtype=weights)
    model.train()
    if method in ("lora", "qlora"):
        model = measure.apply_lora(model, r=16, alpha=32)
    if gc_on:
        measure.enable_checkpointing(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        for _ in range(accum):
            ids = torch.randint(3, spec.vocab_size, (batch, seq), device="cuda")
            with torch.autocast("cuda", dtype=torch.bfloat16):  # as accelerate runs the forward for bf16=True
                loss = model(input_ids=ids, labels=ids).loss / accum
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated()
    tokens_per_s = steps * accum * batch * seq / dt
    setup = TrainingSetup(method=method, micro_batch_size=batch, seq_len=seq, gradient_checkpointing=gc_on,
                          optim="adamw_torch_fused", lora_r=16, lora_alpha=32, attn_implementation=attn)
    est = estimate_memory(spec, setup)
    del model, optimizer, params
    gc.collect()
    torch.cuda.empty_cache()
    return (peak, est.allocated_peak, tokens_per_s), ""


def cuda_grid(quick: bool) -> int:
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: run without --device cuda for the CPU benchmark", file=sys.stderr)
        return 2
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    widths = [28, 6, 3, 5, 3, 13, 13, 8, 10]
    print(row(["model", "method", "b", "s", "gc", "measured GiB", "estimate GiB", "err %", "tokens/s"], widths))
    worst = 0.0
    for model_id, method, batch, seq, gc_on in (CUDA_GRID_QUICK if quick else CUDA_GRID):
        try:
            result, why = cuda_measure(model_id, method, batch, seq, gc_on)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            result, why = None, "CUDA out of memory"
        if result is None:
            print(row([model_id, method, batch, seq, "on" if gc_on else "off", "-", "-", "-", why], widths))
            continue
        peak, est, tps = result
        err = 100 * (est - peak) / peak
        worst = max(worst, abs(err))
        print(row([model_id, method, batch, seq, "on" if gc_on else "off", f"{peak / GiB:.2f}", f"{est / GiB:.2f}",
                   f"{err:+.1f}", f"{tps:,.0f}"], widths))
    print(f"\nworst |error| {worst:.1f}% (target 10%)")
    return 0 if worst <= 10 else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--quick", action="store_true", help="CUDA: only four configurations")
    args = ap.parse_args()
    return cuda_grid(args.quick) if args.device == "cuda" else cpu_grid()


if __name__ == "__main__":
    raise SystemExit(main())
