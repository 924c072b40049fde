"""``finetune-helper run``: fine-tune from a recipe: recommend, write the run folder, train."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import sys

from ..errors import FinetuneHelperError, first_line

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
    add_launch_arguments(p)
    p.set_defaults(func=run, after=record_exit)


def add_launch_arguments(p: argparse.ArgumentParser) -> None:
    """Several GPUs / nodes: the run is launched with torch's launcher (torchrun), one process per GPU."""
    g = p.add_argument_group("several GPUs (torchrun; without CUDA: CPU processes with the gloo backend)")
    g.add_argument("--gpus", type=int, default=None, metavar="N",
                   help="processes per node, one per GPU (default: the recipe's hardware.gpus); on a machine without "
                        "CUDA, N CPU processes (gloo), so the launch path runs anywhere")
    g.add_argument("--nodes", type=int, default=1, metavar="M", help="nodes taking part (default 1)")
    g.add_argument("--node-rank", type=int, default=0, metavar="R", help="this node's rank, 0 to M-1")
    g.add_argument("--main-address", default="127.0.0.1", metavar="HOST", help="the rank-0 node's address")
    g.add_argument("--main-port", type=int, default=None, metavar="P", help="a free port on the rank-0 node "
                   "(default: one node takes a free port of its own; several nodes 29500)")


def run(args: argparse.Namespace) -> int:
    return dispatch(args, args.recipe, args.overrides, output_dir=args.output_dir, dry_run=args.dry_run,
                    resume=args.resume)


def dispatch(args: argparse.Namespace, recipe: str, overrides: list[str], *, output_dir: str | None, dry_run: bool,
             resume: bool) -> int:
    """One process, or (several GPUs or nodes, not a dry run, not already a launcher's worker) the launcher."""
    from ..train.launch import Launch, checkpoint_bytes, die_with_parent, in_launcher, launch, world_size
    from ..train.preflight import deepspeed_field
    from ..train.recipe import load_recipe
    from ..train.run_folder import LOCK, FolderLock
    from ..train.runner import absolute_paths, check_deepspeed, check_resume, check_run_folder, default_run_dir

    if in_launcher():  # a worker: torchrun gone (killed), it has nothing to report to and must not train on alone
        die_with_parent(signal.SIGKILL)
    loaded = load_recipe(recipe, overrides)  # a bad recipe fails here, at once, before any process starts
    gpus = args.gpus if args.gpus is not None else loaded.hardware.gpus
    spec = Launch(gpus=gpus, nodes=args.nodes, node_rank=args.node_rank, main_address=args.main_address,
                  main_port=args.main_port)
    world = world_size() if in_launcher() else spec.world  # a worker plans for the world it is part of
    # DeepSpeed starts from a launcher's environment even in one process (ZeRO-Offload on one GPU)
    deepspeed = deepspeed_field(loaded)
    if deepspeed and not in_launcher():
        check_deepspeed(deepspeed, dry_run=dry_run)
    if dry_run or in_launcher() or (world == 1 and not deepspeed):
        if world != loaded.hardware.gpus:
            overrides = [*overrides, f"hardware.gpus={world}"]
        if world == 1 and not in_launcher():
            # one GPU means one: without a launcher the Trainer would take every visible GPU (n_gpu > 1, which
            # SFTTrainer refuses); CUDA_VISIBLE_DEVICES chooses another, and is read before CUDA starts
            os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")
        return start(args, recipe, overrides, output_dir=output_dir, dry_run=dry_run, resume=resume)
    run_dir = default_run_dir(loaded, recipe, output_dir)
    overrides = [*overrides, f"hardware.gpus={spec.world}"]
    if spec.node_rank == 0:
        check_run_folder(run_dir, dry_run=False, resume=resume)
        # what one process checks before anything loads, checked here before N start (each would refuse alone)
        if resume and (nothing := check_resume(absolute_paths(load_recipe(recipe, overrides)), run_dir)):
            print(nothing, flush=True)
            return 0
    run_args = ["run", recipe, *overrides, "--output-dir", str(run_dir), *(["--resume"] if resume else [])]
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(run_dir)  # the launcher holds the folder for its workers, as long as any of them lives
    lock.acquire()
    try:
        print(f"launching {spec.gpus} process{'es' if spec.gpus > 1 else ''} on this node ({spec.world} in all): "
              f"{shlex.join(spec.command(run_args))}", flush=True)
        return launch(spec, run_args, run_dir, checkpoint_bytes=checkpoint_bytes(loaded))
    finally:
        lock.release()
        if created and {p.name for p in run_dir.iterdir()} <= {LOCK}:  # refused by the workers: leave no folder
            shutil.rmtree(run_dir, ignore_errors=True)


def start(args: argparse.Namespace, recipe: str, overrides: list[str], *, output_dir: str | None, dry_run: bool,
          resume: bool) -> int:
    """Run a recipe and print how it ended; ``args.run_state`` tells :func:`record_exit` whether the run got as far
    as writing its files."""
    from ..train.launch import is_main
    from ..train.runner import RunStopped, format_summary, run as run_recipe

    def log(line: str) -> None:
        print(line, flush=True)

    args.run_state = {}
    try:
        result = run_recipe(recipe, overrides, output_dir=output_dir, dry_run=dry_run, resume=resume, log=log,
                            state=args.run_state)
    except RunStopped as stop:
        if is_main():
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
        first = first_line(exc)
        print(f"{PROG}: error: run failed: {type(exc).__name__}: {first} (traceback in {path}; checkpoints in the "
              "run folder are kept)", file=sys.stderr)
        return 1
    if result.summary.get("status") == "done" and is_main():
        print()
        print(format_summary(result.summary))
    return result.exit_code


def record_exit(args: argparse.Namespace, code: int) -> None:
    """Leave the exit code in the run folder (the app reads it: how a run ended, even unwatched) -- unless the run
    was refused for the folder itself (it holds another run, or your own recipe.yaml) or found nothing to do (a
    finished run resumed): then nothing there changes."""
    from ..train.launch import is_main

    run_dir = getattr(args, "output_dir", None) or getattr(args, "run_dir", None)
    if not run_dir or not os.path.isdir(run_dir) or not is_main():
        return
    from ..train.run_folder import run_traces, write_exit

    state = getattr(args, "run_state", {})
    if state.get("wrote_files") or (state.get("folder_ok") and not run_traces(run_dir)):
        write_exit(run_dir, code)
