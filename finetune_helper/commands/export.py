"""``finetune-helper export``: the plan as TrainingArguments JSON / YAML / Python / CLI flags, or an accelerate
launch config."""

from __future__ import annotations

import argparse
import sys

from ..errors import FinetuneHelperError
from .common import add_plan_args, emit, gather_plan


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("export", help="the plan as the trainer's arguments (TRL's SFTConfig, or "
                              "TrainingArguments with --trainer transformers) in JSON / YAML / Python / CLI flags, or "
                              "an accelerate launch config (--format accelerate)")
    add_plan_args(p)
    p.add_argument("--format", default="json", choices=("json", "yaml", "python", "cli", "accelerate"),
                   help="default: %(default)s; accelerate: a config for `accelerate launch --config_file`")
    p.add_argument("-o", "--output", default=None, help="file to write (default: stdout)")
    p.add_argument("--output-dir", default=None, help="TrainingArguments.output_dir (default: outputs/<model>)")
    p.add_argument("--transformers-version", default=None, help="write for this transformers version, e.g. 4.46 "
                   "(default: the installed one)")
    p.set_defaults(func=run, machine_output="export")


def run(args: argparse.Namespace) -> None:
    from ..export.formats import PLAIN_FORMATS, header, render

    plan = gather_plan(args)
    output_dir = args.output_dir or f"outputs/{plan.request.model.name.rstrip('/').split('/')[-1]}"
    text = render(plan, args.format, output_dir=output_dir, version=args.transformers_version)
    if args.format in PLAIN_FORMATS:  # no comments in JSON or a flag line: what the others say in theirs
        for line in header(plan, args.transformers_version):
            print(f"# {line}", file=sys.stderr)
    profile = getattr(args, "data_profile", None)
    if profile is not None:  # what the plan took from --data (`recommend --data` shows the whole profile)
        counted = (f"{profile.packed_rows:,} packed rows" if plan.request.packing else
                   f"{profile.trained_examples:,} of its {profile.examples:,} examples trained")
        print(f"# data: {profile.source}: {counted}; max_length {profile.max_length} "
              f"({'--seq-len' if profile.max_length_given else profile.max_length_source}), "
              f"{profile.truncated_share:.1%} of the examples truncated"
              + (f" (a sample of {profile.sample_size:,})" if profile.sampled else "")
              + (f"; packing left open, trained {profile.packing_choice}: {profile.packing_choice_reason}"
                 if profile.packing_choice else ""), file=sys.stderr)
    if args.price_per_hour is not None:
        cost = plan.time(args.price_per_hour).get("cost")
        print(f"# predicted cost: about {cost['total']:,.2f} at {args.price_per_hour:g} per GPU-hour x {cost['gpus']} "
              "GPU(s)" if cost else "# predicted cost: unknown (the catalog has no peak or bandwidth for this GPU)",
              file=sys.stderr)
    if not plan.fits:
        print(f"finetune-helper: warning: this plan does not fit in GPU memory: {plan.reasons.get('fits', '')}",
              file=sys.stderr)
    if not args.output:
        emit(args, text)
        return
    try:
        with open(args.output, "w", encoding="utf-8") as fh:
            fh.write(text if text.endswith("\n") else text + "\n")
    except OSError as exc:
        raise FinetuneHelperError("output", f"cannot write {args.output}: {exc.strerror}") from exc
    from ..export.training_args import config_class

    what = "accelerate config" if args.format == "accelerate" else f"{args.format} {config_class(plan)}"
    print(f"wrote {what} to {args.output}", file=sys.stderr)
    if args.format == "accelerate":
        from ..export.formats import launch_command

        print(f"launch: {launch_command(plan, args.output)}", file=sys.stderr)
