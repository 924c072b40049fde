"""Count the operators a micro-step issues: what eager PyTorch's host side does once per op.

In eager mode every ATen operator the step calls goes through Python, the dispatcher and autograd on the host
before its kernel is queued; the GPU cannot finish a micro-step sooner than the host issues its ops.  Small
micro-batches of large models are bound by that (Qwen's profile: Qwen-1.8B, -7B and -14B LoRA take 0.125, 0.15
and 0.2 s per 1 x 256-token micro-step on an A100, nearly in proportion to their layer count).

:func:`count_micro_step_ops` runs the runner's own step (``train.runner.prepare`` and ``build_trainer``, through
:func:`.runner_step.runner_trainer`, as :func:`.runner_step.measure_recipe` does) and counts, with a
``TorchDispatchMode``, every operator one ``Trainer.training_step`` dispatches: the forward, the loss and the backward
(with gradient checkpointing's recompute), not the optimizer step, which runs once per accumulation.  The time model
(``recommender.throughput``) reads per-layer counts from ``data/throughput.yaml`` (``host_ops``), which
``benchmarks/host_ops.py`` derives from these counts; the tests check the table against a fresh count.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class OpCount:
    """One micro-step's operator count and its host time on this machine."""

    #: ATen operators one ``training_step`` dispatched (views and in-place ops included: each is a host call)
    ops: int
    #: median wall time of a ``training_step`` (seconds) on this machine, tiny tensors: mostly host time
    seconds: float

    @property
    def seconds_per_op(self) -> float:
        return self.seconds / self.ops


def count_micro_step_ops(recipe, *, run_dir: str | Path, timed_steps: int = 0) -> OpCount:
    """Train a few micro-steps of ``recipe`` through the runner's path (:func:`.runner_step.runner_trainer`); count
    the operators of one (the third, after the first steps' one-time work) and time ``timed_steps`` more without the
    counter."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from .runner_step import runner_trainer

    class Counter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            return func(*args, **(kwargs or {}))

    counted_call = 3
    _, trainer = runner_trainer(recipe, run_dir=run_dir, max_steps=counted_call + timed_steps,
                                gradient_accumulation_steps=1, logging_steps=10_000)
    training_step = trainer.training_step
    counter, calls, times = Counter(), [0], []

    def counted(*args, **kwargs):
        calls[0] += 1
        if calls[0] == counted_call:
            with counter:
                return training_step(*args, **kwargs)
        start = time.perf_counter()
        out = training_step(*args, **kwargs)
        if calls[0] > counted_call:
            times.append(time.perf_counter() - start)
        return out

    trainer.training_step = counted
    trainer.train()
    return OpCount(ops=counter.ops, seconds=statistics.median(times) if times else float("nan"))
