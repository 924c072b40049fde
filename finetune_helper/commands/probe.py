"""``finetune-helper probe``: measure a recipe's real training steps on this machine next to the estimate, and keep
the result as a calibration that later plans for this device, model and method use."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

from .common import emit


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("probe", help="measure a recipe's real steps here (CUDA peak on a GPU, tracked tensor "
                              "bytes on the CPU) next to the estimate; store the calibration")
    p.add_argument("recipe", help="a recipe YAML (see recipes/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. data.max_length=1024")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per micro-batch (default: %(default)s; "
                   "the second is the steady one)")
    p.add_argument("--no-search", action="store_true", help="measure the recommended micro-batch only")
    p.add_argument("--no-store", action="store_true", help="do not keep the calibration")
    p.add_argument("--output-dir", default=None, help="folder for the probe's runs (default: a temporary one)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--result", default=None, metavar="FILE", help="also write the result as JSON to FILE (the app "
                   "reads it)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import FinetuneHelperError
    from ..measure.probe import format_table, probe_recipe
    from ..recommender.calibration import save
    from ..train.recipe import load_recipe

    if not 1 <= args.steps <= 20:
        raise FinetuneHelperError("steps", f"must be from 1 to 20, got {args.steps}")
    if args.output_dir is not None:
        check_folder(args.output_dir, "output-dir")
    if args.result is not None and (Path(args.result).is_dir() or not Path(args.result).absolute().parent.is_dir()):
        raise FinetuneHelperError("result", f"cannot write {args.result}: give a file in an existing folder")
    recipe = load_recipe(args.recipe, args.overrides)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    with contextlib.ExitStack() as stack:  # a temporary folder goes when the probe ends, however it ends
        out = args.output_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="finetune-helper-probe-"))
        result = probe_recipe(recipe, run_dir=out, steps=args.steps, search=not args.no_search, log=log)
    cal = result.calibration()
    stored = None
    if cal is not None and not args.no_store:
        try:
            stored = save(cal)
        except ValueError as exc:
            log(f"calibration not stored: {exc}")
    data = {**result.to_dict(), "calibration": cal.__dict__ if cal else None, "stored": str(stored) if stored else None}
    if args.result:
        try:
            with open(args.result, "w", encoding="utf-8") as fh:
                json.dump(data, fh, indent=2)
        except OSError as exc:
            raise FinetuneHelperError("result", f"cannot write {args.result}: {exc.strerror}") from exc
    if args.json:
        emit(args, json.dumps(data, indent=2))
        return 0
    print(format_table(result))
    if cal is not None:
        print(f"calibration: measured / estimated = {cal.ratio:.3f} ({cal.describe()})"
              + (f"; stored in {stored}" if stored else ""))
    if cal is not None and cal.speed_ratio is not None:
        print(f"speed: measured {cal.tokens_per_second:,.0f} tokens/s, {cal.speed_ratio:.2f}x the prediction; later "
              f"plans for {cal.device}, {cal.model}, {cal.method} use it" + ("" if stored else " (not stored)"))
    elif cal is not None:
        print("speed: no prediction to calibrate on " + ("the CPU (the time model is for GPUs)" if result.device ==
                                                         "cpu" else f"{result.device} (no catalog peak or bandwidth)"))
    if result.largest_fitting:
        print(f"largest micro-batch that fit: {result.largest_fitting}")
    return 0


def check_folder(path: str, field: str) -> None:
    """``path`` is a folder, or one that can be made, and can be written: checked before minutes of measuring (a
    file in its place would otherwise be a NotADirectoryError from the Trainer)."""
    from ..errors import FinetuneHelperError

    folder = Path(path).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        where = "" if existing == folder else f"cannot make {path}: "
        raise FinetuneHelperError(field, f"{where}{existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FinetuneHelperError(field, f"cannot write in {path}: {existing} is not writable")
