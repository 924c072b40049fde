"""Train, climbing the out-of-memory back-off ladder: on a CUDA out-of-memory step, halve the per-device batch
(twice the accumulation), then gradient checkpointing, then 8-bit optimizer states, each time continuing from the
last checkpoint with the same effective batch and learning rate.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
from pathlib import Path
from typing import Any, Callable

from ..errors import FinetuneHelperError, first_line
from ..recommender.optimizers import EIGHT_BIT_FALLBACK, is_eight_bit
from . import launch, run_folder
from .callbacks import watch_start_loss
from .finish import can_generate, exact_match_of
from .load import build_trainer
from .outcome import EXIT_OOM, RunStopped
from .prepare import Prepared
from .run_folder import last_checkpoint
from .setup import checkpointing, run_estimate, run_speed


def _back_off(sft_kwargs: dict[str, Any], run_dir: Path, log: Callable[[str], None], *,
              cuda: bool) -> dict[str, Any]:
    """After an out-of-memory step, the planner's ladder, one rung at a time, with the same effective batch and
    learning rate: halve the per-device batch (twice the accumulation); at batch 1, gradient checkpointing; then
    8-bit optimizer states (before the first checkpoint only: a checkpoint's optimizer state does not load into
    another optimizer; CUDA and bitsandbytes needed).  Continues from the last checkpoint; returns the event as the
    summary records it, or stops with exit 4 when no rung is left."""
    batch, accum = sft_kwargs["per_device_train_batch_size"], sft_kwargs["gradient_accumulation_steps"]
    ckpt = last_checkpoint(run_dir)
    event: dict[str, Any] = {"resumed_from": ckpt.name if ckpt else None}
    if batch > 1:
        new_batch = batch // 2
        new_accum = math.ceil(batch * accum / new_batch)
        sft_kwargs["per_device_train_batch_size"] = new_batch
        sft_kwargs["gradient_accumulation_steps"] = new_accum
        sft_kwargs["per_device_eval_batch_size"] = min(sft_kwargs.get("per_device_eval_batch_size", new_batch),
                                                       new_batch)
        same = new_batch * new_accum == batch * accum
        what = (f"per-device batch {batch} -> {new_batch}, accumulation {accum} -> {new_accum} "
                + ("(effective batch and learning rate unchanged)" if same else
                   f"(effective batch {batch * accum} -> {new_batch * new_accum}, learning rate unchanged)"))
        event.update(per_device_train_batch_size=[batch, new_batch], gradient_accumulation_steps=[accum, new_accum])
    elif not checkpointing(sft_kwargs):
        key = "gradient_checkpointing" if "gradient_checkpointing" in sft_kwargs else "activation_checkpointing"
        sft_kwargs[key] = True
        what = "gradient checkpointing on at per-device batch 1 (each layer recomputed in backward)"
        event["gradient_checkpointing"] = [False, True]
    elif not is_eight_bit(sft_kwargs.get("optim", "")) and cuda and ckpt is None and _has_bitsandbytes():
        old = sft_kwargs.get("optim")
        sft_kwargs["optim"] = EIGHT_BIT_FALLBACK
        what = f"8-bit optimizer states ({old} -> {EIGHT_BIT_FALLBACK}) at batch 1 with checkpointing"
        event["optim"] = [old, EIGHT_BIT_FALLBACK]
    else:
        raise RunStopped(EXIT_OOM, "out of memory at per-device batch 1 with gradient checkpointing"
                         + (" and 8-bit optimizer states" if is_eight_bit(sft_kwargs.get("optim", "")) else "")
                         + ": use method.type=qlora, a shorter data.max_length, or more GPUs (--gpus N)"
                         + ("" if is_eight_bit(sft_kwargs.get("optim", "")) else
                            "; training.optim=paged_adamw_8bit on a CUDA GPU with bitsandbytes"))
    log(f"CUDA out of memory: {what}; continuing from {ckpt.name if ckpt else 'the start'}")
    return event


def _has_bitsandbytes() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def train_with_backoff(prep: Prepared, tokenizer, callbacks: list, resume_from: str | None, state: dict[str, Any],
                        log: Callable[[str], None]) -> tuple[Any, Any, list[dict[str, Any]], float | None]:
    """Build the trainer and train, climbing the back-off ladder on out-of-memory (see :func:`_back_off`).

    Returns the trainer, its train output, the back-off events and the held-out exact match before training."""
    import torch

    sft_kwargs = dict(prep.sft_kwargs)
    oom_events: list[dict[str, Any]] = []
    before = None
    while True:
        try:
            trainer = build_trainer(prep, tokenizer, sft_kwargs, callbacks)
        except torch.OutOfMemoryError as exc:
            raise RunStopped(EXIT_OOM, f"out of memory while loading the model onto the GPU ({first_line(exc)}): "
                             "use method.type=qlora (a 4-bit base), a smaller model, or more GPUs (--gpus N)") from None
        watch_start_loss(trainer, state)  # the loss before training and the vocabulary, for the divergence guard
        if len(trainer.train_dataset) == 0:
            raise FinetuneHelperError("data.max_length", f"{sft_kwargs.get('max_length')} tokens leave no answer token "
                                      "in any example (TRL drops those): raise data.max_length")
        if before is None and prep.holdout and launch.is_main() and can_generate(sft_kwargs, trained=False):
            before = exact_match_of(prep, trainer.model, tokenizer)
        state["phase"] = "training"
        state["estimated_peak_memory_bytes"] = run_estimate(prep, sft_kwargs).allocated_peak
        state["predicted_speed"] = run_speed(prep, sft_kwargs)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()  # each attempt's peak is its own
        try:
            with _tied_keys_unmentioned(trainer.model):
                return trainer, trainer.train(resume_from_checkpoint=resume_from), oom_events, before
        except torch.OutOfMemoryError:
            if launch.world_size() > 1:  # the other processes wait in a collective: no back-off, stop them all
                raise RunStopped(EXIT_OOM, f"out of memory on rank {launch.rank()} of {launch.world_size()}: run "
                                 "again with a smaller training.per_device_train_batch_size or "
                                 "training.gradient_checkpointing=true") from None
        del trainer  # outside the except block, so the traceback no longer holds it
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        oom_events.append(_back_off(sft_kwargs, prep.run_dir, log, cuda=torch.cuda.is_available()))
        run_folder.write_training_args(prep.run_dir, sft_kwargs)  # what runs now, and what a resume continues
        resume_from = oom_events[-1]["resumed_from"] and str(prep.run_dir / oom_events[-1]["resumed_from"])


#: how the Trainer reports keys a resumed checkpoint lacked (``Trainer._issue_warnings_after_load``)
_MISSING_KEYS = "There were missing keys in the checkpoint model loaded: "


@contextlib.contextmanager
def _tied_keys_unmentioned(model):
    """Leave out the Trainer's warning about "missing keys" on resume when the keys are tied weights: a tied
    ``lm_head.weight`` is the embedding itself, which ``save_pretrained`` writes once, so every resume of a model with
    tied embeddings "misses" it (the Trainer's own check compares with ``_keys_to_ignore_on_save`` only).  A missing
    key that is not tied is still reported."""
    import ast

    tied: set[str] = set()
    seen: set[int] = set()
    for name, parameter in model.named_parameters(remove_duplicate=False):
        key = parameter.data_ptr()
        if key in seen:
            tied.add(name)
        seen.add(key)

    def is_tied(key: str) -> bool:
        return any(name == key or name.endswith("." + key) for name in tied)

    class Tied(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            message = record.getMessage()
            if not message.startswith(_MISSING_KEYS):
                return True
            try:
                keys = ast.literal_eval(message[len(_MISSING_KEYS):].rstrip("."))
            except (ValueError, SyntaxError):
                return True
            return not (keys and all(is_tied(str(k)) for k in keys))

    logger = logging.getLogger("transformers.trainer")
    quiet = Tied()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)
