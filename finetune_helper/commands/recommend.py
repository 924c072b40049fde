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


def _pct(share: float, se: float | None = None, sampled: bool = True) -> str:
    """``12.3%``, with ``+- 1.96 se`` when the figure is estimated (``se`` given and ``sampled``)."""
    digits = 1 if share == 0 or share >= 0.001 else 2
    text = f"{share:.{digits}%}"
    if se and sampled:
        text += f" +- {Z95_PCT * se:.{max(digits, 1)}%}"
    return text


#: the 95% half-width of a standard error
Z95_PCT = 1.959964


def data_lines(profile) -> list[str]:
    """The data section's paragraphs (unwrapped): what was read and how it was tokenized, the length distribution,
    max_length, padding, packing, what the plan took from the data, and the sampling error."""
    d = profile.to_dict()
    sampled = profile.sampled
    what = f"{profile.source} (split {profile.split}{', config ' + profile.config if profile.config else ''}, " \
           f"{profile.format} format): {profile.examples:,} examples"
    if profile.tokenizer:
        how = f"tokenized as TRL's SFTTrainer tokenizes them, with the tokenizer of {profile.tokenizer}"
    else:
        how = f"no tokenizer ({profile.tokenizer_note}): lengths approximated as {d['approximation']}"
    if sampled:
        how = f"a sample of {profile.sample_size:,} (fixed seed {profile.sample_seed}) " + how
    lines = [f"data: {what}; {how}"]
    bounds = d["percentile_bounds_95"]
    dist = ", ".join(f"{k} {getattr(profile, k):,}" + (f" ({bounds[k][0]:,}-{bounds[k][1]:,})" if sampled else "")
                     for k in ("p50", "p90", "p99"))
    lines.append(f"tokens per example: {dist}, max {profile.max:,}{' in the sample' if sampled else ''}, mean "
                 f"{profile.mean:.1f}" + ("; 95% bounds in brackets" if sampled else ""))
    truncated = ("no example is longer" if profile.truncated_share == 0 and not sampled else
                 f"{_pct(profile.truncated_share, profile.truncated_share_se, sampled)} of the examples "
                 f"(~{profile.truncated_examples:,}) are longer and truncated")
    if profile.dropped_share:
        truncated += (f", {_pct(profile.dropped_share, profile.dropped_share_se, sampled)} (~"
                      f"{profile.examples - profile.trained_examples:,}) so much that no answer token is left: "
                      "SFTTrainer drops those")
    if profile.max_length_given:
        lines.append(f"max_length {profile.max_length:,} (--seq-len): {truncated}; the data recommends "
                     f"{profile.recommended_max_length:,}: {profile.max_length_reason}")
    else:
        lines.append(f"max_length {profile.max_length:,} (the plan's seq_len): {profile.max_length_reason}; "
                     f"{truncated}")
    if profile.batch is not None:
        lines.append(f"padding at micro-batch {profile.batch}: "
                     f"{_pct(profile.padding_waste, profile.padding_waste_se)} of the "
                     f"{profile.unpacked_positions:,} positions are padding (batches in the Trainer's random order, "
                     "each padded to its longest as TRL's collator pads"
                     + ("; +- over random orders)" if not sampled else ")"))
    pays = profile.packing_pays
    verdict = ("" if pays is None else
               f"; unpacked batches take {profile.unpacked_positions:,} positions: packing "
               + (f"pays ({1 - profile.packed_positions / profile.unpacked_positions:.0%} fewer)" if pays else
                  f"does not pay ({profile.packed_positions / profile.unpacked_positions - 1:.1%} more)"))
    rows = f"{profile.packed_rows:,}" + (f" +- {Z95_PCT * profile.packed_rows_se:,.0f}" if sampled else "")
    fill = profile.mean_truncated * profile.examples / profile.packed_positions
    lines.append(f"packing (TRL's {profile.packing_strategy}) into rows of {profile.max_length:,} tokens: {rows} rows "
                 f"x {profile.max_length:,} = {profile.packed_positions:,} positions, {fill:.0%} of them tokens "
                 f"(TRL runs packed rows padding-free){verdict}")
    if profile.packing_choice_reason:
        lines.append(f"packing left open: the plan trains {profile.packing_choice}; "
                     f"{profile.packing_choice_reason}")
    if sampled:
        lines.append(f"sampling error: {profile.sample_size:,} of {profile.examples:,} examples tokenized; "
                     + d["sampling_error"])
    return lines


def print_data(profile, width: int | None = None, packing: bool = False) -> None:
    """The data section (after the plan), wrapped to ``width`` columns."""
    width = width or terminal_width()
    lines = data_lines(profile)
    counted = (f"the plan counts the {profile.packed_rows:,} packed rows" if packing else
               f"the plan counts the {profile.trained_examples:,} examples SFTTrainer trains on") + \
        " for its steps, warmup and time"
    print()
    print(wrap(lines[0], width))
    for line in lines[1:] + [counted]:
        print(wrap(line, width, "  ", "      "))


def run(args: argparse.Namespace) -> None:
    plan = gather_plan(args)
    profile = getattr(args, "data_profile", None)
    if args.json:
        data = plan.to_dict()
        if args.price_per_hour is not None:  # to_dict's time block has no cost
            data["time"] = plan.time(args.price_per_hour)
        if plan.request.trainer != "transformers":
            data["under_transformers_trainer"] = plan.under_trainer("transformers")
        if profile is not None:
            data["data"] = profile.to_dict()
        emit(args, json.dumps(data, indent=2))
    else:
        width = terminal_width(getattr(args, "stdout", None))
        print_plan(plan, explain=args.explain, width=width, price_per_hour=args.price_per_hour)
        if profile is not None:
            print_data(profile, width, packing=plan.request.packing)
