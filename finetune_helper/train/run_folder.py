"""The files of a run folder, written by ``finetune-helper run`` and read back by the runner (resume), the run
command (its exit code) and the app's run manager.  One place for their names and how they are read.

Written before training: ``recipe.yaml`` (the fully resolved recipe), ``plan.json``, ``training_args.json``; during
it: ``metrics.jsonl`` (one JSON record per log) and ``checkpoint-N/``; at the end: ``final/`` and ``summary.json``;
by the command, whatever happened: ``exit.json`` (its exit code).  No torch import here.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

RECIPE = "recipe.yaml"
PLAN = "plan.json"
TRAINING_ARGS = "training_args.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
EXIT = "exit.json"
FINAL = "final"
CHECKPOINT_PREFIX = "checkpoint-"


#: the first line of the recipe.yaml a run writes: how a run folder's own file is told from a user's recipe
RECIPE_HEADER = "# fully resolved recipe, as run"


def is_own_recipe(path: Path) -> bool:
    """Whether ``path`` is a recipe.yaml a run wrote (a regular file starting with :data:`RECIPE_HEADER`)."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        return False
    try:
        with path.open(encoding="utf-8") as fh:
            return fh.readline().rstrip("\n") == RECIPE_HEADER
    except (OSError, UnicodeDecodeError):
        return False


def run_traces(run_dir: Path) -> list[str]:
    """What in ``run_dir`` shows that a run trained there (checkpoints, metrics, final model, summary); empty for a
    new folder or one that only holds a dry run's files."""
    run_dir = Path(run_dir)
    found = [p.name for p in checkpoints(run_dir)[-1:]]
    found += [name for name in (METRICS, FINAL, SUMMARY) if (run_dir / name).exists()]
    return found


def finished(run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` trained to its end (its summary says done)."""
    summary = read_json(Path(run_dir) / SUMMARY)
    return isinstance(summary, dict) and summary.get("status") == "done"


def read_json(path: Path) -> Any:
    """``path`` as JSON, or None when it is missing, unreadable or being written."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_json(path: Path, data: Any) -> None:
    Path(path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def write_exit(run_dir: str | Path, code: int) -> None:
    """How the command ended (the app reads it: how a run ended, even when no app was watching)."""
    write_json(Path(run_dir) / EXIT, {"returncode": code, "time": time.time()})


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """``metrics.jsonl``, one record per logged step, the latest record winning for a step logged twice (a resumed
    run repeats the steps after its checkpoint)."""
    records: dict[tuple[int, str], dict[str, Any]] = {}
    try:
        lines = (Path(run_dir) / METRICS).read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line being written right now
        kind = "eval" if "eval_loss" in rec else "train" if "loss" in rec else "other"
        records[(int(rec.get("step", 0)), kind)] = rec
    return [records[k] for k in sorted(records)]


def starting_loss(run_dir: Path, logs: int) -> float | None:
    """The mean loss of the first ``logs`` logged steps, None before there are that many (a resumed run's
    divergence reference must not restart)."""
    losses = [float(r["loss"]) for r in read_metrics(run_dir) if isinstance(r.get("loss"), (int, float))][:logs]
    return sum(losses) / logs if len(losses) == logs else None


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX):])


def checkpoints(run_dir: Path) -> list[Path]:
    """The ``checkpoint-<step>`` folders of ``run_dir``, by step, complete or not."""
    found = [p for p in Path(run_dir).glob(CHECKPOINT_PREFIX + "*")
             if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=checkpoint_step)


#: the weights of a checkpoint: a model or a PEFT adapter, whole or sharded (transformers / PEFT file names)
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
            "adapter_model.safetensors", "adapter_model.bin")


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint folder ``path`` cannot be resumed from, or None when it is complete.

    ``Trainer._save_checkpoint`` writes the weights, then the optimizer and scheduler, then the RNG state and last
    ``trainer_state.json``: a run killed while saving (a second Stop, SIGKILL, a full disk) leaves a folder without
    the state, or with the state of an earlier write cut short."""
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return "trainer_state.json is missing or unreadable (the save was cut short)"
    if not any((path / name).is_file() for name in _WEIGHTS):
        return "no model or adapter weights"
    # optimizer.pt (one process); DeepSpeed and FSDP save their sharded optimizer states in folders of their own
    if not ((path / "optimizer.pt").is_file() or any(path.glob("global_step*")) or any(path.glob("optimizer_*"))):
        return "no optimizer state"
    if not (path / "scheduler.pt").is_file():
        return "no scheduler state"
    return None


def resume_point(run_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The last complete checkpoint of ``run_dir`` (see :func:`checkpoint_problem`) or None, and the incomplete
    ones after it with what each lacks (oldest first); read newest first, stopping at the first complete one."""
    skipped: list[tuple[Path, str]] = []
    for path in reversed(checkpoints(run_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, skipped[::-1]
        skipped.append((path, problem))
    return None, skipped[::-1]


def last_checkpoint(run_dir: Path) -> Path | None:
    """The last complete checkpoint of ``run_dir``, or None."""
    return resume_point(run_dir)[0]
