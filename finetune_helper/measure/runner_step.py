"""Measure the runner's own training steps: the peak memory of what ``finetune-helper run`` executes.

:func:`measure_recipe` prepares a recipe exactly as the runner does (``train.runner.prepare``: its plan, its
``SFTConfig`` arguments, its data and collator) and builds the trainer with the runner's own ``_trainer`` (its
model loading: dtype, attention, quantization, PEFT), then trains a few optimizer steps and records each step's
peak:

* on CPU (and always, as a cross-check): the peak of live tensor bytes (:mod:`.tracker`), over the whole step --
  forward, backward, gradient clipping, the optimizer step, their transients;
* on CUDA: ``torch.cuda.max_memory_allocated`` and ``max_memory_reserved`` of the same step (peak statistics reset
  at every step begin).

Storages are labelled by the phase that created them (``weights``, ``forward``, ``backward``, ``optimizer``), so the
peak comes with what it is made of.  Nothing here is shared with the estimator: it measures, the estimator predicts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


@dataclass
class StepPeak:
    """One optimizer step's peak (gradient accumulation's micro-steps included)."""

    step: int
    #: peak of live tensor bytes (the tracker), with the op that reached it and the bytes by phase at that moment
    tracked_bytes: int
    peak_op: str
    by_phase: dict[str, int] = field(default_factory=dict)
    #: on CUDA: torch.cuda.max_memory_allocated / max_memory_reserved of this step
    cuda_allocated: int | None = None
    cuda_reserved: int | None = None
    #: the step's micro-batches: the token shape the collator produced (batch, sequence) and whether it padded a row
    batches: list[tuple[tuple[int, ...], bool]] = field(default_factory=list)
    #: FLOPs of the step as ``FlopCounterMode`` counts them (``.flops.flop_counter``), when counted
    flops: int | None = None
    #: wall seconds from the step's beginning to its end (CUDA synchronized first on a GPU)
    seconds: float | None = None

    @property
    def tokens(self) -> int:
        """Token positions of the step's micro-batches (rows x length as the collator made them)."""
        return sum(shape[0] * shape[-1] for shape, _ in self.batches)

    @property
    def largest_batch(self) -> tuple[tuple[int, ...], bool]:
        """The micro-batch with the most token positions (the one the step's peak is estimated at)."""
        return max(self.batches, key=lambda b: (b[0][0] * b[0][-1], b[1]))


@dataclass
class Measurement:
    steps: list[StepPeak]
    sft_kwargs: dict[str, Any]
    plan: Any
    device: str
    seconds: float
    #: per micro-step: the token shape the collator produced (batch, sequence) and whether it padded any row
    batches: list[tuple[tuple[int, ...], bool]] = field(default_factory=list)
    #: the class that trained (``SFTTrainer``, or ``Trainer`` for a recipe with ``trainer: transformers``)
    trainer_class: str = ""

    @property
    def peak(self) -> StepPeak:
        """The step with the highest peak: CUDA's allocated on a GPU, else the tracked one (the first step has no
        optimizer states during its backward)."""
        if self.device == "cuda":
            return max(self.steps, key=lambda s: s.cuda_allocated or 0)
        return max(self.steps, key=lambda s: s.tracked_bytes)

    @property
    def cuda_allocated(self) -> int | None:
        values = [s.cuda_allocated for s in self.steps if s.cuda_allocated is not None]
        return max(values) if values else None

    @property
    def cuda_reserved(self) -> int | None:
        values = [s.cuda_reserved for s in self.steps if s.cuda_reserved is not None]
        return max(values) if values else None


def _phase_callback(mode, steps: list[StepPeak], cuda: bool, batches: list[tuple[tuple[int, ...], bool]],
                    counter=None):
    import torch
    from transformers import TrainerCallback

    first = [0]  # index in ``batches`` of the step's first micro-batch
    counted = [0]  # the counter's total at the step's beginning
    began = [0.0]  # the step's wall-clock start

    class Phases(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            first[0] = len(batches)
            counted[0] = counter.get_total_flops() if counter is not None else 0
            mode.reset_peak()
            mode.phase("forward")
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            began[0] = time.perf_counter()

        def on_pre_optimizer_step(self, args, state, control, **kw):
            mode.phase("optimizer")

        def on_optimizer_step(self, args, state, control, **kw):
            mode.phase("after-step")

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - began[0]
            steps.append(StepPeak(seconds=seconds,
                step=state.global_step, tracked_bytes=mode.peak, peak_op=mode.peak_op, by_phase=mode.peak_by_label,
                cuda_allocated=torch.cuda.max_memory_allocated() if cuda else None,
                cuda_reserved=torch.cuda.max_memory_reserved() if cuda else None, batches=batches[first[0]:],
                flops=counter.get_total_flops() - counted[0] if counter is not None else None))

    return Phases()


def runner_trainer(recipe, *, run_dir: str | Path, log: Callable[[str], None] = lambda _: None, **training: Any):
    """``recipe`` prepared and its trainer built as the runner does (``train.runner.prepare`` and ``build_trainer``),
    for measuring a few steps: no saving, evaluation, eval split or reporting, and ``training`` over the recipe's
    training section.  Returns (the preparation, the trainer)."""
    import dataclasses

    from ..train import runner

    training = {**recipe.training, "save_strategy": "no", "eval_strategy": "no", "report_to": "none", **training}
    recipe = dataclasses.replace(recipe, training=training, data=dataclasses.replace(recipe.data, eval_fraction=0.0))
    prep, tokenizer = runner.prepare(recipe, Path(run_dir), log)
    return prep, runner.build_trainer(prep, tokenizer, dict(prep.sft_kwargs), [])


def measure_recipe(recipe, *, steps: int = 3, run_dir: str | Path, log: Callable[[str], None] = lambda _: None,
                   track: bool = True, flops: bool = False) -> Measurement:
    """Train ``steps`` optimizer steps of ``recipe`` through the runner's path and measure each step's peak.

    ``recipe`` is a ``train.recipe.Recipe``; its ``training`` section is used as the runner uses it, with
    ``max_steps=steps`` and no saving, evaluation or logging output added.  ``track=False`` skips the tracker
    (CUDA statistics only: the tracker slows large models down); ``flops`` counts each step's FLOPs as well
    (:func:`.flops.flop_counter`)."""
    from contextlib import ExitStack

    import torch

    from .tracker import live_bytes_mode, model_tensors

    prep, trainer = runner_trainer(recipe, run_dir=run_dir, log=log, max_steps=steps, logging_steps=1)
    cuda = torch.cuda.is_available() and not prep.sft_kwargs.get("use_cpu")
    mode = live_bytes_mode()
    peaks: list[StepPeak] = []
    batches: list[tuple[tuple[int, ...], bool]] = []
    counter = None
    if flops:
        from .flops import flop_counter

        counter = flop_counter()
    trainer.add_callback(_phase_callback(mode, peaks, cuda, batches, counter))
    compute_loss = trainer.compute_loss

    def labelled_compute_loss(model, inputs, *args, **kwargs):
        mode.phase("forward")
        mask = inputs.get("attention_mask")
        batches.append((tuple(inputs["input_ids"].shape), bool(mask is not None and not bool(mask.all()))))
        loss = compute_loss(model, inputs, *args, **kwargs)
        mode.phase("backward")
        return loss

    trainer.compute_loss = labelled_compute_loss
    mode.register(model_tensors(trainer.model), "weights")
    t0 = time.time()
    with ExitStack() as stack:
        if counter is not None:
            stack.enter_context(counter)
        if track:
            stack.enter_context(mode)
        trainer.train()
    return Measurement(steps=peaks, sft_kwargs=dict(prep.sft_kwargs), plan=prep.plan,
                       device="cuda" if cuda else "cpu", seconds=round(time.time() - t0, 2), batches=batches,
                       trainer_class=type(trainer).__name__)
