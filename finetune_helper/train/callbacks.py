"""The runner's ``TrainerCallback``s: progress (a line per log and ``metrics.jsonl``) and the guard (divergence
stop, a clean stop on SIGINT / SIGTERM).  They share a ``state`` dict with the runner and its signal handler.

:func:`watch_start_loss` records, on the trainer the runner built, what the guard and the doctor judge against:
the loss before training (``state["start_loss"]``) and the vocabulary size (``state["vocab_size"]``, whose log is
the loss of a uniform prediction).  The first log writes both into ``metrics.jsonl`` as a step-0 record
(``{"step": 0, "start_loss": ..., "uniform_loss": ...}``), which a resumed run reads back
(:func:`resume_reference`) and ``finetune-helper doctor`` uses."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable

from ..units import fmt_duration
from . import launch, run_folder
from .divergence import PATIENCE, DivergenceGuard, uniform_loss


def runner_callbacks(run_dir: Path, log: Callable[[str], None], state: dict[str, Any]):
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """Steps, loss, tokens/s and ETA on every log, and one JSON line per log in metrics.jsonl."""

        def on_train_begin(self, args, st, control, **kw):
            self.t0 = time.time()
            self.start_step = st.global_step
            self.tokens0 = state["tokens_at_start"] = st.num_input_tokens_seen or 0
            state["step_at_start"] = st.global_step
            self.wrote_start = False
            if st.global_step and st.is_world_process_zero:
                # resumed from a checkpoint: what an abandoned attempt logged past it is no longer the run's curve
                # (run_folder.read_metrics drops it at this mark)
                with open(run_dir / run_folder.METRICS, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps({"step": st.global_step, "resumed_at": st.global_step,
                                         "wall_time": round(time.time(), 3)}) + "\n")

        def on_log(self, args, st, control, logs=None, **kw):
            if not st.is_world_process_zero:  # several processes: rank 0 writes and prints
                return
            logs = dict(logs or {})
            elapsed = time.time() - self.t0
            done = st.global_step - self.start_step
            eta = elapsed / done * (st.max_steps - st.global_step) if done else float("nan")
            tokens = (st.num_input_tokens_seen or 0) - self.tokens0
            record = {"step": st.global_step, "max_steps": st.max_steps, "time": round(elapsed, 3),
                      "wall_time": round(time.time(), 3), **logs,
                      "tokens_per_second": tokens / elapsed if elapsed > 0 else None,
                      "eta_seconds": round(eta, 1) if math.isfinite(eta) else None}
            predicted = (state.get("predicted_speed") or {}).get("tokens_per_second_per_gpu")
            if predicted and state.get("cuda"):  # the prediction is for the plan's GPU: next to a GPU's rate only
                record["predicted_tokens_per_second"] = predicted * launch.world_size()
            if state.get("cuda"):  # measured vs estimated, live in the app
                import torch

                record["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
                record["estimated_peak_memory_bytes"] = state.get("estimated_peak_memory_bytes")
            lines = [record]
            if not self.wrote_start and state.get("start_loss") is not None:
                self.wrote_start = True
                lines.insert(0, start_record(state["start_loss"], state.get("vocab_size")))
            with open(run_dir / run_folder.METRICS, "a", encoding="utf-8") as fh:
                fh.writelines(json.dumps(line) + "\n" for line in lines)
            if "loss" in logs:
                log(f"step {st.global_step}/{st.max_steps} | loss {logs['loss']:.4f} | lr {logs.get('learning_rate', 0):.2e}"
                    f" | {record['tokens_per_second'] or 0:,.0f} tok/s | ETA {fmt_duration(eta)}")
            elif "eval_loss" in logs:
                log(f"step {st.global_step}/{st.max_steps} | eval loss {logs['eval_loss']:.4f}")

    class Guard(TrainerCallback):
        """Divergence stop (:mod:`.divergence`) and a clean stop on SIGINT/SIGTERM."""

        def __init__(self) -> None:
            self.guard: DivergenceGuard | None = None

        def on_log(self, args, st, control, logs=None, **kw):
            loss = (logs or {}).get("loss")
            if loss is None:
                return
            if self.guard is None:  # at the first log the loss before training is known (a resumed run: its own)
                self.guard = DivergenceGuard(reference=state.get("start_loss", state.get("first_loss")),
                                             uniform=uniform_loss(state.get("vocab_size")))
            why = self.guard.update(loss, (logs or {}).get("grad_norm"), loss_scaler=bool(args.fp16),
                                    step=st.global_step)
            if why:
                state["diverged"] = {"step": st.global_step, "loss": loss, "why": why,
                                     "learning_rate": args.learning_rate}
                control.should_save = False  # never save the diverged weights
                control.should_training_stop = True

        def on_step_end(self, args, st, control, **kw):
            name = signal_anywhere(state.get("signal"), args.device)
            if name:
                state["signal"] = name  # a rank the signal missed ends as the others do (interrupted, no final eval)
                control.should_save = True
                control.should_training_stop = True

    return [Progress(), Guard()]


def signal_anywhere(name: str | None, device) -> str | None:
    """The SIGINT / SIGTERM any process of the run got (``name``: this one's, if any), agreed on by all of them at
    the same step.

    torchrun signals every worker, but each sees it at its own moment: one may take it just before its step's end and
    stop there while another starts the next step, whose gradient all-reduce then waits for the rank that is saving;
    and a rank the signal missed would finish as a completed run (a final evaluation the others never join).  One
    all-reduce (MAX of the signal number) at every step's end makes it one decision; on one process it is ``name``."""
    import signal

    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return name
    number = torch.tensor([int(signal.Signals[name]) if name else 0], dtype=torch.int32, device=device)
    dist.all_reduce(number, op=dist.ReduceOp.MAX)
    return signal.Signals(int(number.item())).name if number.item() else None


def start_record(start_loss: float, vocab_size: int | None) -> dict[str, Any]:
    """The step-0 record of ``metrics.jsonl``: the loss before training and the uniform prediction's loss
    (``run_folder.read_metrics`` files it under step 0, kind "other"; it has no ``loss`` key, so the readers of the
    training curve pass over it)."""
    return {"step": 0, "start_loss": start_loss, "uniform_loss": uniform_loss(vocab_size), "vocab_size": vocab_size,
            "wall_time": round(time.time(), 3)}


def watch_start_loss(trainer, state: dict[str, Any]) -> None:
    """Record the loss before training in ``state["start_loss"]`` and the model's vocabulary size in
    ``state["vocab_size"]`` (when not set already).

    The start loss is what the Trainer itself would log for its first optimizer step (``logging_steps=1``): the sum
    of ``training_step``'s losses over that step's micro-batches (each already divided by the accumulation), all
    computed on the initial weights, averaged over processes as the Trainer averages its logged loss.  It is
    measured on the way, at no extra cost, and recorded just before the first optimizer step, so it is there at the
    first log.  A run resumed from a checkpoint starts past step 0 and records nothing (:func:`resume_reference`
    gives its reference)."""
    from transformers import TrainerCallback
    from transformers.trainer_pt_utils import nested_gather

    if state.get("vocab_size") is None:
        state["vocab_size"] = vocab_size(trainer.model)
    parts: list = []
    training_step = trainer.training_step

    def watched(model, inputs, *args, **kwargs):
        loss = training_step(model, inputs, *args, **kwargs)
        if trainer.state.global_step == 0:
            parts.append(loss.detach())
        return loss

    class StartLoss(TrainerCallback):
        def on_pre_optimizer_step(self, args, st, control, **kw):
            if st.global_step == 0 and parts:
                import torch

                value = nested_gather(torch.stack(parts).sum(), args.parallel_mode).mean().item()
                parts.clear()
                if math.isfinite(value):
                    state["start_loss"] = value

    trainer.training_step = watched
    trainer.add_callback(StartLoss())


def vocab_size(model) -> int | None:
    """The size of the model's output vocabulary (its text config's ``vocab_size``; a PEFT model forwards it)."""
    config = getattr(model, "config", None)
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    size = getattr(text, "vocab_size", None)
    return int(size) if isinstance(size, int) and size > 1 else None


def resume_reference(run_dir: Path) -> float | None:
    """A resumed run's divergence reference: the loss before training stored in its ``metrics.jsonl``, else (a
    folder from before it was stored) the mean of its first :data:`.divergence.PATIENCE` logged losses; None when
    neither is there yet."""
    for record in run_folder.read_metrics(run_dir):
        start = record.get("start_loss")
        if record.get("step") == 0 and isinstance(start, (int, float)) and math.isfinite(start):
            return float(start)
    return run_folder.starting_loss(run_dir, PATIENCE)
