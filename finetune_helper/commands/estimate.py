"""``finetune-helper estimate``: peak training memory per GPU, as a breakdown."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .. import defaults
from ..errors import FinetuneHelperError
from ..units import fmt_gib
from .common import add_model_args, add_trainer_arg, breakdown_table, emit, model_line, table


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("estimate", help="peak training memory per GPU, as a breakdown")
    add_model_args(p)
    p.add_argument("--batch", type=int, default=1, help="per-device micro-batch (default: %(default)s)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="default: %(default)s")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute layers in backward")
    p.add_argument("--weights-dtype", default=None, choices=("bf16", "fp32"), help="full fine-tuning's weight "
                   "storage (default: fp32 masters under bf16/fp16 autocast; bf16 = pure-bf16 training)")
    p.add_argument("--gpus", type=int, default=1, help="number of GPUs (default: %(default)s)")
    p.add_argument("--sharding", default=None, choices=("none", "ddp", "fsdp", "zero2", "zero3"),
                   help="default: ddp when --gpus > 1, else none; zero2 / zero3: DeepSpeed ZeRO")
    p.add_argument("--offload", default=defaults.OFFLOAD, choices=defaults.OFFLOADS,
                   help="DeepSpeed's offload to host memory (zero2: optimizer; zero3: optimizer or all)")
    p.add_argument("--nodes", type=int, default=1, help="nodes the --gpus are spread over (host memory is per node)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="whose kernels run the step "
                   "(TRL's fused LM head: Triton on CUDA, torch tiles on the CPU; default: %(default)s)")
    p.add_argument("--unpadded", action="store_true", help="every row is as long as --seq-len (no padding mask)")
    p.add_argument("--packing", action="store_true", help="padding-free packing (TRL packing=True): the --batch "
                   "examples run as one row of batch x seq-len tokens")
    add_trainer_arg(p)
    p.add_argument("--loss", default=None, choices=("fused", "logits"), help="the loss path, when not the trainer's: "
                   "fused (TRL's chunked LM head) or logits (the model's own loss; TRL too with label smoothing or a "
                   "custom loss function) (default: the --trainer's)")
    p.add_argument("--gpu", default=None, help="a catalog GPU (see `gpus`): adds the predicted tokens/s per GPU, "
                   "seconds per micro-step and MFU for the runner's stack (recommender/throughput.py)")
    p.add_argument("--accumulation", type=int, default=1, help="gradient accumulation steps: above 1 the gradients "
                   "live through every micro-step (default: %(default)s)")
    p.set_defaults(func=run)


def gather(args: argparse.Namespace) -> dict[str, Any]:
    from ..recommender.memory import estimate_memory
    from ..recommender.model import resolve_model
    from ..recommender.rules import DEFAULT_OPTIM
    from ..recommender.training_setup import TRAINER_LOSS, TrainingSetup, step_shape

    gpu = speed_gpu(args.gpu) if args.gpu else None  # refused at once, before the model is resolved
    spec = resolve_model(args.model)
    rows, seq, padded = step_shape(args.batch, spec.sequence_length(args.seq_len), packing=args.packing)
    setup = TrainingSetup(method=args.method, micro_batch_size=rows, seq_len=seq, dtype=args.dtype,
                          optim=args.optim or DEFAULT_OPTIM, gradient_checkpointing=args.gradient_checkpointing,
                          lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                          lora_target_modules=args.target_modules, weights_dtype=args.weights_dtype,
                          attn_implementation=args.attn_implementation or spec.default_attn_implementation,
                          device=args.device, padded=padded and not args.unpadded, packing=args.packing,
                          loss=args.loss or TRAINER_LOSS[args.trainer])
    sharding = args.sharding or ("ddp" if args.gpus > 1 else "none")
    if args.accumulation < 1:
        raise FinetuneHelperError("accumulation", f"must be >= 1, got {args.accumulation}")
    if args.nodes < 1 or args.gpus % args.nodes:
        raise FinetuneHelperError("nodes", f"must divide --gpus {args.gpus} into equal nodes, got {args.nodes}")
    est = estimate_memory(spec, setup, gpus=args.gpus, sharding=sharding, accumulation=args.accumulation,
                          offload=args.offload, nodes=args.nodes)
    data = {"model": spec.name, "model_type": spec.model_type, "method": args.method, "batch": args.batch,
            "seq_len": seq, "dtype": args.dtype, "optim": setup.optim, "sharding": sharding, "offload": args.offload,
            "trainer": args.trainer, "loss": setup.loss,
            "gradient_checkpointing": args.gradient_checkpointing, **est.to_dict()}
    data["time"] = time_block(spec, setup, args.accumulation)
    if args.gpu:
        data["time"].update(speed_block(spec, setup, gpu, gpus=args.gpus, sharding=sharding,
                                        accumulation=args.accumulation, offload=args.offload))
    if args.gpus > 1:
        data["strategies"] = by_strategy(spec, setup, args.gpus, args.accumulation, args.nodes)
    return data


def speed_gpu(name: str):
    """``--gpu`` for a time estimate: a GPU whose peak TFLOP/s and memory bandwidth the catalog has."""
    from ..recommender.gpu import resolve_gpu

    gpu = resolve_gpu(name)
    if not (gpu.peak_tflops and gpu.memory_bandwidth_gbps):
        raise FinetuneHelperError("gpu", f"{gpu.name} has no peak TFLOP/s or memory bandwidth in the catalog; name "
                                  "a catalog GPU (see `finetune-helper gpus`) for a time estimate")
    return gpu


def speed_block(spec, setup, gpu, **kwargs) -> dict[str, Any]:
    """The predicted speed of the step on ``gpu`` (the catalog's peak and bandwidth)."""
    from ..recommender.throughput import step_time

    t = step_time(spec, setup, gpu, **kwargs)
    return {"gpu": gpu.name, "tokens_per_second_per_gpu": t.tokens_per_second_per_gpu,
            "seconds_per_micro_step": t.micro_step, "seconds_per_step": t.seconds_per_step, "mfu": t.mfu,
            "bound": t.bound}


def time_block(spec, setup, accumulation: int) -> dict[str, Any]:
    """What one token costs in the step that runs (executed FLOPs) and in MFU's convention (model FLOPs)."""
    from ..recommender.flops import estimate_flops

    flops = estimate_flops(spec, setup)
    return {"flops_per_token": flops.flops_per_token(setup.tokens * accumulation),
            "model_flops_per_token": flops.model_flops_per_token,
            "flops_per_micro_step": flops.executed, "attention_fraction": flops.attention_fraction}


#: the ways several GPUs can hold the model, as ``estimate`` compares them: (name, sharding, offload)
STRATEGIES = (("DDP", "ddp", "none"), ("FSDP", "fsdp", "none"), ("ZeRO-2", "zero2", "none"),
              ("ZeRO-2 + offload optimizer", "zero2", "optimizer"), ("ZeRO-3", "zero3", "none"),
              ("ZeRO-3 + offload optimizer", "zero3", "optimizer"), ("ZeRO-3 + offload all", "zero3", "all"))


def by_strategy(spec, setup, gpus: int, accumulation: int, nodes: int) -> list[dict[str, Any]]:
    """Per-GPU memory of the same step under each strategy: what DDP replicates, what ZeRO-2 shards, what ZeRO-3 /
    FSDP shard plus what they gather, and the host memory offloading needs."""
    from ..recommender.memory import estimate_memory

    rows = []
    for name, sharding, offload in STRATEGIES:
        est = estimate_memory(spec, setup, gpus=gpus, sharding=sharding, accumulation=accumulation, offload=offload,
                              nodes=nodes)
        gathered = est.details.get("fsdp_gathered_layers", 0) + est.details.get("zero_gathered_module", 0)
        rows.append({"strategy": name, "sharding": sharding, "offload": offload, "weights": est.weights,
                     "gradients": est.details["gradients.all"], "optimizer_states": est.optimizer_states,
                     "gathered": gathered, "total_bytes": est.total_bytes, "host_bytes": est.host_bytes})
    return rows


def run(args: argparse.Namespace) -> None:
    data = gather(args)
    if args.json:
        emit(args, json.dumps(data, indent=2))
        return
    print(f"{model_line(data['model'], data['model_type'], data['parameters'], data['trainable_parameters'])}: "
          f"{data['method']}, batch {data['batch']} x {data['seq_len']} tokens, {data['dtype']}, {data['optim']}, "
          f"gradient checkpointing {'on' if data['gradient_checkpointing'] else 'off'}, "
          + ("TRL's fused LM head" if data["loss"] == "fused" else "full logits in fp32 (the model's own loss)"))
    print()
    print(breakdown_table(data["breakdown"], data["total_bytes"]))
    print()
    act = {k.split(".", 1)[1]: v for k, v in data["details"].items()
           if k.startswith("activations.") and k != "activations.saved"}
    if act:
        print("activations: " + ", ".join(f"{k} {fmt_gib(v)}" for k, v in act.items() if v))
    head = {k.split(".", 1)[1]: v for k, v in data["details"].items() if k.startswith("fused_head.")}
    if head:
        print("TRL's fused LM head: " + ", ".join(f"{k} {fmt_gib(v)}" for k, v in head.items()))
    t = data["time"]
    print(f"compute: {t['flops_per_token'] / 1e9:.3g} GFLOP per token executed ({t['model_flops_per_token'] / 1e9:.3g} "
          f"in MFU's 6N + 12LHQT convention), {t['flops_per_micro_step'] / 1e12:.3g} TFLOP per micro-step")
    if "tokens_per_second_per_gpu" in t:
        print(f"speed on {t['gpu']} (HF Trainer / TRL, eager): {t['tokens_per_second_per_gpu']:,.0f} tokens/s per GPU, "
              f"{t['seconds_per_micro_step']:.3g} s per micro-step, MFU {t['mfu']:.0%} ({t['bound']}-bound)")
    print(f"peak at the {data['peak_phase']}; predicted torch.cuda.max_memory_allocated: "
          f"{fmt_gib(data['allocated_peak_bytes'])} (total less CUDA context, fragmentation and paged states)")
    if data["host_bytes"]:
        print(f"host memory per node for the offloaded states: {fmt_gib(data['host_bytes'])} (DeepSpeed's "
              "estimator, 1.5x buffer)")
    if "strategies" in data:
        print()
        print(f"per GPU by strategy ({args.gpus} GPUs; model states: weights, all gradients, optimizer states; "
              "gathered: FSDP's two layers / ZeRO-3's largest module):")
        rows = [(r["strategy"], fmt_gib(r["weights"]), fmt_gib(r["gradients"]), fmt_gib(r["optimizer_states"]),
                 fmt_gib(r["gathered"]), fmt_gib(r["total_bytes"]), fmt_gib(r["host_bytes"]) if r["host_bytes"]
                 else "-") for r in data["strategies"]]
        print(table(rows, ("strategy", "weights", "gradients", "optimizer", "gathered", "peak per GPU",
                           "host per node")))
