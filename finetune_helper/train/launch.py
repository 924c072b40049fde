"""Several processes, one run: ``finetune-helper run`` re-executed under torch's own launcher.

``run RECIPE --gpus N [--nodes M --node-rank R --main-address HOST --main-port P]`` starts
torch's launcher (torchrun, through :mod:`.torchrun`, which only ends it quietly) with N processes per node, each running ``finetune_helper run`` on
the same recipe and run folder with ``hardware.gpus`` set to the world size; transformers' Trainer (through
accelerate) reads torchrun's environment and trains data parallel (DDP, or FSDP when the plan shards): NCCL on
CUDA, gloo on CPU, so the same launch path runs on a machine without a GPU.  Rank 0 alone checks and writes the run
folder (``recipe.yaml``, ``plan.json``, ``metrics.jsonl``, ``summary.json``, ``final/``, ``exit.json``) and prints;
the Trainer saves checkpoints from the main process and every rank resumes from them.  No torch import here.

One node takes torchrun's standalone rendezvous (a free port of its own, so that concurrent runs on disjoint GPUs
never meet on one port); several nodes meet at ``--main-address``:``--main-port``.  A Stop or Ctrl-C reaches
torchrun once, from this process, and torchrun waits for its workers to finish their checkpoint for
:func:`shutdown_timeout` seconds before it kills them.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import FinetuneHelperError
from ..units import MiB
from . import run_folder

#: torchrun's own ``--master_port`` default, for a launch over several nodes that names none
TORCHRUN_PORT = 29500
#: how long torchrun waits, after passing a signal on to its workers, before it SIGKILLs them
#: (``LaunchConfig.shutdown_timeout``, torch/distributed/launcher/api.py; 30 s when unset).  It came with
#: ``--shutdown-timeout`` (pytorch/pytorch#172596, 2026): a torchrun from before ignores the variable and keeps 30 s,
#: where the option would stop it from starting at all
SHUTDOWN_TIMEOUT_ENV = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"
#: at most what one checkpoint writes per trainable parameter: the K = 12 bytes of fp32 weights, momentum and
#: variance of mixed-precision Adam (ZeRO, Rajbhandari et al. 2020, section 3.1; the Trainer's optimizer.pt with
#: fp32 weights in the model file holds 4 + 8) and the 16-bit weights twice (DeepSpeed's module states and the
#: Trainer's model.safetensors)
CHECKPOINT_BYTES_PER_PARAMETER = 12 + 2 + 2
#: the disk write rate the shutdown wait assumes: 125 MiB/s, the baseline throughput of AWS EBS's general-purpose
#: gp3 volumes (a slow, common cloud disk; local NVMe writes GB/s)
DISK_BYTES_PER_SECOND = 125 * MiB
#: the least the shutdown waits, an assumption: the step in progress ends before the save starts (the runner stops
#: at the end of a step), and a step of a large offloaded model takes a minute or more
SHUTDOWN_FLOOR_SECONDS = 300


def in_launcher() -> bool:
    """Whether this process is one of a launcher's workers (torchrun / accelerate set these)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_main() -> bool:
    """Rank 0 (or no launcher): the process that checks and writes the run folder and prints."""
    return rank() == 0


@dataclass(frozen=True)
class Launch:
    """Where the processes go: ``gpus`` per node (CPU processes without CUDA) on ``nodes`` nodes."""

    #: processes per node: one per GPU
    gpus: int
    #: nodes taking part; each runs the same command with its own ``node_rank``
    nodes: int = 1
    node_rank: int = 0
    #: the rank-0 node's address and a free port on it (torchrun's --master_addr / --master_port); without a port,
    #: one node takes torchrun's standalone rendezvous (free ports of its own) and several nodes 29500
    main_address: str = "127.0.0.1"
    main_port: int | None = None

    def __post_init__(self) -> None:
        if self.gpus < 1:
            raise FinetuneHelperError("gpus", f"must be >= 1, got {self.gpus}")
        if self.nodes < 1:
            raise FinetuneHelperError("nodes", f"must be >= 1, got {self.nodes}")
        if not 0 <= self.node_rank < self.nodes:
            raise FinetuneHelperError("node-rank", f"must be in [0, {self.nodes}), got {self.node_rank}")
        if self.main_port is not None and not 0 < self.main_port < 65536:
            raise FinetuneHelperError("main-port", f"must be a TCP port (1-65535), got {self.main_port}")

    @property
    def world(self) -> int:
        return self.gpus * self.nodes

    def command(self, run_args: list[str]) -> list[str]:
        """The launcher's command line for ``finetune_helper`` ``run_args``."""
        if self.nodes == 1 and self.main_port is None:
            meet = ["--standalone"]  # a c10d store on a free port (torch/distributed/run.py: localhost:0)
        else:
            meet = [f"--master_addr={self.main_address}", f"--master_port={self.main_port or TORCHRUN_PORT}"]
        return [sys.executable, "-m", "finetune_helper.train.torchrun", f"--nproc_per_node={self.gpus}",
                f"--nnodes={self.nodes}", f"--node_rank={self.node_rank}", *meet, "-m", "finetune_helper", *run_args]


def checkpoint_bytes(recipe) -> int | None:
    """At most what one checkpoint of ``recipe``'s run writes: :data:`CHECKPOINT_BYTES_PER_PARAMETER` per trainable
    parameter, counted as the planner counts them (the whole model for full fine-tuning; the adapter for LoRA /
    QLoRA, whose checkpoints hold it alone: PEFT saves the adapter, and the Trainer has DeepSpeed exclude frozen
    parameters); None when the model cannot be described here (a Hub id that cannot be fetched)."""
    from .recipe import BUILTIN_MODEL, resolve_recipe_model
    from .tiny import base_model_dir

    try:
        spec = resolve_recipe_model(str(base_model_dir()) if recipe.model.name == BUILTIN_MODEL else recipe.model.name)
    except FinetuneHelperError:
        return None
    method = recipe.method
    targets = method.target_modules if isinstance(method.target_modules, str) else tuple(method.target_modules)
    trainable = spec.num_parameters() if method.type == "full" else spec.lora_parameters(method.lora_r, targets)
    return trainable * CHECKPOINT_BYTES_PER_PARAMETER


def shutdown_timeout(checkpoint_bytes: int | None) -> int:
    """Seconds torchrun lets its workers take, after a Stop, to finish their checkpoint: writing
    ``checkpoint_bytes`` at :data:`DISK_BYTES_PER_SECOND`, and never less than :data:`SHUTDOWN_FLOOR_SECONDS`."""
    return max(SHUTDOWN_FLOOR_SECONDS, math.ceil((checkpoint_bytes or 0) / DISK_BYTES_PER_SECOND))


#: ``prctl`` option 1 (linux/prctl.h): the signal a process receives when its parent dies
_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int) -> None:
    """Have the kernel send ``sig`` to this process when its parent dies (Linux ``prctl(PR_SET_PDEATHSIG)``; a
    no-op elsewhere), and act at once if the parent is already gone: so that no process of a run outlives the one
    that started it (torchrun starts its workers in sessions of their own, out of reach of a signal to a group)."""
    import ctypes

    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), sig)


def run_processes(run_dir: Path) -> list[int]:
    """The live processes of the run in ``run_dir``: every finetune-helper process (``-m finetune_helper``, the
    ``finetune-helper`` script, torchrun running it) whose command line names the run folder or a file in it (the
    command, torchrun and its workers all carry ``--output-dir RUN_DIR`` or ``RUN_DIR/recipe.yaml``; Linux
    ``/proc``, empty elsewhere).  Zombies (exited, not yet reaped) do not count, nor other programs reading the
    folder (a ``tail -f`` of its log)."""
    folder = str(Path(run_dir).resolve())
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            argv = [Path(a.decode()).expanduser() for a in (entry / "cmdline").read_bytes().split(b"\0")[:-1]]
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, UnicodeDecodeError, IndexError, ValueError):
            continue
        if state == "Z" or int(entry.name) == os.getpid() or not any(
                a.name in ("finetune_helper", "finetune-helper") for a in argv):
            continue
        cwd = _cwd(entry)
        for arg in argv:
            path = str(arg if arg.is_absolute() or cwd is None else (cwd / arg))
            if path == folder or path.startswith(folder + os.sep):
                found.append(int(entry.name))
                break
    return sorted(found)


def _cwd(entry: Path) -> Path | None:
    try:
        return Path(os.readlink(entry / "cwd"))
    except OSError:
        return None


def launch(spec: Launch, run_args: list[str], run_dir: Path, *, checkpoint_bytes: int | None = None) -> int:
    """Run the workers and wait; the exit code is rank 0's (``exit.json``: the launcher itself only says that a
    worker failed), else the launcher's.

    Ctrl-C / SIGTERM (the app's Stop) is passed on to the launcher, which passes it to the workers: they save a
    checkpoint at the end of the step and exit, within :func:`shutdown_timeout` of ``checkpoint_bytes`` (a wait
    set in the environment is kept).  torchrun runs in a session of its own (as it starts its workers), so that a
    terminal's Ctrl-C reaches it once, through here: a second signal would cut its wait for the workers short;
    later signals are not passed on (the workers are saving)."""
    started = time.time()
    env = dict(os.environ)
    env.setdefault(SHUTDOWN_TIMEOUT_ENV, str(shutdown_timeout(checkpoint_bytes)))
    # torchrun dies with this process: killed, it still gets a SIGTERM, and stops its workers with a checkpoint
    proc = subprocess.Popen(spec.command(run_args), stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                            preexec_fn=lambda: die_with_parent(signal.SIGTERM))
    stopping: list[str] = []

    def forward(signum, frame):  # noqa: ARG001
        name = signal.Signals(signum).name
        if stopping:
            print(f"{name}: already stopping after {stopping[0]}: the processes finish their checkpoint (up to "
                  f"{env[SHUTDOWN_TIMEOUT_ENV]} s)", file=sys.stderr, flush=True)
            return
        stopping.append(name)
        proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    record = run_folder.read_json(Path(run_dir) / run_folder.EXIT) or {}
    if code != 0 and isinstance(record.get("returncode"), int) and record.get("time", 0) >= started:
        return record["returncode"]
    return code
