"""The runner's ``TrainerCallback``s: progress (a line per log and ``metrics.jsonl``) and the guard (divergence
stop, a clean stop on SIGINT / SIGTERM).  They share a ``state`` dict with the runner and its signal handler."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable

from ..units import fmt_duration
from . import run_folder
from .divergence import DivergenceGuard


def runner_callbacks(run_dir: Path, log: Callable[[str], None], state: dict[str, Any]):
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """Steps, loss, tokens/s and ETA on every log, and one JSON line per log in metrics.jsonl."""

        def on_train_begin(self, args, st, control, **kw):
            self.t0 = time.time()
            self.start_step = st.global_step
            self.tokens0 = state["tokens_at_start"] = st.num_input_tokens_seen or 0

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
            if state.get("cuda"):  # measured vs estimated, live in the app
                import torch

                record["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
                record["estimated_peak_memory_bytes"] = state.get("estimated_peak_memory_bytes")
            with open(run_dir / run_folder.METRICS, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
            if "loss" in logs:
                log(f"step {st.global_step}/{st.max_steps} | loss {logs['loss']:.4f} | lr {logs.get('learning_rate', 0):.2e}"
                    f" | {record['tokens_per_second'] or 0:,.0f} tok/s | ETA {fmt_duration(eta)}")
            elif "eval_loss" in logs:
                log(f"step {st.global_step}/{st.max_steps} | eval loss {logs['eval_loss']:.4f}")

    class Guard(TrainerCallback):
        """Divergence stop (:mod:`.divergence`) and a clean stop on SIGINT/SIGTERM."""

        def __init__(self) -> None:
            # a resumed run keeps the reference of its start (the first logged losses in metrics.jsonl)
            self.guard = DivergenceGuard(reference=state.get("first_loss"))

        def on_log(self, args, st, control, logs=None, **kw):
            loss = (logs or {}).get("loss")
            if loss is None:
                return
            why = self.guard.update(loss, (logs or {}).get("grad_norm"), loss_scaler=bool(args.fp16))
            if why:
                state["diverged"] = {"step": st.global_step, "loss": loss, "why": why,
                                     "learning_rate": args.learning_rate}
                control.should_save = False  # never save the diverged weights
                control.should_training_stop = True

        def on_step_end(self, args, st, control, **kw):
            if state.get("signal"):
                control.should_save = True
                control.should_training_stop = True

    return [Progress(), Guard()]
