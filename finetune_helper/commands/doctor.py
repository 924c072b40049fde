"""``finetune-helper doctor RUN_DIR``: what a run's loss curves show (diverged, overfitting, stuck, healthy)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import FinetuneHelperError
from .common import emit


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("doctor", help="read a run's loss curves: diverged, overfitting, stuck or healthy, "
                              "with the numbers and what to do")
    p.add_argument("run_dir", help="a run folder (holds metrics.jsonl)")
    p.add_argument("--json", action="store_true", help='print {"diagnosis", "evidence", "advice"}')
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ..train.doctor import diagnose_run
    from ..train.run_folder import METRICS

    if not (Path(args.run_dir) / METRICS).is_file():
        raise FinetuneHelperError("run_dir", f"{args.run_dir} has no {METRICS}: not a run folder, or the run has not "
                                  "logged yet")
    result = diagnose_run(Path(args.run_dir))
    if args.json:
        emit(args, json.dumps(result.as_dict()))
        return
    print(f"{result.diagnosis}: {result.evidence}")
    print(f"advice: {result.advice}")
