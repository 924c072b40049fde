"""``finetune-helper lr-find RECIPE``: the learning-rate range test on the recipe's real model, data and batch."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .common import emit

PROG = "finetune-helper"
#: the plot's default file name, and its name in a folder given as --plot
PLOT_NAME = "lr_find.png"
#: image formats the plot is written in (matplotlib's savefig, Agg backend, picks the format from the suffix)
PLOT_SUFFIXES = (".png", ".pdf", ".svg")


def add_parser(subparsers) -> None:
    from ..train.lr_find import END, START, STEPS

    p = subparsers.add_parser("lr-find", help="learning-rate range test on the recipe's model, data and effective "
                              "batch, in one process on one GPU: exponential sweep, smoothed loss, suggested LR")
    p.add_argument("recipe", help="a recipe YAML (see recipes/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. data.max_examples=500")
    p.add_argument("--start", type=float, default=START, help="first learning rate (default %(default)g)")
    p.add_argument("--end", type=float, default=END, help="last learning rate (default %(default)g)")
    p.add_argument("--steps", type=int, default=STEPS, help="optimizer steps of the sweep (default %(default)s)")
    p.add_argument("--plot", default=PLOT_NAME, help="the curve as an image: .png (default %(default)s), .pdf or .svg; "
                   f"a folder: {PLOT_NAME} in it; no suffix: .png added")
    p.add_argument("--curve", default=None, help="also write the curve to this JSON file after every step, and the "
                   "result at the end (the app plots it live)")
    p.add_argument("--json", action="store_true", help='print {"lrs", "losses", "suggested_lr", '
                   '"suggested_lr_clamped", "steepest_lr", "valley_lr", "rule_lr", "bounds", "batch", "plot", ...}')
    p.set_defaults(func=run)


def _writable(path: Path, field: str) -> Path:
    """``path`` if a file can be written there now (its folder exists and takes a new file; ``path`` is no folder),
    else a one-line error naming ``field``: checked before the sweep, not after minutes of it.  Tried for real (a
    scratch file created and removed): permission bits say nothing to root, a read-only mount refuses root too."""
    import tempfile

    from ..errors import FinetuneHelperError

    if path.is_dir():
        raise FinetuneHelperError(field, f"{path} is a folder: name a file")
    if not path.parent.is_dir():
        raise FinetuneHelperError(field, f"no such folder: {path.parent}")
    try:
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=True):
            pass
    except OSError as exc:
        raise FinetuneHelperError(field, f"cannot write in {path.parent} ({exc.strerror or exc})") from None
    return path


def plot_path(value: str) -> Path:
    """Where ``--plot`` writes: a folder gets :data:`PLOT_NAME` in it, a name without a suffix ``.png`` (as matplotlib
    would add it, so that the path printed is the file written); a suffix matplotlib does not write is refused."""
    from ..errors import FinetuneHelperError

    path = Path(value)
    if path.is_dir():
        path = path / PLOT_NAME
    elif not path.suffix:
        path = path.with_name(path.name + ".png")
    if path.suffix.lower() not in PLOT_SUFFIXES:
        raise FinetuneHelperError("plot", f"{path.name}: an image ends in {', '.join(PLOT_SUFFIXES)}")
    return _writable(path, "plot")


def run(args: argparse.Namespace) -> int:
    from ..errors import FinetuneHelperError
    from ..train.lr_find import SUGGESTION, one_process, plot, range_test
    from ..train.outcome import EXIT_INTERRUPTED, RunStopped
    from ..train.recipe import load_recipe
    from ..train.run_folder import write_json

    if not 0 < args.start < args.end < 10:
        raise FinetuneHelperError("start", f"need 0 < --start < --end < 10, got {args.start:g} and {args.end:g}")
    if not 5 <= args.steps <= 10000:
        raise FinetuneHelperError("steps", f"must be in [5, 10000], got {args.steps}")
    image = plot_path(args.plot)
    curve_file = _writable(Path(args.curve), "curve") if args.curve else None
    recipe = load_recipe(args.recipe, args.overrides)
    one_process(recipe)  # a recipe the sweep would not run as planned is refused here, before anything loads
    # one GPU, as `run` pins it: without a launcher the Trainer would take every visible GPU (n_gpu > 1, which
    # SFTTrainer refuses); CUDA reads it when it starts, so it is set before anything imports torch; a device the
    # caller chose (the app's GPU lock) is kept
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")
    log = (lambda line: print(line, file=sys.stderr)) if args.json else print

    def progress(curve) -> None:
        if curve_file is not None:
            write_json(curve_file, {"lrs": curve.lrs, "losses": curve.losses, "smoothed": curve.smoothed,
                                    "done": False})

    try:
        curve, prep = range_test(recipe, start=args.start, end=args.end, steps=args.steps, log=log,
                                 progress=progress)
    except RunStopped as stop:
        print(f"{PROG}: stopped: {stop}", file=sys.stderr)
        return stop.code
    if not curve.lrs:  # interrupted before the first step's loss: nothing to plot
        print(f"{PROG}: stopped: interrupted by {curve.interrupted} before the first step of the sweep",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    found = curve.suggestions()
    plan = prep.plan
    lo, hi = plan.request.lr_min, plan.request.lr_max
    suggested = found["suggested"]
    clamped = min(max(suggested, lo), hi) if suggested else None
    micro, accumulation = (prep.sft_kwargs["per_device_train_batch_size"],
                           prep.sft_kwargs["gradient_accumulation_steps"])
    plot(curve, image, marks={"suggested": suggested, "steepest": found["steepest"], "valley": found["valley"],
                              "rule": plan.learning_rate})
    result = {"lrs": curve.lrs, "losses": curve.losses, "suggested_lr": suggested, "suggested_lr_clamped": clamped,
              "suggestion": SUGGESTION, "no_suggestion": found["why_none"], "steepest_lr": found["steepest"],
              "valley_lr": found["valley"], "rule_lr": plan.learning_rate, "bounds": [lo, hi],
              "batch": micro * accumulation, "micro_batch": micro, "gradient_accumulation_steps": accumulation,
              "stopped_early": curve.stopped_early, "interrupted": curve.interrupted, "plot": str(image)}
    if curve_file is not None:
        write_json(curve_file, {**result, "smoothed": curve.smoothed, "done": True})
    code = EXIT_INTERRUPTED if curve.interrupted else 0
    if args.json:
        emit(args, json.dumps(result))
        return code
    print(f"swept {len(curve.lrs)} optimizer steps of batch {micro * accumulation} (micro-batch {micro} x "
          f"accumulation {accumulation}, one process), LR {curve.lrs[0]:.2g} to {curve.lrs[-1]:.2g}"
          + (" (stopped: the smoothed loss passed 4x its best)" if curve.stopped_early else "")
          + (f" (interrupted by {curve.interrupted} after {len(curve.lrs)} of {args.steps} steps: the curve so far)"
             if curve.interrupted else ""))
    if suggested:
        print(f"suggested LR ({SUGGESTION}): {suggested:.3g} -> within the bounds [{lo:g}, {hi:g}]: {clamped:.3g}")
    else:
        print(f"suggested LR: none ({found['why_none']})")
    for name in ("steepest", "valley"):
        if found[name]:
            print(f"  {name}: {found[name]:.3g}")
    print(f"rule-based (the plan): {plan.learning_rate:.3g}")
    print(f"plot: {image}")
    return code
