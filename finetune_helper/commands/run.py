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
    p.add_argument("--dry-run", action="store_true", help="write plan.json, training_args.json, recipe.yaml; stop "
                   "(refused into a folder that holds a run)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last complete checkpoint, "
                   "with the run's saved arguments (see also: finetune-helper resume RUN_DIR)")
    p.set_defaults(func=run, after=record_exit)


def run(args: argparse.Namespace) -> int:
    return start(args, args.recipe, args.overrides, output_dir=args.output_dir, dry_run=args.dry_run,
                 resume=args.resume)


def start(args: argparse.Namespace, recipe: str, overrides: list[str], *, output_dir: str | None, dry_run: bool,
          resume: bool) -> int:
    """Run a recipe and print how it ended; ``args.run_state`` tells :func:`record_exit` whether the run got as far
    as writing its files."""
    from ..train.runner import RunStopped, format_summary, run as run_recipe

    def log(line: str) -> None:
        print(line, flush=True)

    args.run_state = {}
    try:
        result = run_recipe(recipe, overrides, output_dir=output_dir, dry_run=dry_run, resume=resume, log=log,
                            state=args.run_state)
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
    """Leave the exit code in the run folder (the app reads it: how a run ended, even unwatched) -- unless the run
    was refused for the folder itself (it holds another run, or your own recipe.yaml) or found nothing to do (a
    finished run resumed): then nothing there changes."""
    run_dir = getattr(args, "output_dir", None) or getattr(args, "run_dir", None)
    if not run_dir or not os.path.isdir(run_dir):
        return
    from ..train.run_folder import run_traces, write_exit

    state = getattr(args, "run_state", {})
    if state.get("wrote_files") or (state.get("folder_ok") and not run_traces(run_dir)):
        write_exit(run_dir, code)
