"""``finetune-helper gpus``: the GPU catalog."""

from __future__ import annotations

import argparse
import json

from ..units import MiB, fmt_gib
from .common import emit, table


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("gpus", help="the GPU catalog")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ..recommender.catalog import gpu_entries

    entries = gpu_entries()
    if args.json:
        emit(args, json.dumps(entries, indent=2))
        return
    rows = [[e["name"], fmt_gib(e["memory_mib"] * MiB), "yes" if e.get("bf16") else "no",
             e.get("bf16_tflops") or e.get("fp16_tflops") or "-", ", ".join(e.get("aliases", [])[:3])] for e in entries]
    print(table(rows, ["GPU", "memory", "bf16", "TFLOP/s (dense bf16/fp16)", "aliases"]))
