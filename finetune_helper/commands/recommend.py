"""``finetune-helper recommend``: batch, accumulation, LR, warmup, precision, optimizer, each with its reason.

The table fits the terminal (``common.terminal_width``): each reason is the decision and its key figure in one line
(``Plan.short_reasons``), wrapped under its setting; ``--explain`` prints the full reasons (derivations, sources),
wrapped the same way, and ``--json`` has them as they are.
"""

from __future__ import annotations

import argparse
import json

from ..recommender.throughput import describe
from ..units import fmt_gib
from .common import add_plan_args, breakdown_table, emit, gather_plan, model_line, terminal_width, wrap, wrapped_table


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("recommend", help="batch, accumulation, LR, warmup, precision, optimizer, with reasons")
    add_plan_args(p)
    p.add_argument("--explain", action="store_true", help="each reason in full: the derivation and its sources "
                   "(the table's reasons are one line each; --json has the full ones too)")
    p.set_defaults(func=run)


def print_plan(plan, explain: bool = False, width: int | None = None, price_per_hour: float | None = None) -> None:
    """The plan as text of at most ``width`` columns (default: the terminal's): one-line reasons, or with
    ``explain`` the full ones."""
    width = width or terminal_width()
    d = plan.to_dict()
    r = plan.request
    print(wrap(f"{model_line(r.model.name, r.model.model_type, d['parameters'], d['trainable_parameters'])} on "
               f"{r.gpus} x {r.gpu.describe()}, {r.method}, seq {d['seq_len']}", width))
    print()
    print(wrapped_table(plan.settings_rows(short=not explain), ["setting", "value", "reason"], width))
    print()
    print(breakdown_table(d["breakdown"], d["peak_memory_bytes"]))
    print()
    verdict = plan.reasons["fits"] if explain else plan.short_reason("fits")
    print(wrap(f"{'FITS' if plan.fits else 'DOES NOT FIT'}: {verdict}", width))
    speed = describe(plan.time(price_per_hour), r.gpu.name, plan.total_steps)
    if speed:
        print(wrap(speed[0].upper() + speed[1:], width))
    if r.trainer != "transformers":
        print(wrap(other_trainer_line(plan.under_trainer("transformers"), plan.per_device_train_batch_size), width))
    if plan.lr_note:
        print(wrap(plan.lr_note[0].upper() + plan.lr_note[1:], width))
    for step in plan.escalation:
        print(wrap(f"tried {step.change}: {fmt_gib(step.peak_memory_bytes)} -> "
                   f"{'fits' if step.fits else 'does not fit'}", width, "  ", "      "))
    if not explain:
        print(wrap("--explain: the reasons in full, with their derivations and sources", width))


def other_trainer_line(other: dict, batch: int) -> str:
    """What the same batch would need under transformers.Trainer, and what a plan for it would choose."""
    return (f"under transformers.Trainer (full logits in fp32) batch {batch} would need "
            f"{fmt_gib(other['peak_memory_bytes'])} ({'fits' if other['fits'] else 'does not fit'}); "
            f"--trainer transformers plans batch {other['per_device_train_batch_size']}")


def run(args: argparse.Namespace) -> None:
    plan = gather_plan(args)
    if args.json:
        data = plan.to_dict()
        data["time"] = plan.time(args.price_per_hour)
        if plan.request.trainer != "transformers":
            data["under_transformers_trainer"] = plan.under_trainer("transformers")
        emit(args, json.dumps(data, indent=2))
    else:
        print_plan(plan, explain=args.explain, width=terminal_width(getattr(args, "stdout", None)),
                   price_per_hour=args.price_per_hour)
