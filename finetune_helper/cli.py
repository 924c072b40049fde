"""The ``finetune-helper`` command: a thin front end over the core (gather, then print).

Bad input of any kind ends in one line on stderr, ``finetune-helper: error: --flag: what is allowed``, and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from typing import Any, Sequence

from .errors import FinetuneHelperError

PROG = "finetune-helper"


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors are one line (no usage block) and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        _fail(message.replace("argument ", "", 1))


def _fail(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


#: error fields that name a recipe setting (``data.path``) or the recipe itself rather than a command-line flag
_RECIPE_FIELDS = ("recipe", "override", "training", "seed", "output_dir")


def _flag(field: str) -> str:
    if field.startswith("-") or " " in field or "." in field or field in _RECIPE_FIELDS:
        return field
    return f"--{field.replace('_', '-')}"


# ------------------------------------------------------------------------------------------- arguments
def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="catalog id or alias (see `models`), local directory with "
                   "config.json, Hub id (only config.json is fetched), or a size such as 7B")
    p.add_argument("--method", default="full", choices=("full", "lora", "qlora"), help="default: %(default)s")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: min(2048, model max))")
    p.add_argument("--optim", default=None, help="a TrainingArguments.optim name: adamw_torch, adamw_torch_fused, "
                   "adamw_bnb_8bit, paged_adamw_8bit, adafactor, sgd, ...")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default: %(default)s)")
    p.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha (default: %(default)s)")
    p.add_argument("--attn-implementation", default=None, choices=("sdpa", "eager", "flash_attention_2"),
                   help="attention kernel (default: the architecture's own: sdpa; eager for Gemma 2)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")


def _add_plan_args(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--gpu", required=True, help="catalog GPU (see `gpus`; case, spaces and hyphens ignored), an "
                   "amount such as 24GB (10^9 bytes) or 80GiB (2^30 bytes), or auto")
    p.add_argument("--gpus", type=int, default=None, help="number of GPUs (default: 1, or all local GPUs with "
                   "--gpu auto)")
    p.add_argument("--dataset-size", type=int, default=None, help="training examples (default: 10000 assumed)")
    p.add_argument("--epochs", type=float, default=3.0, help="default: %(default)s")
    p.add_argument("--target-batch", type=int, default=64, help="target effective batch in sequences (default: "
                   "%(default)s, Llama 2 SFT)")
    p.add_argument("--lr-min", type=float, default=1e-5, help="lower LR bound (default: %(default)g)")
    p.add_argument("--lr-max", type=float, default=5e-5, help="upper LR bound (default: %(default)g)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="force on/off (default: only when needed to fit)")
    p.add_argument("--safety-margin", type=float, default=0.10, help="fraction of GPU memory kept free "
                   "(default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="How to fine-tune this model on this GPU, and will it fit: memory "
                     "estimate, batch / accumulation / learning rate / warmup plan, TrainingArguments export.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    est = sub.add_parser("estimate", help="peak training memory per GPU, as a breakdown")
    _add_model_args(est)
    est.add_argument("--batch", type=int, default=1, help="per-device micro-batch (default: %(default)s)")
    est.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="default: %(default)s")
    est.add_argument("--gradient-checkpointing", action="store_true", help="recompute layers in backward")
    est.add_argument("--weights-dtype", default=None, choices=("bf16", "fp32"), help="full fine-tuning's weight "
                     "storage (default: fp32 masters under bf16/fp16 autocast; bf16 = pure-bf16 training)")
    est.add_argument("--gpus", type=int, default=1, help="number of GPUs (default: %(default)s)")
    est.add_argument("--sharding", default=None, choices=("none", "ddp", "fsdp"),
                     help="default: ddp when --gpus > 1, else none")
    est.set_defaults(func=cmd_estimate)

    rec = sub.add_parser("recommend", help="batch, accumulation, LR, warmup, precision, optimizer, with reasons")
    _add_plan_args(rec)
    rec.set_defaults(func=cmd_recommend)

    exp = sub.add_parser("export", help="the plan as TrainingArguments JSON / YAML / Python / CLI flags")
    _add_plan_args(exp)
    exp.add_argument("--format", default="json", choices=("json", "yaml", "python", "cli"), help="default: %(default)s")
    exp.add_argument("-o", "--output", default=None, help="file to write (default: stdout)")
    exp.add_argument("--output-dir", default=None, help="TrainingArguments.output_dir (default: outputs/<model>)")
    exp.add_argument("--transformers-version", default=None, help="write for this transformers version, e.g. 4.46 "
                     "(default: the installed one)")
    exp.set_defaults(func=cmd_export)

    val = sub.add_parser("validate", help="check a recipe file (and its overrides) without training")
    val.add_argument("recipe", help="a recipe YAML (see recipes/)")
    val.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. training.max_steps=20")
    val.set_defaults(func=cmd_validate)

    run = sub.add_parser("run", help="fine-tune from a recipe: recommend, write the run folder, train")
    run.add_argument("recipe", help="a recipe YAML (see recipes/)")
    run.add_argument("overrides", nargs="*", metavar="key=value",
                     help="dotted overrides, e.g. training.max_steps=20 data.path=my.jsonl")
    run.add_argument("--output-dir", default=None, help="run folder (default: the recipe's output_dir or runs/<name>)")
    run.add_argument("--dry-run", action="store_true", help="write plan.json, training_args.json, recipe.yaml; stop")
    run.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    run.set_defaults(func=cmd_run)

    app = sub.add_parser("app", help="the Gradio app: recommend, export, start / watch / stop runs")
    from finetune_helper_app.options import add_arguments as add_app_arguments

    add_app_arguments(app)
    app.set_defaults(func=cmd_app)

    gpus = sub.add_parser("gpus", help="the GPU catalog")
    gpus.add_argument("--json", action="store_true")
    gpus.set_defaults(func=cmd_gpus)
    models = sub.add_parser("models", help="the model catalog")
    models.add_argument("--json", action="store_true")
    models.set_defaults(func=cmd_models)
    return parser


# ------------------------------------------------------------------------------------------- gathering
def gather_estimate(args: argparse.Namespace) -> dict[str, Any]:
    from .estimate import estimate_memory
    from .model_spec import resolve_model
    from .plan import DEFAULT_OPTIM
    from .training_setup import TrainingSetup

    spec = resolve_model(args.model)
    seq = spec.sequence_length(args.seq_len)
    setup = TrainingSetup(method=args.method, micro_batch_size=args.batch, seq_len=seq, dtype=args.dtype,
                          optim=args.optim or DEFAULT_OPTIM, gradient_checkpointing=args.gradient_checkpointing,
                          lora_r=args.lora_r, lora_alpha=args.lora_alpha, weights_dtype=args.weights_dtype,
                          attn_implementation=args.attn_implementation or spec.default_attn_implementation)
    sharding = args.sharding or ("ddp" if args.gpus > 1 else "none")
    est = estimate_memory(spec, setup, gpus=args.gpus, sharding=sharding)
    return {"model": spec.name, "model_type": spec.model_type, "method": args.method, "batch": args.batch,
            "seq_len": seq, "dtype": args.dtype, "optim": setup.optim,
            "gradient_checkpointing": args.gradient_checkpointing, **est.to_dict()}


def gather_plan(args: argparse.Namespace):  # -> Plan
    from .gpu_spec import resolve_gpu
    from .model_spec import resolve_model
    from .plan import PlanRequest, recommend_plan

    spec = resolve_model(args.model)
    gpu = resolve_gpu(args.gpu)
    gpus = args.gpus
    if gpus is None:
        from .gpu_spec import detect_gpu_count

        gpus = detect_gpu_count() if args.gpu.strip().lower() == "auto" else 1
    req = PlanRequest(model=spec, gpu=gpu, gpus=gpus, method=args.method, seq_len=args.seq_len,
                      dataset_size=args.dataset_size, epochs=args.epochs, target_effective_batch=args.target_batch,
                      optim=args.optim, lr_min=args.lr_min, lr_max=args.lr_max,
                      gradient_checkpointing=args.gradient_checkpointing, safety_margin=args.safety_margin,
                      lora_r=args.lora_r, lora_alpha=args.lora_alpha, attn_implementation=args.attn_implementation)
    return recommend_plan(req)


# ------------------------------------------------------------------------------------------- printing
def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _breakdown_rows(breakdown: dict[str, int], total: int) -> list[list[str]]:
    from .units import fmt_gib

    rows = [[k, fmt_gib(v), f"{v / total:6.1%}" if total else "-"] for k, v in breakdown.items()]
    rows.append(["total", fmt_gib(total), "100.0%"])
    return rows


def cmd_estimate(args: argparse.Namespace) -> None:
    data = gather_estimate(args)
    if args.json:
        print(json.dumps(data, indent=2))
        return
    from .units import fmt_count, fmt_gib

    print(f"{data['model']} ({data['model_type']}, {fmt_count(data['parameters'])} parameters, "
          f"{fmt_count(data['trainable_parameters'])} trainable): {data['method']}, batch {data['batch']} x "
          f"{data['seq_len']} tokens, {data['dtype']}, {data['optim']}, gradient checkpointing "
          f"{'on' if data['gradient_checkpointing'] else 'off'}")
    print()
    print(_table(_breakdown_rows(data["breakdown"], data["total_bytes"]), ["peak memory per GPU", "GiB (2^30 B)", "share"]))
    print()
    act = {k.split(".", 1)[1]: v for k, v in data["details"].items()
           if k.startswith("activations.") and k not in ("activations.saved", "activations.peak_extra")}
    if act:
        print("activations: " + ", ".join(f"{k} {fmt_gib(v)}" for k, v in act.items() if v))
    print(f"predicted torch.cuda.max_memory_allocated: {fmt_gib(data['allocated_peak_bytes'])} "
          f"(total less CUDA context and fragmentation)")


def _print_plan(plan) -> None:
    from .units import fmt_count, fmt_gib

    d = plan.to_dict()
    r = plan.request
    print(f"{r.model.name} ({r.model.model_type}, {fmt_count(d['parameters'])} parameters, "
          f"{fmt_count(d['trainable_parameters'])} trainable) on {r.gpus} x {r.gpu.describe()}, {r.method}, "
          f"seq {d['seq_len']}")
    print()
    rows = plan.settings_rows()
    print(_table(rows, ["setting", "value", "reason"]))
    print()
    print(_table(_breakdown_rows(d["breakdown"], d["peak_memory_bytes"]), ["peak memory per GPU", "GiB (2^30 B)", "share"]))
    print()
    verdict = "FITS" if plan.fits else "DOES NOT FIT"
    print(f"{verdict}: {plan.reasons['fits']}")
    for step in plan.escalation:
        print(f"  tried {step.change}: {fmt_gib(step.peak_memory_bytes)} -> {'fits' if step.fits else 'does not fit'}")


def cmd_recommend(args: argparse.Namespace) -> None:
    plan = gather_plan(args)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        _print_plan(plan)


def cmd_export(args: argparse.Namespace) -> None:
    from .export import render

    plan = gather_plan(args)
    output_dir = args.output_dir or f"outputs/{plan.request.model.name.rstrip('/').split('/')[-1]}"
    text = render(plan, args.format, output_dir=output_dir, version=args.transformers_version)
    if args.output:
        try:
            with open(args.output, "w", encoding="utf-8") as fh:
                fh.write(text if text.endswith("\n") else text + "\n")
        except OSError as exc:
            raise FinetuneHelperError("output", f"cannot write {args.output}: {exc.strerror}") from exc
        print(f"wrote {args.format} TrainingArguments to {args.output}", file=sys.stderr)
    else:
        print(text, end="" if text.endswith("\n") else "\n")


def cmd_validate(args: argparse.Namespace) -> None:
    from .recipe import check_references, load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    notes = check_references(recipe)
    if recipe.training:
        from .runner import check_training_values

        check_training_values(recipe.training)
    print(f"{args.recipe}: ok ({recipe.model.name}, {recipe.method.type}, data {recipe.data.path}, "
          f"gpu {recipe.hardware.gpu} x {recipe.hardware.gpus})")
    for note in notes:
        print(f"  note: {note}")


def cmd_run(args: argparse.Namespace) -> int:
    from .runner import RunStopped, format_summary, run

    def log(line: str) -> None:
        print(line, flush=True)

    try:
        result = run(args.recipe, args.overrides, output_dir=args.output_dir, dry_run=args.dry_run,
                     resume=args.resume, log=log)
    except RunStopped as stop:
        print(f"{PROG}: stopped: {stop}", file=sys.stderr)
        return stop.code
    except (FinetuneHelperError, KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # a failure inside the training stack: one line here, the traceback in a file
        import tempfile
        import traceback

        fd, path = tempfile.mkstemp(prefix="finetune-helper-error-", suffix=".log")
        with os.fdopen(fd, "w") as fh:
            traceback.print_exc(file=fh)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"{PROG}: error: run failed: {type(exc).__name__}: {first} (traceback in {path}; checkpoints in the "
              "run folder are kept)", file=sys.stderr)
        return 1
    if result.summary.get("status") == "done":
        print()
        print(format_summary(result.summary))
    return result.exit_code


def cmd_app(args: argparse.Namespace) -> None:
    from finetune_helper_app.app import launch

    launch(args)


def cmd_gpus(args: argparse.Namespace) -> None:
    from .catalog import gpu_entries
    from .units import MiB, fmt_gib

    entries = gpu_entries()
    if args.json:
        print(json.dumps(entries, indent=2))
        return
    rows = [[e["name"], fmt_gib(e["memory_mib"] * MiB), "yes" if e.get("bf16") else "no",
             e.get("bf16_tflops") or e.get("fp16_tflops") or "-", ", ".join(e.get("aliases", [])[:3])] for e in entries]
    print(_table(rows, ["GPU", "memory", "bf16", "TFLOP/s (dense bf16/fp16)", "aliases"]))


def cmd_models(args: argparse.Namespace) -> None:
    from .catalog import model_entries
    from .model_spec import ModelSpec
    from .units import fmt_count

    rows, data = [], []
    for e in model_entries():
        spec = ModelSpec.from_config(e["config"], name=e["id"])
        data.append({"id": e["id"], "aliases": e.get("aliases", []), "model_type": spec.model_type,
                     "parameters": spec.num_parameters(), "max_position_embeddings": spec.max_position_embeddings,
                     "source": e.get("source")})
        rows.append([e["id"], spec.model_type, fmt_count(spec.num_parameters()), spec.num_hidden_layers,
                     spec.hidden_size, spec.max_position_embeddings, ", ".join(e.get("aliases", [])[:2])])
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(_table(rows, ["model", "type", "params", "layers", "hidden", "max seq", "aliases"]))


# ------------------------------------------------------------------------------------------- entry point
def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # `run RECIPE --dry-run key=value`: overrides may follow the flags, which argparse's subparsers cannot interleave
    args, extra = parser.parse_known_args(argv)
    if extra:
        if getattr(args, "command", None) in ("run", "validate") and all("=" in e and not e.startswith("-")
                                                                      for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")

    def one_line_warning(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        print(f"{PROG}: warning: {message}", file=sys.stderr)

    warnings.showwarning = one_line_warning
    try:
        code = args.func(args)
    except FinetuneHelperError as exc:
        _record_exit(args, 2)
        _fail(f"{_flag(exc.field)}: {exc.message}")
    except BrokenPipeError:  # `finetune-helper models | head`
        return 0
    _record_exit(args, code or 0)
    return code or 0


def _record_exit(args: argparse.Namespace, code: int) -> None:
    """``run --output-dir DIR`` leaves its exit code in DIR (the app reads it: how a run ended, even unwatched)."""
    folder = getattr(args, "output_dir", None) if getattr(args, "command", None) == "run" else None
    if folder and os.path.isdir(folder):
        from .runs import EXIT_FILE

        with open(os.path.join(folder, EXIT_FILE), "w", encoding="utf-8") as fh:
            json.dump({"returncode": code, "time": time.time()}, fh)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
