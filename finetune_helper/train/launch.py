"""Several processes, one run: ``finetune-helper run`` re-executed under torch's own launcher.

``run RECIPE --gpus N [--nodes M --node-rank R --main-address HOST --main-port P]`` starts
``python -m torch.distributed.run`` (torchrun) with N processes per node, each running ``finetune_helper run`` on
the same recipe and run folder with ``hardware.gpus`` set to the world size; transformers' Trainer (through
accelerate) reads torchrun's environment and trains data parallel (DDP, or FSDP when the plan shards): NCCL on
CUDA, gloo on CPU, so the same launch path runs on a machine without a GPU.  Rank 0 alone checks and writes the run
folder (``recipe.yaml``, ``plan.json``, ``metrics.jsonl``, ``summary.json``, ``final/``, ``exit.json``) and prints;
the Trainer saves checkpoints from the main process and every rank resumes from them.  No torch import here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import FinetuneHelperError
from . import run_folder


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
    #: the rank-0 node's address and a free port on it (torchrun's --master_addr / --master_port)
    main_address: str = "127.0.0.1"
    main_port: int = 29500

    def __post_init__(self) -> None:
        if self.gpus < 1:
            raise FinetuneHelperError("gpus", f"must be >= 1, got {self.gpus}")
        if self.nodes < 1:
            raise FinetuneHelperError("nodes", f"must be >= 1, got {self.nodes}")
        if not 0 <= self.node_rank < self.nodes:
            raise FinetuneHelperError("node-rank", f"must be in [0, {self.nodes}), got {self.node_rank}")
        if not 0 < self.main_port < 65536:
            raise FinetuneHelperError("main-port", f"must be a TCP port (1-65535), got {self.main_port}")

    @property
    def world(self) -> int:
        return self.gpus * self.nodes

    def command(self, run_args: list[str]) -> list[str]:
        """The launcher's command line for ``finetune_helper`` ``run_args``."""
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={self.gpus}",
                f"--nnodes={self.nodes}", f"--node_rank={self.node_rank}", f"--master_addr={self.main_address}",
                f"--master_port={self.main_port}", "-m", "finetune_helper", *run_args]


def launch(spec: Launch, run_args: list[str], run_dir: Path) -> int:
    """Run the workers and wait; the exit code is rank 0's (``exit.json``: the launcher itself only says that a
    worker failed), else the launcher's.  Ctrl-C / SIGTERM (the app's Stop) is passed on to the launcher, which
    passes it to the workers: they save a checkpoint at the end of the step and exit."""
    started = time.time()
    proc = subprocess.Popen(spec.command(run_args), stdin=subprocess.DEVNULL)

    def forward(signum, frame):  # noqa: ARG001
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
