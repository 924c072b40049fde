"""What must hold before a run loads anything: the run folder (it can be written, it holds no other run, a resume
continues the same recipe), DeepSpeed's preconditions, LoRA's target modules.  Each refusal is a one-line
:class:`FinetuneHelperError`, raised at once, before any process starts or anything is written.  No torch import.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import FinetuneHelperError
from . import run_folder
from .launch import in_launcher
from .recipe import Recipe
from .setup import local_device


def check_run_folder(run_dir: Path, *, dry_run: bool, resume: bool) -> None:
    """Refuse, before anything is written, what would write over a run or a user's file."""
    if run_dir.exists() and not run_dir.is_dir():
        raise FinetuneHelperError("output-dir", f"{run_dir} is a file, not a folder")
    # a folder another run or resume holds is refused here, in a second, not after loading the stack to compare the
    # recipes; a launcher's workers train under their launcher's hold (and the lock itself still settles a race)
    if not in_launcher() and (pid := run_folder.holder(run_dir)) is not None:
        raise run_folder.in_use_error(run_dir, pid)
    _check_writable(run_dir)
    own = run_dir / run_folder.RECIPE
    if own.exists() and not run_folder.is_own_recipe(own):
        raise FinetuneHelperError("output-dir", f"{own} is not a recipe.yaml a run wrote (your own recipe?); a run "
                                  "writes its resolved recipe there: choose another --output-dir (nothing was written)")
    traces = run_folder.run_traces(run_dir)
    if dry_run and traces:
        raise FinetuneHelperError("output-dir", f"{run_dir} holds a run ({', '.join(traces)}); a dry run would rewrite "
                                  "its recipe.yaml, plan.json and training_args.json: give the dry run another "
                                  "--output-dir (nothing was written)")
    if not resume and not dry_run and traces:
        raise FinetuneHelperError("output-dir", f"{run_dir} already holds a run ({', '.join(traces)}); pass --resume "
                                  "(or finetune-helper resume) to continue it, or --output-dir for a new one "
                                  "(nothing was overwritten)")


def _check_writable(run_dir: Path) -> None:
    """The run folder can be created and written (before minutes of loading), or a one-line error; nothing is
    created here (a refused run leaves no folder behind)."""
    probe = run_dir.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise FinetuneHelperError("output-dir", f"cannot write in {run_dir}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise FinetuneHelperError("output-dir", f"cannot write in {run_dir}: {probe} is not writable")


#: recipe settings a resumed run may change: only how long it trains


def deepspeed_field(recipe: Recipe) -> str | None:
    """What makes ``recipe`` a DeepSpeed run, as :func:`check_deepspeed` names it (``hardware.strategy``'s ZeRO stage,
    or ``training.deepspeed``), or None when it is none."""
    from ..recommender.zero import ZERO_STAGES

    strategy = recipe.hardware.strategy
    if strategy in ZERO_STAGES:
        return strategy
    return "training.deepspeed" if "deepspeed" in recipe.training else None


def check_deepspeed(strategy: str, device: str | None = None, *, dry_run: bool = False) -> None:
    """A ZeRO run needs DeepSpeed installed, and CUDA GPUs (the Trainer's DeepSpeed path, through accelerate, does
    not run on the CPU); refused at once, before any process starts or anything loads."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise FinetuneHelperError("hardware.strategy", f"{strategy} runs DeepSpeed, which is not installed here: "
                                  "pip install deepspeed (or strategy fsdp)")
    if not dry_run and (device or local_device()) == "cpu":
        raise FinetuneHelperError("hardware.strategy", f"{strategy}: DeepSpeed runs on CUDA GPUs and this machine has "
                                  "none (the Trainer's DeepSpeed path does not train on the CPU): use fsdp or ddp "
                                  "here, or --dry-run to write the run's arguments")


def check_targets(recipe: Recipe, spec) -> None:
    """``method.target_modules`` against the model's linear layers, every name: PEFT matches by suffix and refuses
    only when no name matches, so ``[q_projj, v_proj]`` would silently train v_proj alone."""
    targets = recipe.method.target_modules
    if recipe.method.type == "full" or targets == "all-linear":
        return
    try:
        spec.lora_linears(tuple(targets) if isinstance(targets, list) else targets)
    except FinetuneHelperError as exc:
        raise FinetuneHelperError("method.target_modules", exc.message) from None


RESUMABLE_CHANGES = {"recommend.epochs", "training.max_steps", "training.num_train_epochs"}


def check_resume_matches(recipe: Recipe, run_dir: Path) -> bool:
    """``--resume`` continues the same run: what it was started with (:data:`run_folder.INPUTS`: the resolved recipe,
    ``training_args.json`` as the runner last wrote it, the data file's contents; for an older run, its recipe.yaml)
    must not have changed, but for the training length.  Refuses in one line naming what changed; returns whether
    the training length changed."""
    import yaml

    now = recipe.to_dict()
    changed = run_folder.changed_inputs(run_dir, now, RESUMABLE_CHANGES)
    started = run_folder.read_json(run_dir / run_folder.INPUTS)
    if isinstance(started, dict) and isinstance(started.get("recipe"), dict):
        before = run_folder.flat(started["recipe"])
        source = run_dir / run_folder.INPUTS
    else:
        saved_file = run_dir / run_folder.RECIPE
        if not saved_file.is_file():
            return False
        saved = yaml.safe_load(saved_file.read_text(encoding="utf-8")) or {}
        before, source = run_folder.flat(saved), saved_file
        changed = [key for key in sorted(set(before) | set(run_folder.flat(now)))
                   if key not in RESUMABLE_CHANGES and key != "output_dir"
                   and before.get(key) != run_folder.flat(now).get(key)]
    if changed:
        flat_now = run_folder.flat(now)
        details = "; ".join(f"{key}: {before.get(key)!r} then, {flat_now.get(key)!r} now" if key in before or
                            key in flat_now else key for key in changed)
        raise FinetuneHelperError(changed[0] if changed[0] in flat_now or changed[0] in before else "resume",
                                  f"the run was started with other inputs ({details}; recorded in {source}): resume "
                                  "continues the same run, only its length may change "
                                  f"({', '.join(sorted(RESUMABLE_CHANGES))}); use a new --output-dir for a different "
                                  "recipe")
    return any(before.get(key) != run_folder.flat(now).get(key) for key in RESUMABLE_CHANGES)


def saved_arguments(run_dir: Path) -> dict[str, Any]:
    """A resumed run's own ``training_args.json`` (the back-off's batch included), or a one-line refusal when it is
    missing or not a JSON object: never a re-plan that would write over the run's plan and arguments."""
    path = Path(run_dir) / run_folder.TRAINING_ARGS
    saved = run_folder.read_json(path)
    if not isinstance(saved, dict):
        what = "missing" if not path.exists() else "not readable as the run's arguments (a JSON object)"
        raise FinetuneHelperError("resume", f"{path} is {what}: resume continues with the arguments the run wrote "
                                  "there (nothing was changed); restore it, or start a new run with --output-dir")
    return saved
