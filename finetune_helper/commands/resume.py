"""``finetune-helper resume RUN_DIR``: continue a run from its folder, with nothing to re-type."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import FinetuneHelperError
from .run import add_launch_arguments, dispatch, record_exit


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("resume", help="continue a run from its folder: its saved recipe and arguments (an "
                              "out-of-memory back-off's batch included), from the last complete checkpoint")
    p.add_argument("run_dir", help="the run folder (holds recipe.yaml, training_args.json, checkpoint-N/)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="only the training length may change: recommend.epochs, training.max_steps, "
                        "training.num_train_epochs")
    add_launch_arguments(p)
    p.set_defaults(func=run, after=record_exit)


def run(args: argparse.Namespace) -> int:
    from ..train.run_folder import RECIPE, is_own_recipe

    recipe = Path(args.run_dir) / RECIPE
    if not Path(args.run_dir).is_dir():
        raise FinetuneHelperError("run_dir", f"no such run folder: {args.run_dir}")
    if not is_own_recipe(recipe):
        raise FinetuneHelperError("run_dir", f"{recipe} is missing or not written by a run: {args.run_dir} is not a "
                                  "run folder")
    return dispatch(args, str(recipe), args.overrides, output_dir=args.run_dir, dry_run=False, resume=True)
