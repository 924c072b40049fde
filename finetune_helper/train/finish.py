"""The end of a run: this session's summary (steps, losses, throughput, measured against estimated memory), the
early stop of a diverged or interrupted run, the final evaluation, ``final/`` and the held-out exact match, and
the summary as ``run`` prints it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..units import fmt_gib
from . import launch, run_folder
from .outcome import EXIT_DIVERGED, EXIT_INTERRUPTED, RunStopped
from .prepare import Prepared
from .run_folder import last_checkpoint, write_json
from .setup import shards_parameters, zero_strategy


def training_summary(prep: Prepared, trainer, output, state: dict[str, Any]) -> dict[str, Any]:
    """Steps, losses and throughput of this session, and on CUDA the measured peak next to the estimate."""
    import torch

    metrics = output.metrics
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    runtime = metrics.get("train_runtime") or 0
    tokens = (trainer.state.num_input_tokens_seen or 0) - state.get("tokens_at_start", 0)  # this session's tokens
    summary: dict[str, Any] = {
        "run_dir": str(prep.run_dir), "global_step": trainer.state.global_step, "max_steps": trainer.state.max_steps,
        "train_loss_first": losses[0] if losses else None, "train_loss_last": losses[-1] if losses else None,
        "train_loss_mean": metrics.get("train_loss"),
        "tokens_per_second": round(tokens / runtime, 1) if runtime else None}
    summary["estimated_peak_memory_bytes"] = state.get("estimated_peak_memory_bytes")
    summary.update(measured_speed(trainer, runtime, tokens, state))
    if torch.cuda.is_available():
        summary["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
        summary["peak_memory_reserved_bytes"] = torch.cuda.max_memory_reserved()
    return summary


def measured_speed(trainer, runtime: float, tokens: int, state: dict[str, Any]) -> dict[str, Any]:
    """This session's measured rate next to the prediction for the plan's GPU: tokens/s per GPU and seconds per
    optimizer step over ``train()``'s wall time (evaluations during training included), MFU on a GPU with a catalog
    peak.  The prediction is shown only on a GPU: on the CPU it describes another machine."""
    import torch

    steps = trainer.state.global_step - state.get("step_at_start", 0)
    out: dict[str, Any] = {
        "tokens_per_second_per_gpu": round(tokens / runtime / launch.world_size(), 1) if runtime else None,
        "seconds_per_step": round(runtime / steps, 3) if runtime and steps > 0 else None}
    predicted = state.get("predicted_speed") or {}
    if torch.cuda.is_available() and "tokens_per_second_per_gpu" in predicted:
        out["predicted"] = {k: predicted[k] for k in ("gpu", "tokens_per_second_per_gpu", "seconds_per_step", "mfu")}
        if out["tokens_per_second_per_gpu"]:
            out["mfu"] = predicted["model_flops_per_token"] * out["tokens_per_second_per_gpu"] / predicted["peak_flops"]
    return out


def stop_early(run_dir: Path, summary: dict[str, Any], state: dict[str, Any]) -> None:
    """A diverged or interrupted run: its summary written, then :class:`RunStopped` with the exit code."""
    ckpt = last_checkpoint(run_dir)
    if state.get("diverged"):
        d = state["diverged"]
        lr = d["learning_rate"]
        code, status = EXIT_DIVERGED, "diverged"
        message = (f"loss diverged at step {d['step']} ({d['why']}): learning rate {lr:.2g} is likely too high: try "
                   f"{lr / 10:.2g}; last good checkpoint: {ckpt if ckpt else 'none'}")
    else:
        code, status = EXIT_INTERRUPTED, "interrupted"
        message = (f"interrupted by {state['signal']} at step {summary['global_step']}; checkpoint {ckpt}; "
                   "run again with --resume to continue")
    summary.update(status=status, message=message)
    if launch.is_main():
        write_json(run_dir / run_folder.SUMMARY, summary)
    raise RunStopped(code, message)


def finish(prep: Prepared, trainer, tokenizer, summary: dict[str, Any], before: float | None) -> None:
    """The final evaluation, ``final/`` (model or adapter, with the tokenizer) and held-out exact match."""
    if prep.eval_dataset is not None:
        last_eval = [h for h in trainer.state.log_history if "eval_loss" in h]
        if last_eval and last_eval[-1]["step"] == trainer.state.global_step:
            summary["eval_loss"] = last_eval[-1]["eval_loss"]
        else:
            summary["eval_loss"] = trainer.evaluate().get("eval_loss")
    final = prep.run_dir / run_folder.FINAL
    if getattr(trainer, "is_fsdp_enabled", False):
        # checkpoints are sharded (each rank its shard), but with a sharded state dict save_model writes no model at
        # all: final/ is gathered whole, as PEFT's FSDP example (examples/sft/train.py) does before its last save
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(final))  # every rank (FSDP gathers the shards); the main process writes
    summary["final"] = str(final)
    if not launch.is_main():
        return
    tokenizer.save_pretrained(str(final))
    if prep.holdout and can_generate(prep.sft_kwargs, trained=True):
        summary["exact_match_before"] = before
        summary["exact_match_after"] = exact_match_of(prep, trainer.model, tokenizer)


def exact_match_of(prep: Prepared, model, tokenizer) -> float | None:
    from .tiny import exact_match

    if model is None:
        return None
    was_training = model.training
    acc = exact_match(model, tokenizer, prep.holdout)
    model.train(was_training)
    return acc


def format_summary(summary: dict[str, Any]) -> str:
    def f(v, fmt="{:.4f}"):
        return "-" if v is None else fmt.format(v)

    lines = [f"run: {summary.get('status', '?')} at step {summary.get('global_step')}/{summary.get('max_steps')} "
             f"in {summary.get('wall_seconds')} s -> {summary.get('run_dir')}",
             f"train loss: first {f(summary.get('train_loss_first'))}, last {f(summary.get('train_loss_last'))}; "
             f"eval loss: {f(summary.get('eval_loss'))}; tokens/s: {f(summary.get('tokens_per_second'), '{:,.0f}')}"]
    if summary.get("tokens_per_second_per_gpu"):
        line = (f"throughput: {summary['tokens_per_second_per_gpu']:,.0f} tokens/s per GPU, "
                f"{f(summary.get('seconds_per_step'), '{:.3g}')} s per optimizer step")
        if summary.get("mfu") is not None:
            line += f", MFU {summary['mfu']:.0%}"
        predicted = summary.get("predicted")
        if predicted:
            line += (f"; predicted for {predicted['gpu']}: {predicted['tokens_per_second_per_gpu']:,.0f} tokens/s, "
                     f"{predicted['seconds_per_step']:.3g} s per step, MFU {predicted['mfu']:.0%}")
        lines.append(line)
    if "exact_match_after" in summary:
        lines.append(f"exact match on held-out problems: before {f(summary.get('exact_match_before'), '{:.1%}')}, "
                     f"after {f(summary.get('exact_match_after'), '{:.1%}')}")
    if "peak_memory_bytes" in summary:
        lines.append(f"peak GPU memory (torch.cuda.max_memory_allocated): {fmt_gib(summary['peak_memory_bytes'])}; "
                     f"estimated {fmt_gib(summary['estimated_peak_memory_bytes'])}")
    for event in summary.get("oom_backoffs", []):  # each rung records what it changed: batch, checkpointing, optim
        changes = ", ".join(f"{k} {v[0]} -> {v[1]}" for k, v in event.items() if k != "resumed_from")
        lines.append(f"out-of-memory back-off: {changes}, resumed from {event['resumed_from']}")
    if summary.get("final"):
        lines.append(f"saved: {summary['final']}")
    return "\n".join(lines)


def can_generate(sft_kwargs: dict[str, Any], *, trained: bool) -> bool:
    """Whether rank 0 alone can generate with the model these arguments train (the held-out exact match): not when
    the parameters are sharded over several processes (a sharded model generates only with every rank taking part:
    rank 0 alone would wait for the others), nor under ZeRO-3 before training, in any number of processes
    (``from_pretrained`` partitioned the weights under ``deepspeed.zero.Init``; the engine that gathers them for a
    forward comes with training)."""
    if launch.world_size() > 1 and shards_parameters(sft_kwargs):
        return False
    return trained or (zero_strategy(sft_kwargs) or ("none",))[0] != "zero3"
