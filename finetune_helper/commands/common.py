"""What several subcommands share: the model / plan flags, gathering a plan from them, and plain-text tables."""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import sys
import textwrap
from typing import Any, Sequence, TextIO

from .. import defaults
from ..errors import FinetuneHelperError
from ..units import fmt_count, fmt_gib


def emit(args: argparse.Namespace, text: str) -> None:
    """A command's machine-readable output (``--json``, an export to stdout): to the real stdout, which ``cli.main``
    keeps clear of what libraries print meanwhile."""
    print(text, end="" if text.endswith("\n") else "\n", file=getattr(args, "stdout", None) or sys.stdout, flush=True)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="catalog id or alias (see `models`), local directory with "
                   "config.json, Hub id (only config.json is fetched), or a size such as 7B")
    p.add_argument("--method", default=defaults.METHOD, choices=defaults.METHODS, help="default: %(default)s")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: min(2048, model max))")
    p.add_argument("--optim", default=None, help="a TrainingArguments.optim name: adamw_torch, adamw_torch_fused, "
                   "adamw_bnb_8bit, paged_adamw_8bit, adafactor, sgd, ...")
    p.add_argument("--lora-r", type=int, default=defaults.LORA_R, help="LoRA rank (default: %(default)s)")
    p.add_argument("--lora-alpha", type=int, default=defaults.LORA_ALPHA, help="LoRA alpha (default: %(default)s)")
    p.add_argument("--lora-dropout", type=float, default=defaults.LORA_DROPOUT,
                   help="LoRA dropout (default: %(default)s)")
    p.add_argument("--target-modules", default=defaults.TARGET_MODULES, type=target_modules,
                   help="modules LoRA adapts: all-linear, or names separated by commas such as q_proj,v_proj "
                   "(default: %(default)s)")
    p.add_argument("--attn-implementation", default=None, choices=("sdpa", "eager", "flash_attention_2"),
                   help="attention kernel (default: the architecture's own: sdpa; eager for Gemma 2)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")


def add_plan_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--gpu", required=True, help="catalog GPU (see `gpus`; case, spaces and hyphens ignored), an "
                   "amount such as 24GB (10^9 bytes) or 80GiB (2^30 bytes), or auto")
    p.add_argument("--gpus", type=int, default=None, help="number of GPUs (default: 1, or all local GPUs with "
                   "--gpu auto)")
    p.add_argument("--price-per-hour", type=float, default=None, help="price of one GPU-hour: adds the run's "
                   "predicted cost (time x GPUs x price)")
    p.add_argument("--dataset-size", type=int, default=None,
                   help=f"training examples; with --packing, the packed rows of --seq-len tokens they make (TRL packs "
                   f"before training) (default: {defaults.ASSUMED_DATASET_SIZE} assumed)")
    p.add_argument("--epochs", type=float, default=defaults.EPOCHS, help="default: %(default)s")
    p.add_argument("--target-batch", type=int, default=defaults.TARGET_EFFECTIVE_BATCH,
                   help="target effective batch in sequences (default: %(default)s, Llama 2 SFT)")
    p.add_argument("--lr-min", type=float, default=defaults.LR_MIN, help="lower LR bound (default: %(default)g)")
    p.add_argument("--lr-max", type=float, default=defaults.LR_MAX, help="upper LR bound (default: %(default)g)")
    p.add_argument("--scheduler", default=defaults.SCHEDULER, choices=defaults.SCHEDULES,
                   help="learning-rate schedule after warmup (default: %(default)s)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="force on/off (default: on when batch 1 needs it or it fits a larger micro-batch)")
    p.add_argument("--safety-margin", type=float, default=defaults.SAFETY_MARGIN, help="fraction of GPU memory kept "
                   "free (default: %(default)s)")
    p.add_argument("--weights-dtype", default=None, choices=("fp32", "bf16"), help="full fine-tuning's weights "
                   "(default: fp32 masters under autocast, pure bf16 only when that does not fit)")
    p.add_argument("--packing", action=argparse.BooleanOptionalAction, default=None,
                   help="the data is packed (TRL packing=True, padding-free): examples are packed into rows of "
                   "--seq-len tokens, a micro-batch of rows runs as one row, and --dataset-size counts rows (default: "
                   "off; with --data, packed where predicted faster and a variable-length attention kernel, "
                   "flash_attention_2, runs)")
    p.add_argument("--strategy", default=defaults.STRATEGY, choices=defaults.STRATEGIES,
                   help="several GPUs: auto (the fastest predicted of DDP, FSDP, ZeRO-2 and ZeRO-3 that fits), ddp, "
                   "fsdp, or DeepSpeed zero2 / zero3 (default: %(default)s)")
    p.add_argument("--offload", default=defaults.OFFLOAD, choices=defaults.OFFLOADS,
                   help="DeepSpeed's offload to host memory: optimizer (zero2 / zero3), all (zero3; parameters too)")
    add_trainer_arg(p)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="where the step runs: cuda, or cpu to "
                   "plan a CPU run's memory (no CUDA context, the CPU kernels; exports add use_cpu) "
                   "(default: %(default)s)")
    add_data_args(p)


def add_data_args(p: argparse.ArgumentParser) -> None:
    """``--data`` and its options: plan from the data itself (its example count, a max_length covering its p99)."""
    from ..train.data_profile import DEFAULT_SAMPLE

    p.add_argument("--data", default=None, metavar="PATH|HUB_ID",
                   help="your training data (.json/.jsonl/.csv/.parquet file or folder, or a Hub dataset id): "
                   "tokenized with the model's tokenizer, it gives the example count (--packing: the packed rows), "
                   "a max_length covering its p99 (unless --seq-len), truncation, padding waste and packing figures")
    p.add_argument("--data-split", default="train", help="the split of --data (default: %(default)s)")
    p.add_argument("--data-config", default=None, help="the configuration of a Hub dataset given to --data")
    p.add_argument("--data-sample", type=int, default=DEFAULT_SAMPLE,
                   help="tokenize at most this many examples of --data, a fixed-seed sample, and state the sampling "
                   "error (0: all) (default: %(default)s)")


def add_trainer_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trainer", default=defaults.TRAINER, choices=defaults.TRAINERS,
                   help="the trainer the plan is for: trl (TRL's SFTTrainer, what `run` executes: no vocabulary-wide "
                   "logits) or transformers (transformers.Trainer: full logits in fp32) (default: %(default)s)")


def target_modules(text: str) -> str | tuple[str, ...]:
    """``all-linear`` or ``q_proj,v_proj`` -> the value PlanRequest / TrainingSetup take."""
    names = tuple(n.strip() for n in str(text).split(",") if n.strip())
    return names[0] if names == ("all-linear",) else names


def gather_plan(args: argparse.Namespace):  # -> recommend.plan.Plan
    """The plan the flags of :func:`add_plan_args` ask for.  With ``--data``, the data's profile
    (:class:`~finetune_helper.train.data_profile.DataProfile`, padding waste at the plan's micro-batch) is left in
    ``args.data_profile`` (None without ``--data``)."""
    plan, profile = gather_plan_and_data(args)
    args.data_profile = profile
    return plan


#: the data loader's fields (a recipe's) as the command-line flags that set them
_DATA_FLAGS = {"data.path": "data", "data.split": "data-split", "data.config": "data-config", "data.format": "data",
               "data.columns": "data"}


def gather_plan_and_data(args: argparse.Namespace):  # -> (Plan, DataProfile | None)
    """The plan, and with ``--data`` the data's profile planned with
    (:func:`~finetune_helper.train.data_profile.plan_with_data`: the example count, or with ``--packing`` the packed
    rows, as the dataset size; the recommended max_length as the sequence length unless ``--seq-len`` is given)."""
    from ..recommender.gpu import resolve_gpu
    from ..recommender.model import resolve_model
    from ..recommender.plan import PlanRequest, recommend_plan

    price = getattr(args, "price_per_hour", None)
    if price is not None and not (math.isfinite(price) and price > 0):
        raise FinetuneHelperError("price-per-hour", f"must be a positive number, got {price!r}")
    data = getattr(args, "data", None)
    if data is not None and args.dataset_size is not None:
        raise FinetuneHelperError("dataset-size", "cannot be given with --data: --data counts the examples (with "
                                  "--packing the packed rows); leave out --dataset-size or --data")
    spec = resolve_model(args.model)
    gpu = resolve_gpu(args.gpu)
    gpus = args.gpus
    if gpus is None:
        from ..recommender.gpu import detect_gpu_count

        gpus = detect_gpu_count() if args.gpu.strip().lower() == "auto" else 1
    from ..recommender.calibration import lookup

    req = PlanRequest(model=spec, gpu=gpu, gpus=gpus, method=args.method, seq_len=args.seq_len,
                      dataset_size=args.dataset_size, epochs=args.epochs, target_effective_batch=args.target_batch,
                      optim=args.optim, lr_min=args.lr_min, lr_max=args.lr_max,
                      gradient_checkpointing=args.gradient_checkpointing, safety_margin=args.safety_margin,
                      lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      lora_target_modules=args.target_modules, weights_dtype=args.weights_dtype,
                      attn_implementation=args.attn_implementation, packing=bool(args.packing),
                      scheduler=args.scheduler, strategy=args.strategy, offload=args.offload, trainer=args.trainer,
                      device=args.device,
                      calibration=lookup(gpu.name, spec.name, args.method))
    if data is None:
        return recommend_plan(req), None
    from ..train.data_profile import plan_with_data

    # the request is checked (every flag, --seq-len against the model) before the data is read
    return plan_with_data(req, profile_for_plan(args, spec), choose_packing=args.packing is None)


def profile_for_plan(args: argparse.Namespace, spec):  # -> DataProfile
    """``--data`` profiled for ``spec`` (at ``--seq-len`` when given); the loader's errors name the flags."""
    from ..train.data_profile import profile_data

    try:
        return profile_data(args.data, model=spec, split=args.data_split, config=args.data_config,
                            max_length=args.seq_len, sample=getattr(args, "data_sample", None))
    except FinetuneHelperError as exc:
        if exc.field in _DATA_FLAGS:
            raise FinetuneHelperError(_DATA_FLAGS[exc.field], exc.message) from None
        raise


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


#: the width when stdout is not a terminal and COLUMNS is not set (a pipe, a file, a test's captured output)
DEFAULT_WIDTH = 100
#: the narrowest width wrapped output is laid out for (a setting and its value still fit on one line)
MIN_WIDTH = 60


def terminal_width(stream: TextIO | None = None) -> int:
    """The columns to lay text out in: COLUMNS when set, else the terminal's width when ``stream`` (stdout) is one
    (``shutil.get_terminal_size``), else :data:`DEFAULT_WIDTH`; never below :data:`MIN_WIDTH`."""
    try:
        columns = int(os.environ.get("COLUMNS", "") or 0)
    except ValueError:
        columns = 0
    if columns <= 0:
        stream = stream or sys.stdout
        try:
            tty = stream.isatty()
        except (AttributeError, ValueError, OSError):
            tty = False
        columns = shutil.get_terminal_size((DEFAULT_WIDTH, 24)).columns if tty else DEFAULT_WIDTH
    return max(MIN_WIDTH, columns)


#: a figure and its unit (``62.96 GiB``): wrapped lines keep them together
_FIGURE_UNIT = re.compile(r"(?<=\d) (?=(?:GiB|GB|MiB)\b)")


def wrap_lines(text: str, width: int, indent: str = "", hanging: str = "") -> list[str]:
    """``text`` as lines of at most ``width`` columns (``textwrap``): the first after ``indent``, the others after
    ``hanging``.  Flags keep their hyphens (``--lr-max`` is never split at a hyphen) and a figure its unit."""
    glued = _FIGURE_UNIT.sub("\u00a0", text)  # textwrap breaks at ASCII whitespace only
    return [line.replace("\u00a0", " ") for line in textwrap.wrap(
        glued, width, initial_indent=indent, subsequent_indent=hanging, break_on_hyphens=False)]


def wrap(text: str, width: int, indent: str = "", hanging: str = "    ") -> str:
    """:func:`wrap_lines` joined: one paragraph with a hanging indent (4 spaces unless told)."""
    return "\n".join(wrap_lines(text, width, indent, hanging)) or indent.rstrip()


def wrapped_table(rows: Sequence[Sequence[Any]], header: Sequence[str], width: int, *, min_wrap: int = 40,
                  indent: int = 4) -> str:
    """:func:`table` whose last column (a reason, a note) wraps so that no line is wider than ``width``.

    The other columns keep their text on one line, padded as :func:`table` pads them.  When the last column would
    still get ``min_wrap`` columns or more it stays a column and its continuation lines are indented to it;
    otherwise each row is its other cells on one line and its last cell on its own lines under them, indented by
    ``indent`` (the header says so: the last column's name is on its own indented line)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    fixed = len(header) - 1
    widths = [max(len(r[i]) for r in cells) for i in range(fixed)]
    lead = sum(widths) + 2 * fixed

    def left(row: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(row[:fixed], widths)) + "  "

    room = width - lead
    if room >= min_wrap:
        last = min(room, max(len(r[fixed]) for r in cells))
        lines = [(left(cells[0]) + cells[0][fixed]).rstrip(), "  ".join("-" * w for w in [*widths, last])]
        for row in cells[1:]:
            wrapped = wrap_lines(row[fixed], room) or [""]
            lines.append((left(row) + wrapped[0]).rstrip())
            lines += [" " * lead + more for more in wrapped[1:]]
        return "\n".join(lines)
    pad = " " * indent
    lines = [left(cells[0]).rstrip(), pad + cells[0][fixed], "  ".join("-" * w for w in widths)]
    for row in cells[1:]:
        lines.append(left(row).rstrip())
        if row[fixed]:
            lines.append(wrap(row[fixed], width, pad, pad))
    return "\n".join(lines)


def breakdown_table(breakdown: dict[str, int], total: int) -> str:
    rows = [[k, fmt_gib(v), f"{v / total:6.1%}" if total else "-"] for k, v in breakdown.items()]
    rows.append(["total", fmt_gib(total), "100.0%"])
    return table(rows, ["peak memory per GPU", "GiB (2^30 B)", "share"])


def model_line(name: str, model_type: str, parameters: int, trainable: int) -> str:
    return f"{name} ({model_type}, {fmt_count(parameters)} parameters, {fmt_count(trainable)} trainable)"
