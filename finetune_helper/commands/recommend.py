"""``finetune-helper recommend``: batch, accumulation, LR, warmup, precision, optimizer, each with its reason."""

from __future__ import annotations

import argparse
import json

from ..units import fmt_gib
from .common import add_plan_args, breakdown_table, emit, gather_plan, model_line, table


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("recommend", help="batch, accumulation, LR, warmup, precision, optimizer, with reasons")
    add_plan_args(p)
    p.set_defaults(func=run)


def print_plan(plan) -> None:
    d = plan.to_dict()
    r = plan.request
    print(f"{model_line(r.model.name, r.model.model_type, d['parameters'], d['trainable_parameters'])} on "
          f"{r.gpus} x {r.gpu.describe()}, {r.method}, seq {d['seq_len']}")
    print()
    print(table(plan.settings_rows(), ["setting", "value", "reason"]))
    print()
    print(breakdown_table(d["breakdown"], d["peak_memory_bytes"]))
    print()
    print(f"{'FITS' if plan.fits else 'DOES NOT FIT'}: {plan.reasons['fits']}")
    if r.trainer != "transformers":
        print(other_trainer_line(plan.under_trainer("transformers"), plan.per_device_train_batch_size))
    if plan.lr_note:
        print(plan.lr_note[0].upper() + plan.lr_note[1:])
    for step in plan.escalation:
        print(f"  tried {step.change}: {fmt_gib(step.peak_memory_bytes)} -> {'fits' if step.fits else 'does not fit'}")


def other_trainer_line(other: dict, batch: int) -> str:
    """What the same batch would need under transformers.Trainer, and what a plan for it would choose."""
    return (f"under transformers.Trainer (full logits in fp32) batch {batch} would need "
            f"{fmt_gib(other['peak_memory_bytes'])} ({'fits' if other['fits'] else 'does not fit'}); "
            f"--trainer transformers plans batch {other['per_device_train_batch_size']}")


def run(args: argparse.Namespace) -> None:
    plan = gather_plan(args)
    if args.json:
        data = plan.to_dict()
        if plan.request.trainer != "transformers":
            data["under_transformers_trainer"] = plan.under_trainer("transformers")
        emit(args, json.dumps(data, indent=2))
    else:
        print_plan(plan)
