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
    if plan.lr_note:
        print(plan.lr_note[0].upper() + plan.lr_note[1:])
    for step in plan.escalation:
        print(f"  tried {step.change}: {fmt_gib(step.peak_memory_bytes)} -> {'fits' if step.fits else 'does not fit'}")


def run(args: argparse.Namespace) -> None:
    plan = gather_plan(args)
    if args.json:
        emit(args, json.dumps(plan.to_dict(), indent=2))
    else:
        print_plan(plan)
