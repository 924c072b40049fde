"""``finetune-helper run``: fine-tune from a recipe: recommend, write the run folder, train."""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import FinetuneHelperError

PROG = "finetune-helper"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("run", help="fine-tune from a recipe: recommend, write the run folder, train")
    p.add_argument("recipe", help="a recipe YAML (see recipes/)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. training.max_steps=20 data.path=my.jsonl")
    p.add_argument("--output-dir", default=None, help="run folder (default: the recipe's output_dir or runs/<name>)")
    p.add_argument("--dry-run", action="store_true", help="write plan.json, training_args.json, recipe.yaml; stop")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.set_defaults(func=run, after=record_exit)


def run(args: argparse.Namespace) -> int:
    from ..train.runner import RunStopped, format_summary, run as run_recipe

    def log(line: str) -> None:
        print(line, flush=True)

    try:
        result = run_recipe(args.recipe, args.overrides, output_dir=args.output_dir, dry_run=args.dry_run,
                            resume=args.resume, log=log)
    except RunStopped as stop:
        print(f"{PROG}: stopped: {stop}", file=sys.stderr)
        return stop.code
    except (FinetuneHelperError, KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # a failure inside the training stack: one line here, the traceback in a file
        import tempfile
        import traceback

        fd, path = tempfile.mkstemp(prefix="finetune-helper-error-", suffix=".log")
        with os.fdopen(fd, "w") as fh:
            traceback.print_exc(file=fh)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"{PROG}: error: run failed: {type(exc).__name__}: {first} (traceback in {path}; checkpoints in the "
              "run folder are kept)", file=sys.stderr)
        return 1
    if result.summary.get("status") == "done":
        print()
        print(format_summary(result.summary))
    return result.exit_code


def record_exit(args: argparse.Namespace, code: int) -> None:
    """``run --output-dir DIR`` leaves its exit code in DIR (the app reads it: how a run ended, even unwatched)."""
    if args.output_dir and os.path.isdir(args.output_dir):
        from ..train.run_folder import write_exit

        write_exit(args.output_dir, code)
