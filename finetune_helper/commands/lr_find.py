"""``finetune-helper lr-find RECIPE``: the learning-rate range test on the recipe's real model, data and batch."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import emit


def add_parser(subparsers) -> None:
    from ..train.lr_find import END, START, STEPS

    p = subparsers.add_parser("lr-find", help="learning-rate range test on the recipe's model, data and micro-batch: "
                              "exponential sweep, smoothed loss, suggestion at its steepest descent")
    p.add_argument("recipe", help="a recipe YAML (see recipes/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. data.max_examples=500")
    p.add_argument("--start", type=float, default=START, help="first learning rate (default %(default)g)")
    p.add_argument("--end", type=float, default=END, help="last learning rate (default %(default)g)")
    p.add_argument("--steps", type=int, default=STEPS, help="optimizer steps of the sweep (default %(default)s)")
    p.add_argument("--plot", default="lr_find.png", help="PNG of the curve (default %(default)s)")
    p.add_argument("--curve", default=None, help="also write the curve to this JSON file after every step, and the "
                   "result at the end (the app plots it live)")
    p.add_argument("--json", action="store_true", help='print {"lrs", "losses", "suggested_lr", '
                   '"suggested_lr_clamped", "valley_lr", "rule_lr", "plot"}')
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ..errors import FinetuneHelperError
    from ..train.lr_find import plot, range_test
    from ..train.recipe import load_recipe
    from ..train.run_folder import write_json

    if not 0 < args.start < args.end < 10:
        raise FinetuneHelperError("start", f"need 0 < --start < --end < 10, got {args.start:g} and {args.end:g}")
    if not 5 <= args.steps <= 10000:
        raise FinetuneHelperError("steps", f"must be in [5, 10000], got {args.steps}")
    plot_path = Path(args.plot)
    if not plot_path.parent.is_dir():
        raise FinetuneHelperError("plot", f"no such folder: {plot_path.parent}")
    recipe = load_recipe(args.recipe, args.overrides)
    log = (lambda line: print(line, file=sys.stderr)) if args.json else print
    curve_file = Path(args.curve) if args.curve else None

    def progress(curve) -> None:
        if curve_file is not None:
            write_json(curve_file, {"lrs": curve.lrs, "losses": curve.losses, "smoothed": curve.smoothed,
                                    "done": False})

    curve, prep = range_test(recipe, start=args.start, end=args.end, steps=args.steps, log=log, progress=progress)
    found = curve.suggestions()
    plan = prep.plan
    lo, hi = plan.request.lr_min, plan.request.lr_max
    steep = found["steepest"]
    clamped = min(max(steep, lo), hi) if steep else None
    plot(curve, plot_path, marks={"steepest": steep, "valley": found["valley"], "rule": plan.learning_rate})
    result = {"lrs": curve.lrs, "losses": curve.losses, "suggested_lr": steep, "suggested_lr_clamped": clamped,
              "valley_lr": found["valley"], "rule_lr": plan.learning_rate, "bounds": [lo, hi],
              "stopped_early": curve.stopped_early, "plot": str(plot_path)}
    if curve_file is not None:
        write_json(curve_file, {**result, "smoothed": curve.smoothed, "done": True})
    if args.json:
        emit(args, json.dumps(result))
        return
    batch = prep.sft_kwargs["per_device_train_batch_size"] * prep.sft_kwargs["gradient_accumulation_steps"]
    print(f"swept {len(curve.lrs)} optimizer steps of batch {batch}, LR {curve.lrs[0]:.2g} to {curve.lrs[-1]:.2g}"
          + (" (stopped: the smoothed loss passed 4x its best)" if curve.stopped_early else ""))
    print(f"steepest descent: {steep:.3g}" if steep else "steepest descent: none (the loss never fell)",
          end="")
    print(f" -> within the bounds [{lo:g}, {hi:g}]: {clamped:.3g}" if steep else "")
    if found["valley"]:
        print(f"valley: {found['valley']:.3g}")
    print(f"rule-based (the plan): {plan.learning_rate:.3g}; the range test often points 10-100x high on "
          "pretrained models: prefer the rule unless the two agree")
    print(f"plot: {plot_path}")
