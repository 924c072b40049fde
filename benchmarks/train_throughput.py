"""Training throughput on the CPU: padding-free packing vs padded batches, and the runner's overhead.

    .venv/bin/python benchmarks/train_throughput.py [--steps 60] [--pack-steps 8] [--repeats 3] [--threads 2]

1. Packing: a variable-length data set made with the project's own generators (several addition / digit-reversal
   problems concatenated per example, a long-tailed count of problems, written as .jsonl), trained by the real
   runner (``finetune_helper.train.runner.run``) on ``recipes/tiny-demo.yaml`` with ``data.packing=true`` (TRL
   ``packing=True, padding_free=True``, BFD) and ``data.packing=false`` (padded batches), same target batch, same
   number of optimizer steps (``--pack-steps``: fewer than ``--steps``, because on the CPU a packed step is slow;
   see the diagnostic it prints).  Packing changes how many examples a step sees, so the figure compared is tokens/s:
   non-padding input tokens (``include_num_input_tokens_seen="non_padding"``) over the Trainer's ``train_runtime``,
   as the runner's summary reports it.
2. Overhead: the runner on tiny-demo (built-in model and data) for ``--steps`` steps, against the same
   ``SFTTrainer`` built by hand: ``SFTConfig(**training_args.json)`` from the runner's run folder, the model
   directory (``tiny.base_model_dir()``), the same data converted with ``datasets_io``.  What is compared is the
   Trainer's own ``train_runtime`` (the wall time of the training loop inside ``trainer.train()``, after the
   dataloader and optimizer are set up), taken the same way in both cases; the runner adds its callbacks (progress
   line + metrics.jsonl, divergence/signal guard).  The runner's end-to-end wall time (model load, exact match
   before/after, final eval, save) is printed beside it for scale; it is not the overhead asked about.

Every measurement is repeated ``--repeats`` times, interleaved (A B B A A B ...) so drift hits both sides alike,
and the median is reported.  Everything is written under one temporary directory (run folders,
the datasets cache via HF_HOME), removed at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny-demo.yaml"

# Before anything imports huggingface_hub / datasets: nothing leaves this machine or lands outside the temp dir.
TMP = Path(tempfile.mkdtemp(prefix="fh-train-throughput-"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = str(TMP / "hf")
os.environ["HF_DATASETS_CACHE"] = str(TMP / "hf" / "datasets")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=FutureWarning)
sys.path.insert(0, str(ROOT))


def quiet(_msg: str) -> None:
    pass


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def interleave(repeats: int) -> list[int]:
    """0/1 order A B B A A B ...: each side runs first as often as second (ABBA cancels linear drift)."""
    order = []
    for i in range(repeats):
        order += [0, 1] if i % 2 == 0 else [1, 0]
    return order


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def check_threads(n: int) -> None:
    import torch

    if torch.get_num_threads() != n:
        print(f"  warning: torch threads changed to {torch.get_num_threads()} (set {n}); reset", flush=True)
        torch.set_num_threads(n)


class TrainTimer:
    """A TrainerCallback that records the model's attention implementation, the on_train_begin..on_train_end time
    and the interval between consecutive ``on_step_end`` calls (one optimizer step, everything in the loop included).
    The same callback goes into the runner (``extra_callbacks``) and the hand-built trainer, so it costs both alike."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Timer(TrainerCallback):
            def __init__(self):
                self.begin = self.end = None
                self.attn = None
                self.marks: list[float] = []

            def on_train_begin(self, args, state, control, model=None, **kw):
                self.begin = time.perf_counter()
                self.marks = [self.begin]
                if model is not None:
                    self.attn = getattr(model.config, "_attn_implementation", None)

            def on_step_end(self, args, state, control, **kw):
                self.marks.append(time.perf_counter())

            def on_train_end(self, args, state, control, **kw):
                self.end = time.perf_counter()

            def step_median(self) -> float:
                """Median step interval, the first step (warm-up) left out."""
                gaps = [b - a for a, b in zip(self.marks[1:], self.marks[2:])]
                return statistics.median(gaps)

        return _Timer()


def train_runtime(run_dir: Path) -> float:
    """The Trainer's train_runtime, from the runner's metrics.jsonl (its final log line carries it)."""
    runtime = None
    with open(run_dir / "metrics.jsonl", encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            if "train_runtime" in rec:
                runtime = rec["train_runtime"]
    if runtime is None:
        raise RuntimeError(f"no train_runtime in {run_dir}/metrics.jsonl")
    return float(runtime)


# ------------------------------------------------------------------------------------------- 1. packing
def variable_length_dataset(path: Path, n: int, seed: int = 0) -> list[dict]:
    """``n`` alpaca examples, each 1-16 problems (addition and digit reversal, from ``synthetic_dataset``) asked
    together and answered line by line.  The count of problems is long-tailed (1 + exponential, mean ~3.5), so a
    batch of 32 usually holds one long example and many short ones: the case padding wastes most on."""
    from finetune_helper.train.tiny import synthetic_dataset, write_dataset

    pool = synthetic_dataset(6000, seed=seed, fmt="alpaca", tasks=("add", "reverse"))
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = min(16, 1 + int(rng.expovariate(1 / 2.5)))
        probs = rng.sample(pool, k)
        out.append({"instruction": "\n".join(p["instruction"] for p in probs), "input": "",
                    "output": "\n".join(p["output"] for p in probs)})
    write_dataset(path, out)
    return out


def token_lengths(examples: list[dict], model_dir: Path) -> list[int]:
    """Tokens per example as TRL renders it (chat template over prompt + completion)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    lengths = []
    for ex in examples:
        msgs = [{"role": "user", "content": ex["instruction"]}, {"role": "assistant", "content": ex["output"]}]
        lengths.append(len(tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]))
    return lengths


def padded_fraction(lengths: list[int], batch: int, seed: int) -> float:
    """Share of padding positions in padded batches of ``batch`` random examples (pad to the batch's longest)."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    real = positions = 0
    for i in range(0, len(order) - batch + 1, batch):
        chunk = [lengths[j] for j in order[i:i + batch]]
        real += sum(chunk)
        positions += max(chunk) * len(chunk)
    return 1 - real / positions


def bench_packing(steps: int, repeats: int, threads: int, max_length: int, n_examples: int) -> dict:
    from finetune_helper.train.runner import run
    from finetune_helper.train.tiny import base_model_dir

    data = TMP / "variable.jsonl"
    examples = variable_length_dataset(data, n_examples)
    model_dir = base_model_dir()
    lengths = token_lengths(examples, model_dir)
    qs = statistics.quantiles(lengths, n=10)
    print(f"variable-length data: {len(lengths)} examples ({data.name}), tokens per example: min {min(lengths)}, "
          f"p10 {qs[0]:.0f}, median {median(lengths):.0f}, mean {statistics.mean(lengths):.1f}, p90 {qs[-1]:.0f}, "
          f"max {max(lengths)}; max_length {max_length}", flush=True)
    print(f"  padded batches of 32 from it: {padded_fraction(lengths, 32, 0):.0%} of positions are padding",
          flush=True)

    common = [f"data.path={data}", f"data.max_length={max_length}", "data.eval_fraction=0",
              f"training.max_steps={steps}", "training.save_strategy='no'"]
    modes = [("packed (padding-free, BFD)", "data.packing=true"), ("padded", "data.packing=false")]
    results: dict[int, list[dict]] = {0: [], 1: []}
    # warm-up: one step of each mode, so first-call costs (allocator, kernels) are not in a timed run
    for i, (_, flag) in enumerate(modes):
        set_threads(threads)
        run(RECIPE, [*common[:-2], "training.max_steps=1", "training.save_strategy='no'", flag],
            output_dir=str(TMP / f"pack-warmup-{i}"), log=quiet)
    for r, i in enumerate(interleave(repeats)):
        name, flag = modes[i]
        gc.collect()
        set_threads(threads)
        res = run(RECIPE, [*common, flag], output_dir=str(TMP / f"pack-{i}-{r}"), log=quiet)
        check_threads(threads)
        s = res.summary
        rt = train_runtime(res.run_dir)
        tokens = s["tokens_per_second"] * rt
        results[i].append({"tps": s["tokens_per_second"], "runtime": rt, "wall": s["wall_seconds"],
                           "steps": s["global_step"], "tokens": tokens})
        print(f"  run {r + 1}: {name:27s} {s['global_step']} steps, train {rt:6.2f} s, "
              f"{s['tokens_per_second']:9,.0f} tok/s, {tokens / s['global_step']:7,.0f} tok/step", flush=True)

    print(f"\npacking vs padding, {steps} steps of per-device batch 32 (accumulation 1), median of {repeats}, "
          f"{threads} torch threads:")
    print(f"  {'mode':27s} {'tokens/s':>10s} {'train s':>8s} {'s/step':>7s} {'tokens/step':>12s} "
          f"{'run wall s':>10s}")
    med = {}
    for i, (name, _) in enumerate(modes):
        rs = results[i]
        med[i] = {k: median([x[k] for x in rs]) for k in ("tps", "runtime", "wall", "tokens")}
        m = med[i]
        print(f"  {name:27s} {m['tps']:10,.0f} {m['runtime']:8.2f} {m['runtime'] / steps:7.3f} "
              f"{m['tokens'] / steps:12,.0f} {m['wall']:10.2f}")
    ratio = med[0]["tps"] / med[1]["tps"]
    print(f"  tokens/s ratio packed / padded: {ratio:.2f}x")
    attention_diagnostic(model_dir, threads, rows=32, max_length=max_length, seg=50)
    return {"ratio": ratio, **{f"m{i}": med[i] for i in med}}


def attention_diagnostic(model_dir: Path, threads: int, rows: int, max_length: int, seg: int) -> None:
    """Why: one forward+backward of the tiny model on the same tokens laid out two ways.  A padding-free batch is
    one row of ``rows * max_length`` tokens; without a varlen (flash-attention) kernel, transformers turns its
    ``position_ids`` into a block-diagonal causal mask over the whole row and SDPA pays for the full L x L."""
    import torch
    from transformers import AutoModelForCausalLM

    set_threads(threads)
    n_seg = rows * max_length // seg
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 400, (n_seg, seg), generator=g)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.train()

    def fwd_bwd(**kw) -> float:
        best = float("inf")
        for _ in range(2):  # first call warms up; keep the faster
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            model(**kw).loss.backward()
            best = min(best, time.perf_counter() - t0)
        return best

    flat = ids.reshape(1, -1)
    packed = fwd_bwd(input_ids=flat, labels=flat, position_ids=torch.arange(seg).repeat(n_seg)[None])
    separate = fwd_bwd(input_ids=ids, labels=ids, attention_mask=torch.ones_like(ids))
    print(f"  why (one forward+backward, sdpa, {flat.shape[1]:,} tokens = {n_seg} sequences of {seg}): as one "
          f"padding-free row {packed:.2f} s; as {n_seg} separate rows {separate:.2f} s ({packed / separate:.1f}x)")


# ------------------------------------------------------------------------------------------- 2. overhead
def hand_trainer(run_dir: Path, out_dir: Path, attn: str | None, callbacks: list | None = None):
    """The runner's SFTTrainer, built by hand from its run folder."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import SFTConfig, SFTTrainer

    from finetune_helper.train import data as datasets_io
    from finetune_helper.train.recipe import load_recipe
    from finetune_helper.train.tiny import N_DEMO_TRAIN, base_model_dir, synthetic_dataset

    recipe = load_recipe(run_dir / "recipe.yaml")
    kwargs = json.loads((run_dir / "training_args.json").read_text())
    kwargs["output_dir"] = str(out_dir)
    args = SFTConfig(**kwargs)
    model_dir = base_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    n = recipe.data.max_examples or N_DEMO_TRAIN
    fmt = recipe.data.format if recipe.data.format != "auto" else "alpaca"
    dataset = Dataset.from_list(synthetic_dataset(n, seed=recipe.seed, split="train", fmt=fmt))
    train, evaluation = datasets_io.split_eval(dataset, recipe.data.eval_fraction, recipe.seed)
    supported = datasets_io.chat_template_supports_assistant_mask(tokenizer)
    train, _, _ = datasets_io.to_trl_dataset(train, fmt, assistant_mask_supported=supported)
    if evaluation is not None:
        evaluation, _, _ = datasets_io.to_trl_dataset(evaluation, fmt, assistant_mask_supported=supported)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                         processing_class=tokenizer, callbacks=callbacks)
    for printer in (PrinterCallback, ProgressCallback):  # the runner removes them too (disable_tqdm leaves Printer)
        trainer.remove_callback(printer)
    return trainer


def bench_overhead(steps: int, repeats: int, threads: int) -> dict:
    from finetune_helper.train.runner import run

    over = [f"training.max_steps={steps}"]
    # warm-up runner run: its run folder gives training_args.json (identical for every run but output_dir)
    set_threads(threads)
    timer = TrainTimer()
    ref = run(RECIPE, over, output_dir=str(TMP / "overhead-ref"), log=quiet, extra_callbacks=[timer])
    attn = timer.attn
    set_threads(threads)
    hand_trainer(ref.run_dir, TMP / "hand-warmup", attn).train()  # warm-up of the hand path

    rows: dict[int, list[dict]] = {0: [], 1: []}
    ratios, step_ratios = [], []
    order = interleave(repeats)
    for r, i in enumerate(order):
        gc.collect()
        set_threads(threads)
        timer = TrainTimer()
        if i == 0:
            res = run(RECIPE, over, output_dir=str(TMP / f"runner-{r}"), log=quiet, extra_callbacks=[timer])
            rt, done, extra = train_runtime(res.run_dir), res.summary["global_step"], res.summary["wall_seconds"]
        else:
            trainer = hand_trainer(ref.run_dir, TMP / f"hand-{r}", attn, callbacks=[timer])
            t0 = time.perf_counter()
            out = trainer.train()
            extra = time.perf_counter() - t0
            rt, done = out.metrics["train_runtime"], trainer.state.global_step
            del trainer, out
        check_threads(threads)
        rows[i].append({"rt": rt, "step": timer.step_median(), "extra": extra})
        label = ("runner ", "run() wall") if i == 0 else ("by hand", "trainer.train() wall")
        print(f"  run {r + 1:2d}: {label[0]} {done} steps, train_runtime {rt:6.3f} s ({rt / steps * 1e3:6.2f} ms/step), "
              f"median step {timer.step_median() * 1e3:6.2f} ms; {label[1]} {extra:.2f} s", flush=True)
        if r % 2 == 1:  # a pair (runner, hand) run back to back: their ratio is free of slow drift
            a, b = (rows[0][-1], rows[1][-1])
            ratios.append(a["rt"] / b["rt"])
            step_ratios.append(a["step"] / b["step"])

    med = {i: {k: median([x[k] for x in rows[i]]) for k in ("rt", "step", "extra")} for i in rows}
    overhead = median(ratios) - 1
    print(f"\nrunner overhead, tiny-demo (builtin:tiny-llama, builtin:arithmetic, batch 32, attn {attn}), {steps} "
          f"steps, median of {repeats}, {threads} torch threads:")
    print(f"  {'':22s} {'train_runtime s':>15s} {'ms/step':>8s} {'median step ms':>15s}")
    for i, name in ((1, "hand-built SFTTrainer"), (0, "runner")):
        m = med[i]
        print(f"  {name:22s} {m['rt']:15.3f} {m['rt'] / steps * 1e3:8.2f} {m['step'] * 1e3:15.2f}")
    print(f"  overhead in the training loop: {overhead:+.1%} (median of the {len(ratios)} back-to-back pairs' "
          f"train_runtime ratios: {', '.join(f'{x - 1:+.1%}' for x in ratios)}; target <= 3%)")
    print(f"    from the medians above: {med[0]['rt'] / med[1]['rt'] - 1:+.1%}; steady steps only (median step "
          f"interval, logging steps excluded), paired: {median(step_ratios) - 1:+.1%}")
    print(f"  for scale: the runner's whole run() (model load, exact match on 200 held-out problems before and "
          f"after, final eval, save) took {med[0]['extra']:.2f} s; the hand-built trainer.train() call "
          f"{med[1]['extra']:.2f} s")
    cb_step = callback_cost(logging_steps=10)
    print(f"  the runner's callbacks alone (Progress + Guard, called directly, 1 log per 10 steps): "
          f"{cb_step * 1e6:.1f} us/step = {cb_step / med[1]['rt'] * steps:.3%} of a hand-built step")
    return {"overhead": overhead}


def callback_cost(logging_steps: int, n: int = 2000) -> float:
    """Seconds per step that the runner's own callbacks cost (on_step_end every step, on_log every
    ``logging_steps``), measured by calling them directly: a bound that the noise of whole runs cannot give."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from finetune_helper.train.callbacks import runner_callbacks

    run_dir = TMP / "callback-cost"
    run_dir.mkdir(parents=True, exist_ok=True)
    callbacks = runner_callbacks(run_dir, quiet, {})
    args = TrainingArguments(output_dir=str(run_dir), report_to="none", use_cpu=True)
    st, control = TrainerState(), TrainerControl()
    st.max_steps, st.num_input_tokens_seen = n, 0
    for cb in callbacks:
        cb.on_train_begin(args, st, control)
    logs = {"loss": 1.0, "grad_norm": 1.0, "learning_rate": 1e-3, "epoch": 0.1}
    t0 = time.perf_counter()
    for step in range(1, n + 1):
        st.global_step, st.num_input_tokens_seen = step, step * 700
        for cb in callbacks:
            cb.on_step_end(args, st, control)
        if step % logging_steps == 0:
            for cb in callbacks:
                cb.on_log(args, st, control, logs=dict(logs))
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps per run of the overhead benchmark")
    ap.add_argument("--pack-steps", type=int, default=8,
                    help="optimizer steps per run of the packing benchmark (a packed step takes ~7 s on 2 cores)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per side (median reported)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch.set_num_threads")
    ap.add_argument("--max-length", type=int, default=256, help="data.max_length of the packing benchmark")
    ap.add_argument("--examples", type=int, default=4000, help="examples in the variable-length data set")
    ap.add_argument("--only", choices=("packing", "overhead"), help="run one benchmark")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args()

    from transformers.utils import logging as hf_logging

    import torch

    hf_logging.set_verbosity_error()
    set_threads(args.threads)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}; "
          f"temp dir {TMP}", flush=True)
    t0 = time.perf_counter()
    try:
        if args.only != "packing":
            print("\n== runner overhead vs hand-built SFTTrainer ==", flush=True)
            bench_overhead(args.steps, args.repeats, args.threads)
        if args.only != "overhead":
            print("\n== padding-free packing vs padded batches (variable-length data) ==", flush=True)
            bench_packing(args.pack_steps, args.repeats, args.threads, args.max_length, args.examples)
    finally:
        if args.keep:
            print(f"\nkept {TMP}")
        else:
            shutil.rmtree(TMP, ignore_errors=True)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
