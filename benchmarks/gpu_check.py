"""The memory estimate and the recommended batch against one GPU's own peak statistics (run by gpu_check.sh).

For each configuration of the grid (real-size catalog models with random weights, nothing downloaded):

1. the planner is asked for a plan for the GPU that is present (``detect_gpu``: its name and memory);
2. the step is run at the recommended micro-batch under a memory cap equal to the plan's budget
   (``torch.cuda.set_per_process_memory_fraction``): the peak statistics ``max_memory_allocated`` and
   ``max_memory_reserved`` of the second optimizer step are set against the estimate of that step (allocated:
   ``allocated_peak``; reserved: allocated plus the estimate's fragmentation allowance);
3. a bounded search (doubling, then bisection; at most ``--search`` extra trials of one step each) finds the
   largest micro-batch that runs under the same cap, and the recommended batch is reported against it.

The step is the runner's, replayed by ``finetune_helper.measure.replica`` (TRL's fused LM head -- Triton on CUDA --,
PEFT, the Trainer's optimizer and its decay groups, autocast, clipping); the replica matches the runner's own steps
on CPU (``tests/measure/test_replica.py``).  QLoRA cannot be replayed (bitsandbytes builds its 4-bit weights from a
checkpoint), so its rows go through the runner itself (``measure_recipe``: the runner's loading, collator and
``SFTTrainer`` steps) on a random-weight checkpoint written to a temporary folder, with a LoRA row of the same
checkpoint beside it so that runner and replica are also compared on CUDA.  Rows whose needs are missing
(bitsandbytes) are printed as skipped with the reason.

A deadline (``--budget-s``, default 420 s) stops the search early so the whole check ends well inside 8 minutes
on an H100 / H200; rows not reached are listed as such.  The table is written to ``--results`` (Markdown) with the
GPU, driver and library versions.  ``--smoke`` runs two tiny configurations on the CPU through the same code (no
CUDA statistics: the tracked peak stands in for allocated, the plans are for the CPU's kernels), which is how this script is kept working on machines
without a GPU (``tests/benchmarks/test_gpu_check.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune_helper.recommender.plan import MAX_MICRO_BATCH  # noqa: E402  (pure Python: no torch)

#: (model, method, seq, gradient checkpointing: None lets the planner decide, batch kind, LoRA targets)
GRID = [
    ("meta-llama/Llama-3.1-8B", "full", 2048, None, "padded", "all-linear"),
    ("meta-llama/Llama-3.1-8B", "lora", 4096, None, "padded", "all-linear"),
    ("meta-llama/Llama-3.1-8B", "lora", 8192, True, "unpadded", ("q_proj", "v_proj")),
    ("Qwen/Qwen2.5-7B", "lora", 8192, True, "packed", "all-linear"),
    ("Qwen/Qwen2.5-7B", "full", 2048, True, "unpadded", "all-linear"),
    ("mistralai/Mistral-7B-v0.1", "lora", 512, False, "padded", "all-linear"),
    ("google/gemma-2-9b", "lora", 2048, True, "unpadded", "all-linear"),
    ("microsoft/Phi-3-mini-4k-instruct", "full", 4096, None, "padded", "all-linear"),
    ("Qwen/Qwen2.5-1.5B", "full", 1024, False, "packed", "all-linear"),
]
#: through the runner itself (measure_recipe) on a random-weight checkpoint of this model
RUNNER_MODEL = "meta-llama/Llama-3.2-1B"
RUNNER_GRID = [("qlora", 2048, True), ("lora", 2048, True)]
#: --smoke: the embedded tiny base (a config file) at short sequences, planned for a 0.5 GiB "GPU" so that steps stay
#: short on a CPU (the tracker of live tensors runs the smoke's steps at a few hundred tokens/s)
TINY = str(Path(__file__).resolve().parents[1] / "finetune_helper" / "train" / "tiny-base" / "config.json")
SMOKE_GRID = [(TINY, "lora", 64, True, "padded", "all-linear"), (TINY, "full", 32, False, "packed", "all-linear")]
SMOKE_GPU = "0.5GiB"
GIB = 2**30


@dataclasses.dataclass
class Trial:
    batch: int
    ok: bool
    allocated: int = 0
    reserved: int = 0
    est_allocated: int = 0
    est_reserved: int = 0
    tokens_per_s: float = 0.0
    error: str = ""
    #: the time model's tokens/s for the same step on this GPU (recommender/throughput.py; 0: no catalog rates)
    predicted_tps: float = 0.0


@dataclasses.dataclass
class Row:
    name: str
    path: str  # replica / runner
    option: str = ""
    recommended: int = 0
    largest: int | None = None
    trials: list[Trial] = dataclasses.field(default_factory=list)
    skipped: str = ""

    @property
    def at_recommended(self) -> Trial | None:
        return next((t for t in self.trials if t.batch == self.recommended), None)


# ------------------------------------------------------------------------------------------------- measuring
class Device:
    """Peak statistics of one step on ``cuda`` (allocator) or ``cpu`` (the live-bytes tracker, for --smoke)."""

    def __init__(self, name: str):
        import torch

        self.name, self.torch = name, torch
        self.tracker = None
        self.budget = 10**15
        if name == "cpu":
            from finetune_helper.measure.tracker import live_bytes_mode

            self.tracker = live_bytes_mode()

    def cap(self, budget: int) -> None:
        """Run under the plan's ``budget`` less the CUDA context (which lives outside the caching allocator): the
        allocator's cap on CUDA; on the CPU (planned with ``device="cpu"``: no context) a tracked peak above it
        fails."""
        from finetune_helper.recommender.memory import CUDA_CONTEXT_BYTES

        self.budget = budget
        if self.name == "cuda":
            budget -= CUDA_CONTEXT_BYTES
            total = self.torch.cuda.get_device_properties(0).total_memory
            self.torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total))

    def reset(self) -> None:
        if self.name == "cuda":
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
        else:
            self.tracker.reset_peak()

    def peaks(self) -> tuple[int, int]:
        if self.name == "cuda":
            self.torch.cuda.synchronize()
            return self.torch.cuda.max_memory_allocated(), self.torch.cuda.max_memory_reserved()
        return self.tracker.peak, 0

    def release(self) -> None:
        import gc

        gc.collect()
        if self.name == "cuda":
            self.torch.cuda.empty_cache()

    def is_oom(self, exc: BaseException) -> bool:
        return isinstance(exc, self.torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def estimate_of(spec, setup) -> tuple[int, int]:
    """(allocated, reserved) predicted for ``setup``: the estimate's allocated peak, plus fragmentation."""
    from finetune_helper.recommender.memory import estimate_memory

    est = estimate_memory(spec, setup)
    frag = est.details.get("fragmentation", 0)
    return est.allocated_peak, est.allocated_peak + frag


def predicted_tps(spec, setup, gpu) -> float:
    """The time model's tokens/s per GPU for ``setup`` on ``gpu`` (0 without catalog rates: --smoke's amount)."""
    from finetune_helper.recommender.throughput import step_time

    t = step_time(spec, dataclasses.replace(setup, padded=False), gpu)
    return t.tokens_per_second_per_gpu if t else 0.0


def executed(plan, batch: int, kind: str):
    """The setup the runner executes for ``plan`` at micro-batch ``batch`` with rows of ``kind`` (the request's
    ``step_shape``: packed rows are one row; several rows are padded unless ``kind`` says they are not)."""
    setup = plan.request.setup(batch, plan.gradient_checkpointing, plan.optim, weights_dtype=plan.weights_dtype)
    return dataclasses.replace(setup, padded=setup.padded and kind == "padded")


class ReplicaStep:
    """A model built once per configuration; ``run(batch, steps)`` trains ``steps`` optimizer steps at ``batch``."""

    def __init__(self, config: dict, setup, device: Device):
        from finetune_helper.measure.replica import build_model, create_optimizer

        self.config, self.setup, self.device = config, setup, device
        self.model = build_model(config, setup, device=device.name)
        self.optimizer = create_optimizer(self.model, setup)
        if device.tracker is not None:
            from finetune_helper.measure.tracker import model_tensors

            device.tracker.register(model_tensors(self.model), "weights")

    def run(self, setup, steps: int) -> tuple[int, int, float]:
        from finetune_helper.measure.replica import label_tokens, make_batch, train_step

        dev, peaks, seconds, tokens = self.device, (0, 0), 0.0, 0
        for step in range(steps):
            batches = [make_batch(setup, self.config["vocab_size"], seed=step, device=dev.name)]
            n = label_tokens(batches)
            dev.reset()
            t0 = time.perf_counter()
            with dev.tracker if dev.tracker is not None else nullcontext():
                train_step(self.model, self.optimizer, batches, setup, tokens=n)
            peaks = dev.peaks()
            seconds, tokens = time.perf_counter() - t0, setup.micro_batch_size * setup.seq_len
        return peaks[0], peaks[1], tokens / seconds if seconds else 0.0

    def close(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        del self.model, self.optimizer
        self.device.release()


def trial(step, spec, setup, batch: int, device: Device, steps: int) -> Trial:
    """``steps`` optimizer steps of ``setup`` (micro-batch ``batch``) against their estimate; an OOM is a result."""
    est_alloc, est_res = estimate_of(spec, setup)
    try:
        alloc, res, tps = step.run(setup, steps)
        if device.name == "cpu" and alloc > device.budget:
            return Trial(batch, False, alloc, res, est_alloc, est_res, tps, error="over budget (tracked)")
        return Trial(batch, True, alloc, res, est_alloc, est_res, tps)
    except Exception as exc:  # an OOM is a result; anything else is reported on the row
        step.optimizer.zero_grad(set_to_none=True)
        device.release()
        if not device.is_oom(exc):
            raise
        return Trial(batch, False, est_allocated=est_alloc, est_reserved=est_res, error="OOM")


def bounded_search(run_at, recommended: int, extra: int, deadline: float, cap: int) -> int:
    """Largest batch up to ``cap`` that runs, starting from a ``recommended`` that ran: double until a failure,
    then bisect; at most ``extra`` trials, none started after ``deadline``."""
    lo, hi = recommended, cap + 1
    for _ in range(extra):
        if time.time() > deadline or hi - lo <= 1:
            break
        probe = min(lo * 2, cap) if hi == cap + 1 else (lo + hi) // 2
        if run_at(probe):
            lo = probe
        else:
            hi = probe
    return lo


def check_replica(entry, device: Device, gpu, args, deadline: float) -> Row:
    import finetune_helper as fh
    from finetune_helper.recommender.catalog import find_model
    from finetune_helper.recommender.model import ModelSpec

    model, method, seq, gc, kind, targets = entry
    name = f"{Path(model).parent.name if model.endswith('.json') else model.split('/')[-1]} {method} {seq} {kind}" + ("" if targets == "all-linear" else " q,v")
    row = Row(name, "replica")
    if time.time() > deadline:
        row.skipped = "not reached before the deadline"
        return row
    config = json.loads(Path(model).read_text()) if model.endswith(".json") else find_model(model)["config"]
    spec = ModelSpec.from_config(config, name=model)
    plan = fh.recommend(spec, gpu, method=method, seq_len=seq, gradient_checkpointing=gc,
                        lora_target_modules=targets, packing=kind == "packed",
                        target_effective_batch=MAX_MICRO_BATCH, device=device.name)
    row.recommended = plan.per_device_train_batch_size
    row.option = (f"{'gc' if plan.gradient_checkpointing else 'no gc'}, {plan.optim}"
                  + (f", {plan.weights_dtype}" if plan.weights_dtype else ""))
    device.cap(plan.request.budget_bytes)
    recommended = executed(plan, row.recommended, kind)
    step = ReplicaStep(dict(config), recommended, device)
    try:
        first = trial(step, spec, recommended, row.recommended, device, steps=2)
        first.predicted_tps = predicted_tps(spec, recommended, gpu)
        row.trials.append(first)
        if first.ok:
            def run_at(b: int) -> bool:
                t = trial(step, spec, executed(plan, b, kind), b, device, steps=1)
                row.trials.append(t)
                return t.ok

            row.largest = bounded_search(run_at, row.recommended, args.search, deadline, MAX_MICRO_BATCH)
    finally:
        step.close()
        device.cap(10**15)
    return row


# ------------------------------------------------------------------------------------------ the runner's path
def random_checkpoint(model: str, root: Path) -> Path:
    """``model``'s architecture with random weights and the project's tiny tokenizer, saved under ``root``."""
    import torch
    from transformers import AutoModelForCausalLM

    from finetune_helper.measure.tools import hf_config
    from finetune_helper.recommender.catalog import find_model
    from finetune_helper.train.tiny import build_tokenizer

    out = root / model.split("/")[-1]
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        net = AutoModelForCausalLM.from_config(hf_config(find_model(model)["config"]), dtype=torch.bfloat16)
    net.save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    return out


def long_rows(path: Path, words: int) -> Path:
    """64 plain-text rows of ``words`` digits (longer than any max_length here: unpadded batches)."""
    import random

    from finetune_helper.train.tiny import write_dataset

    rng = random.Random(0)
    return write_dataset(path, [{"text": " ".join(str(rng.randrange(10)) for _ in range(words))} for _ in range(64)])


def check_runner(method: str, seq: int, gc: bool, checkpoint: Path, data: Path, device: Device, gpu,
                 deadline: float) -> Row:
    import finetune_helper as fh
    from finetune_helper.measure.runner_step import measure_recipe
    from finetune_helper.recommender.model import ModelSpec
    from finetune_helper.train.recipe import recipe_from_dict
    from finetune_helper.train.setup import executed_setup

    row = Row(f"{RUNNER_MODEL.split('/')[-1]} {method} {seq} unpadded", "runner")
    if method == "qlora":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            row.skipped = "bitsandbytes is not installed (QLoRA's 4-bit kernels)"
            return row
    if time.time() > deadline:
        row.skipped = "not reached before the deadline"
        return row
    config = json.loads((checkpoint / "config.json").read_text())
    spec = ModelSpec.from_config(config, name=RUNNER_MODEL)
    plan = fh.recommend(spec, gpu, method=method, seq_len=seq, gradient_checkpointing=gc, device=device.name)
    row.recommended = plan.per_device_train_batch_size
    row.option = f"{'gc' if plan.gradient_checkpointing else 'no gc'}, {plan.optim}"
    training = {"per_device_train_batch_size": row.recommended, "gradient_accumulation_steps": 1,
                "gradient_checkpointing": plan.gradient_checkpointing, "optim": plan.optim,
                **({"bf16": True} if device.name == "cuda" else {"use_cpu": True})}
    recipe = recipe_from_dict({"model": {"name": str(checkpoint)}, "method": {"type": method},
                               "data": {"path": str(data), "max_length": seq}, "hardware": {"gpu": gpu.name},
                               "training": training, "seed": 0})
    device.cap(plan.request.budget_bytes)
    try:
        with tempfile.TemporaryDirectory() as run_dir:
            m = measure_recipe(recipe, steps=2, run_dir=run_dir, track=device.name == "cpu")
        shape, padded = m.batches[-1]
        setup = executed_setup(recipe, spec, m.sft_kwargs, device=device.name, batch_shape=shape, padded=padded)
        est_alloc, est_res = estimate_of(spec, setup)
        last = m.steps[-1]
        alloc = last.cuda_allocated if last.cuda_allocated is not None else last.tracked_bytes
        row.trials.append(Trial(row.recommended, True, alloc, last.cuda_reserved or 0, est_alloc, est_res,
                                last.tokens / last.seconds if last.seconds else 0.0,
                                predicted_tps=predicted_tps(spec, setup, gpu)))
    except Exception as exc:
        if not device.is_oom(exc):
            raise
        row.trials.append(Trial(row.recommended, False, error="OOM"))
    finally:
        device.release()
        device.cap(10**15)
    return row


# --------------------------------------------------------------------------------------------------- report
def versions() -> str:
    import importlib.metadata as md

    names = ["torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "triton"]
    found = []
    for n in names:
        try:
            found.append(f"{n} {md.version(n)}")
        except md.PackageNotFoundError:
            found.append(f"{n} (absent)")
    return ", ".join(found)


def driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip() or "nvidia-smi gave nothing"
    except (OSError, subprocess.TimeoutExpired):
        return "nvidia-smi not available"


def _err(est: int, measured: int) -> str:
    return f"{(est - measured) / measured:+.1%}" if measured else "-"


def table(rows: list[Row], device: str) -> list[str]:
    lines = ["| configuration | path | option | batch | allocated est / measured GiB | err | "
             "reserved est / measured GiB | err | tokens/s measured / predicted | largest that ran | rec / largest |",
             "|---|---|---|---:|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        if r.skipped:
            lines.append(f"| {r.name} | {r.path} | skipped: {r.skipped} | | | | | | | | |")
            continue
        t = r.at_recommended
        if t is None or not t.ok:
            lines.append(f"| {r.name} | {r.path} | {r.option} | {r.recommended} | recommended batch did not run "
                         f"({t.error if t else '?'}) | | | | | | |")
            continue
        res = (f"{t.est_reserved / GIB:.2f} / {t.reserved / GIB:.2f}", _err(t.est_reserved, t.reserved)) \
            if device == "cuda" else ("-", "-")
        largest = "-" if r.largest is None else str(r.largest)
        ratio = "-" if not r.largest else f"{r.recommended / r.largest:.2f}"
        lines.append(f"| {r.name} | {r.path} | {r.option} | {r.recommended} | {t.est_allocated / GIB:.2f} / "
                     f"{t.allocated / GIB:.2f} | {_err(t.est_allocated, t.allocated)} | {res[0]} | {res[1]} | "
                     f"{t.tokens_per_s:,.0f} / {f'{t.predicted_tps:,.0f}' if t.predicted_tps else '-'} | {largest} | "
                     f"{ratio} |")
    return lines


def summary(rows: list[Row], device: str) -> list[str]:
    ran = [r.at_recommended for r in rows if r.at_recommended and r.at_recommended.ok]
    failed = [r.name for r in rows if not r.skipped and (r.at_recommended is None or not r.at_recommended.ok)]
    out = [f"- recommended batches that ran: {len(ran)} of {len([r for r in rows if not r.skipped])}"
           + (f" (did not run: {', '.join(failed)})" if failed else "")]
    if ran:
        worst = max(ran, key=lambda t: abs(t.est_allocated - t.allocated) / max(t.allocated, 1))
        out.append(f"- allocated: worst error {_err(worst.est_allocated, worst.allocated)}")
        if device == "cuda":
            worst = max(ran, key=lambda t: abs(t.est_reserved - t.reserved) / max(t.reserved, 1))
            out.append(f"- reserved: worst error {_err(worst.est_reserved, worst.reserved)}")
    speed = sorted(t.tokens_per_s / t.predicted_tps for t in ran if t.predicted_tps and t.tokens_per_s)
    if speed:
        out.append(f"- tokens/s measured / predicted (recommender/throughput.py): median {speed[len(speed) // 2]:.2f}, "
                   f"range {speed[0]:.2f} to {speed[-1]:.2f} over {len(speed)} configurations")
    ratios = [r.recommended / r.largest for r in rows if r.largest]
    if ratios:
        out.append(f"- recommended / largest batch that ran: min {min(ratios):.2f}")
    return out


def main(argv: list[str] | None = None) -> int:
    import warnings

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=None, help="append the Markdown table to this file")
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop searching after this many seconds")
    ap.add_argument("--search", type=int, default=3, help="extra trials per configuration for the largest batch")
    ap.add_argument("--smoke", action="store_true", help="two tiny configurations on the CPU (no GPU needed)")
    ap.add_argument("--only", default="", help="run the configurations whose name contains this")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    import torch

    from finetune_helper.recommender.gpu import detect_gpu, resolve_gpu

    t0 = time.time()
    deadline = t0 + args.budget_s
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("gpu_check: no CUDA GPU here (use --smoke to check this script on the CPU)", file=sys.stderr)
        return 2
    device = Device("cuda" if cuda else "cpu")
    gpu = detect_gpu() if cuda else resolve_gpu(SMOKE_GPU)
    print(f"# GPU check: {gpu.name} ({gpu.memory_bytes / GIB:.1f} GiB); {versions()}", flush=True)
    rows: list[Row] = []
    for entry in SMOKE_GRID if args.smoke else GRID:
        if args.only.lower() in " ".join(map(str, entry)).lower():
            rows.append(check_replica(entry, device, gpu, args, deadline))
            print(*table(rows[-1:], device.name)[2:], flush=True)
    if not args.smoke and (not args.only or args.only.lower() in RUNNER_MODEL.lower()):
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = random_checkpoint(RUNNER_MODEL, Path(tmp))
            data = long_rows(Path(tmp) / "rows.jsonl", 3000)
            for method, seq, gc in RUNNER_GRID:
                rows.append(check_runner(method, seq, gc, checkpoint, data, device, gpu, deadline))
                print(*table(rows[-1:], device.name)[2:], flush=True)
    seconds = time.time() - t0
    report = [f"## GPU check, {time.strftime('%Y-%m-%d')}: {gpu.name}", "",
              f"`bash benchmarks/gpu_check.sh` in {seconds:.0f} s. Driver: {driver()}. "
              f"Python {platform.python_version()}; {versions()}.", "",
              *table(rows, device.name), "", *summary(rows, device.name), ""]
    print("\n".join(report))
    if args.results:
        with args.results.open("a") as f:
            f.write("\n".join(report) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
