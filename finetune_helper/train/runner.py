"""``finetune-helper run``: a recipe, filled in by the recommender, trained with the real Hugging Face stack.

The run folder (``--output-dir``, default ``runs/<recipe name>``) holds, before training starts:
``recipe.yaml`` (the fully resolved recipe), ``plan.json`` (the recommendation with its reasons, the recipe's
overrides and what was adapted to this machine) and ``training_args.json`` (readable by
``HfArgumentParser(SFTConfig).parse_json_file``); then ``checkpoint-N/`` folders (safetensors), ``metrics.jsonl``
(one line per logged step), ``final/`` (the model or LoRA adapter, with the tokenizer) and ``summary.json``.

Exit codes (:mod:`.outcome`): 0 done; 2 bad input; 3 stopped because the loss diverged; 4 out of memory even at
per-device batch 1; 130 interrupted by Ctrl-C / SIGTERM after saving a checkpoint (``--resume`` continues).

This module is the entry point and runs the phases in order, each a module of its own: :mod:`.preflight` (what
must hold before anything loads), :mod:`.prepare` (model, tokenizer, data, plan and the run's ``SFTConfig``
arguments from :mod:`.arguments`), :mod:`.load` (the model and the trainer), :mod:`.backoff` (training with the
out-of-memory back-off) and :mod:`.finish` (summary, ``final/``, how the run ended).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any, Callable

from ..errors import FinetuneHelperError
from ..units import fmt_gib
from . import launch, run_folder
from .arguments import check_training_values
from .backoff import train_with_backoff
from .callbacks import resume_reference, runner_callbacks
from .finish import finish, format_summary, stop_early, training_summary
from .load import build_trainer, load_model
from .outcome import EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_OK, EXIT_OOM, RunResult, RunStopped
from .preflight import RESUMABLE_CHANGES, check_deepspeed, check_resume_matches, check_run_folder, saved_arguments
from .prepare import Prepared, prepare, write_run_files
from .recipe import Recipe, load_recipe
from .run_folder import last_checkpoint, write_json
from .setup import run_estimate, run_setup


def train(prep: Prepared, tokenizer, *, resume: bool = False, log: Callable[[str], None] = print,
          extra_callbacks: list | None = None, state: dict[str, Any] | None = None) -> RunResult:
    """Train with OOM back-off; ``state`` is shared with the signal handler ``run`` installs."""
    import torch

    run_dir = prep.run_dir
    state = state if state is not None else {}
    if resume and (first := resume_reference(run_dir)) is not None:
        state["first_loss"] = first  # the divergence guard's reference
    if torch.cuda.is_available():
        state.update(cuda=True)
    callbacks = list(extra_callbacks or []) + runner_callbacks(run_dir, log, state)
    t0 = time.time()
    start, skipped = run_folder.resume_point(run_dir) if resume else (None, [])
    for path, why in skipped if start is not None else ():
        log(f"{path.name} is incomplete ({why}): resuming from {start.name}")
    trainer, output, oom_events, before = train_with_backoff(prep, tokenizer, callbacks,
                                                              str(start) if start else None, state, log)
    state["phase"] = "finishing"
    summary = {**training_summary(prep, trainer, output, state), "oom_backoffs": oom_events,
               "wall_seconds": round(time.time() - t0, 2)}
    if state.get("diverged") or state.get("signal"):
        stop_early(run_dir, summary, state)
    finish(prep, trainer, tokenizer, summary, before)
    summary["status"] = "done"
    summary["processes"] = launch.world_size()
    if launch.is_main():
        write_json(run_dir / run_folder.SUMMARY, summary)
    return RunResult(run_dir, EXIT_OK, summary)


# ------------------------------------------------------------------------------------------- entry point
def run(recipe_path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, output_dir: str | None = None,
        dry_run: bool = False, resume: bool = False, log: Callable[[str], None] = print,
        extra_callbacks: list | None = None, state: dict[str, Any] | None = None) -> RunResult:
    """Run ``recipe_path`` into its run folder.  ``state`` (optional, shared with the caller) says how far the run
    came: ``state["folder_ok"]`` once the run folder's checks passed, ``state["wrote_files"]`` once it wrote its
    run files (a refused run writes nothing)."""
    state = state if state is not None else {}
    recipe = absolute_paths(load_recipe(recipe_path, overrides))
    run_dir = default_run_dir(recipe, recipe_path, output_dir)
    main = launch.is_main()
    if not main:  # one of several processes: rank 0 checks, writes and prints
        log = _silent
    else:
        check_run_folder(run_dir, dry_run=dry_run, resume=resume)
    state["folder_ok"] = True  # nothing in the folder stands in the way (its exit code may be recorded)
    if resume and (nothing := check_resume(recipe, run_dir)):
        log(nothing)
        return RunResult(run_dir, EXIT_OK, {"status": "finished", "message": nothing})
    # one writer: held from here (a folder that exists) or from the first write (a new one), to the end; a launcher's
    # workers write under their launcher's lock
    lock = state["lock"] = run_folder.FolderLock(run_dir)
    if main and not launch.in_launcher() and run_dir.is_dir():
        lock.acquire()
    state["phase"] = "preparing"

    def on_signal(signum, frame):  # noqa: ARG001
        name = signal.Signals(signum).name
        if state["phase"] == "preparing":
            raise RunStopped(EXIT_INTERRUPTED, f"interrupted by {name} before training started; nothing to resume")
        if state["phase"] == "finishing":
            log(f"{name}: finishing the final save first")
            return
        state["signal"] = name
        log(f"{name}: saving a checkpoint at the end of this step, then stopping")

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _run(recipe, run_dir, dry_run=dry_run, resume=resume, log=log, extra_callbacks=extra_callbacks,
                    state=state)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        lock.release()


def check_resume(recipe: Recipe, run_dir: Path) -> str | None:
    """What a resume must pass before anything loads (one process, or the launcher before it starts N): a complete
    checkpoint, readable saved arguments, a length above 0, the same inputs but for the length.  Returns the message
    when there is nothing to resume (finished, or the length asked for is behind the checkpoint), else None."""
    start, skipped = run_folder.resume_point(run_dir)
    if start is None:
        raise FinetuneHelperError("resume", f"no complete checkpoint in {run_dir} to resume from" + (
            f" ({skipped[-1][0].name}: {skipped[-1][1]})" if skipped else ""))
    saved_arguments(run_dir)  # an unreadable training_args.json is refused here, before anything is written
    check_training_values(recipe.training)  # a length of 0 or less too
    longer = check_resume_matches(recipe, run_dir)
    if run_folder.finished(run_dir) and not longer:
        return (f"{run_dir} finished already (summary.json); nothing to resume and nothing was changed. To train "
                f"longer, raise its length: {' or '.join(sorted(RESUMABLE_CHANGES))}")
    behind = _at_or_past(recipe, start)
    return f"{run_dir}: {behind}; nothing to resume and nothing was changed" if behind else None


def _at_or_past(recipe: Recipe, checkpoint: Path) -> str | None:
    """Why a resume from ``checkpoint`` would train nothing -- the length asked for (``training.max_steps``, or the
    epochs) is at or below where the checkpoint is -- or None.  (The Trainer would still take a step, and write
    final/ and the summary anew.)"""
    state = run_folder.read_json(checkpoint / "trainer_state.json") or {}
    step, epoch = state.get("global_step"), state.get("epoch")
    max_steps = recipe.training.get("max_steps")
    if isinstance(max_steps, int) and max_steps > 0:
        if isinstance(step, int) and max_steps <= step:
            return f"training.max_steps={max_steps} is at or below {checkpoint.name}'s step {step}"
        return None
    epochs = recipe.training.get("num_train_epochs", recipe.recommend.epochs)
    if isinstance(epochs, (int, float)) and isinstance(epoch, (int, float)) \
            and epochs <= epoch:
        return f"{epochs:g} epochs is at or below {checkpoint.name}'s {epoch:.3g} epochs"
    return None


def absolute_paths(recipe: Recipe) -> Recipe:
    """The recipe with a local data file and model folder as absolute paths, so that the run folder's recipe.yaml
    resumes from any working directory (``finetune-helper resume RUN_DIR``)."""
    data, model = Path(recipe.data.path).expanduser(), Path(recipe.model.name).expanduser()
    if not recipe.data.path.startswith("builtin:") and data.exists():
        recipe.data.path = str(data.resolve())
    if not recipe.model.name.startswith("builtin:") and model.is_dir():
        recipe.model.name = str(model.resolve())
    return recipe


def _silent(line: str) -> None:  # noqa: ARG001 - the log of a process other than rank 0
    return None


def default_run_dir(recipe: Recipe, recipe_path: str | Path, output_dir: str | None) -> Path:
    """``--output-dir``, else the recipe's ``output_dir``, else ``runs/<recipe file stem>``."""
    return Path(output_dir or recipe.output_dir or Path("runs") / Path(recipe_path).stem)


def _run(recipe: Recipe, run_dir: Path, *, dry_run: bool, resume: bool, log: Callable[[str], None],
         extra_callbacks: list | None, state: dict[str, Any]) -> RunResult:
    prep, tokenizer = prepare(recipe, run_dir, log, dry_run=dry_run, resume=resume)
    plan = prep.plan
    if prep.resumed:
        a = prep.sft_kwargs
        log(f"resuming with the run's own training_args.json: per-device batch {a['per_device_train_batch_size']} x "
            f"accumulation {a['gradient_accumulation_steps']}, lr {a['learning_rate']:.2e}")
    else:
        log(f"plan: per-device batch {plan.per_device_train_batch_size} x accumulation "
            f"{plan.gradient_accumulation_steps} x {plan.request.gpus} GPU = {plan.effective_batch_size}, lr "
            f"{plan.learning_rate:.2e}, warmup {plan.warmup_ratio:.1%}, {plan.optim}, checkpointing "
            f"{'on' if plan.gradient_checkpointing else 'off'} ({'fits' if plan.fits else 'DOES NOT FIT'}: "
            f"{plan.reasons['fits']})")
    for key, value in prep.overrides.items():
        log(f"override from the recipe's training section: {key}={value!r} (wins over the recommendation)")
    estimate = run_estimate(prep)
    log(f"estimate of the step training_args.json runs ({run_setup(prep, prep.sft_kwargs).device}): "
        f"{fmt_gib(estimate.allocated_peak)} peak tensor memory, at the {estimate.peak_phase}")
    for note in prep.adaptations:
        log(f"adapted: {note}")
    if launch.is_main():
        if not launch.in_launcher():
            run_dir.mkdir(parents=True, exist_ok=True)
            state["lock"].acquire()
        write_run_files(prep)
        state["wrote_files"] = True
    log(f"wrote {run_dir}/recipe.yaml, training_args.json" + (" (plan.json: the run's own, kept)" if prep.resumed
                                                                 else ", plan.json"))
    if dry_run:
        return RunResult(run_dir, EXIT_OK, {"status": "dry-run", "run_dir": str(run_dir)})
    return train(prep, tokenizer, resume=resume, log=log, extra_callbacks=extra_callbacks, state=state)


#: the runner's own entry points, and the phases' names its callers and tests reach through it
__all__ = ["run", "prepare", "train", "RunResult", "RunStopped", "format_summary", "EXIT_OK", "EXIT_DIVERGED",
           "EXIT_INTERRUPTED", "EXIT_OOM", "Prepared", "build_trainer", "load_model", "check_training_values",
           "check_deepspeed", "check_run_folder", "last_checkpoint", "run_estimate", "run_setup", "write_run_files",
           "default_run_dir", "check_resume", "absolute_paths"]
