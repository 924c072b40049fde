"""``finetune-helper probe``'s core: measure a recipe's real steps on this machine, next to the estimate, and the
calibration it yields.

At the micro-batch the runner would use, then (a bounded search) at larger ones, a few optimizer steps run through
the runner's own path (:func:`.runner_step.measure_recipe`).  Measured is ``torch.cuda.max_memory_allocated``
(and ``max_memory_reserved``) on a GPU, the peak of live tensor bytes on the CPU.  The estimate is that of the
setup that ran (``train.setup.executed_setup``) at the batch shape the collator made, without any calibration.
On a GPU the search stops at the first micro-batch that runs out of memory or reserves more than the allocator's
budget (usable memory less the CUDA context); on the CPU it measures two larger batches and judges nothing (the CPU has no such limit).
"""

from __future__ import annotations

import dataclasses
import datetime
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

#: larger micro-batches tried after the recommended one (each doubles it), at most
SEARCH_STEPS = 2


@dataclass
class ProbeRow:
    micro_batch: int
    #: the estimate of the step that ran, and what was measured
    estimated_bytes: int
    measured_bytes: int | None
    reserved_bytes: int | None = None
    #: False: out of memory or over the budget; None: not judged (CPU)
    fits: bool | None = None
    note: str = ""
    #: tokens per second over the steps after the first (the first pays for warm-up), and on a GPU with catalog
    #: rates the time model's prediction for the same steps
    tokens_per_second: float | None = None
    predicted_tokens_per_second: float | None = None

    @property
    def error(self) -> float | None:
        if not self.measured_bytes:
            return None
        return (self.estimated_bytes - self.measured_bytes) / self.measured_bytes


@dataclass
class ProbeResult:
    device: str
    model: str
    method: str
    measure: str
    budget_bytes: int | None
    rows: list[ProbeRow] = field(default_factory=list)

    @property
    def recommended(self) -> ProbeRow:
        return self.rows[0]

    @property
    def largest_fitting(self) -> int | None:
        fitting = [r.micro_batch for r in self.rows if r.fits]
        return max(fitting) if fitting else None

    def calibration(self):  # -> recommender.calibration.Calibration | None
        """The measured / estimated ratio at the recommended micro-batch, as a calibration to store."""
        from ..recommender.calibration import Calibration

        row = self.recommended
        if not row.measured_bytes or not row.estimated_bytes:
            return None
        speed = (round(row.tokens_per_second / row.predicted_tokens_per_second, 4)
                 if row.tokens_per_second and row.predicted_tokens_per_second else None)
        return Calibration(device=self.device, model=self.model, method=self.method,
                           ratio=round(row.measured_bytes / row.estimated_bytes, 4),
                           measured_bytes=row.measured_bytes, estimated_bytes=row.estimated_bytes,
                           micro_batch=row.micro_batch, date=datetime.date.today().isoformat(), measure=self.measure,
                           speed_ratio=speed, tokens_per_second=row.tokens_per_second)

    def to_dict(self) -> dict[str, Any]:
        return {**{k: v for k, v in dataclasses.asdict(self).items() if k != "rows"},
                "rows": [{**dataclasses.asdict(r), "error": r.error} for r in self.rows],
                "largest_fitting": self.largest_fitting}


def _device():
    """This machine's GPU (a ``GPUSpec``, named as the catalog names it: the calibration key), or None on a CPU."""
    import torch

    if torch.cuda.is_available():
        from ..recommender.gpu import detect_gpu

        return detect_gpu()
    return None


def _measure_at(recipe, micro: int, *, steps: int, run_dir: Path, gpu, budget: int | None,
                log: Callable[[str], None]) -> ProbeRow:
    import torch

    from ..recommender.memory import estimate_memory
    from ..train.setup import executed_setup
    from .runner_step import measure_recipe

    cuda = gpu is not None
    accumulation = recipe.training.get("gradient_accumulation_steps")
    training = {**recipe.training, "per_device_train_batch_size": micro}
    if accumulation is None:
        training["gradient_accumulation_steps"] = 1
    probed = dataclasses.replace(recipe, training=training)
    try:
        m = measure_recipe(probed, steps=steps, run_dir=run_dir / f"batch-{micro}", log=log, track=not cuda)
    except torch.OutOfMemoryError:
        return ProbeRow(micro, 0, None, None, False, "out of memory")
    spec = m.plan.request.model
    peak = m.peak
    shape, padded = peak.largest_batch
    setup = executed_setup(probed, spec, m.sft_kwargs, device="cuda" if cuda else "cpu", batch_shape=shape,
                           padded=padded, weights_dtype=m.plan.weights_dtype)
    accumulation = int(m.sft_kwargs.get("gradient_accumulation_steps", 1))
    estimated = estimate_memory(spec, setup, accumulation=accumulation)
    timed = m.steps[1:] or m.steps
    seconds = sum(s.seconds or 0 for s in timed)
    rate = sum(s.tokens for s in timed) / seconds if seconds else None
    if cuda:
        from ..recommender.throughput import step_time

        predicted = step_time(spec, dataclasses.replace(setup, padded=False), gpu, accumulation=accumulation)
        measured, reserved = peak.cuda_allocated, peak.cuda_reserved
        return ProbeRow(micro, estimated.allocated_peak, measured, reserved,
                        fits=reserved is not None and budget is not None and reserved <= budget,
                        tokens_per_second=rate,
                        predicted_tokens_per_second=predicted.tokens_per_second_per_gpu if predicted else None)
    return ProbeRow(micro, estimated.allocated_peak, peak.tracked_bytes, None, None,
                    f"batch {shape[0]} x {shape[-1]}{', padded' if padded else ''}", tokens_per_second=rate)


def probe_recipe(recipe, *, run_dir: str | Path, steps: int = 2, search: bool = True,
                 log: Callable[[str], None] = lambda _: None) -> ProbeResult:
    """Measure ``recipe``'s steps at the runner's micro-batch and, with ``search``, up to :data:`SEARCH_STEPS`
    doublings of it (stopping at the first that does not fit on a GPU)."""
    from ..train import runner

    run_dir = Path(run_dir)
    gpu = _device()
    device, cuda = (gpu.name, True) if gpu else ("cpu", False)
    prep, _ = runner.prepare(dataclasses.replace(recipe, training={**recipe.training, "max_steps": steps}),
                             run_dir / "plan", log, dry_run=True)
    micro = int(prep.sft_kwargs["per_device_train_batch_size"])
    budget = None
    if gpu is not None:
        from ..recommender.memory import CUDA_CONTEXT_BYTES

        # what the caching allocator may reserve: the usable memory less the CUDA context, which lives outside it
        budget = int(gpu.memory_bytes * (1 - prep.plan.request.safety_margin)) - CUDA_CONTEXT_BYTES
    result = ProbeResult(device=device, model=prep.plan.request.model.name, method=recipe.method.type,
                         measure="cuda max_memory_allocated" if cuda else "tracked live tensor bytes",
                         budget_bytes=budget)
    for i in range(1 + (SEARCH_STEPS if search else 0)):
        batch = micro * 2 ** i
        if i and (batch > len(prep.train_dataset) or batch > 1024):
            break
        log(f"probe: micro-batch {batch} ({steps} steps)")
        row = _measure_at(recipe, batch, steps=steps, run_dir=run_dir, gpu=gpu, budget=budget, log=log)
        result.rows.append(row)
        if row.fits is False:
            break
    return result


def format_table(result: ProbeResult) -> str:
    from ..units import fmt_gib

    lines = [f"probe on {result.device} ({result.measure}); {result.model}, {result.method}"
             + (f"; allocator budget {fmt_gib(result.budget_bytes)} (usable memory less the CUDA context)" if result.budget_bytes else "")]
    lines.append(f"{'micro-batch':>11}  {'estimated':>10}  {'measured':>10}  {'error':>7}  {'tokens/s':>9}  "
                 + ("predicted  reserved    fits" if result.budget_bytes else "note"))
    for r in result.rows:
        measured = fmt_gib(r.measured_bytes) if r.measured_bytes else "-"
        err = f"{r.error:+.1%}" if r.error is not None and math.isfinite(r.error) else "-"
        rate = f"{r.tokens_per_second:,.0f}" if r.tokens_per_second else "-"
        predicted = f"{r.predicted_tokens_per_second:,.0f}" if r.predicted_tokens_per_second else "-"
        tail = (f"{predicted:>9}  {fmt_gib(r.reserved_bytes) if r.reserved_bytes else '-':>10}  "
                f"{'yes' if r.fits else 'no'}" if result.budget_bytes else r.note)
        lines.append(f"{r.micro_batch:>11}  {fmt_gib(r.estimated_bytes):>10}  {measured:>10}  {err:>7}  {rate:>9}  "
                     + tail)
    return "\n".join(lines)
