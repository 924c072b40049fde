"""The ``finetune-helper`` command: builds the parser from ``commands/`` and dispatches; nothing else.

Bad input of any kind ends in one line on stderr, ``finetune-helper: error: <field>: what is allowed``, and exit 2:
argparse's own errors, and every :class:`FinetuneHelperError` the core raises (named after the flag or the recipe
field it came from).  Warnings print as one line too, only while a command runs.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import warnings
from typing import Sequence

from .commands import app, doctor, estimate, export, gpus, lr_find, models, probe, recommend, resume, run, validate
from .errors import FinetuneHelperError

PROG = "finetune-helper"
#: in the order ``--help`` lists them
COMMANDS = (estimate, recommend, export, validate, run, resume, lr_find, doctor, probe, app, gpus, models)
#: error fields that name a recipe setting (``data.path``) or the recipe itself rather than a command-line flag
_RECIPE_FIELDS = ("recipe", "override", "training", "seed", "output_dir", "stack", "app", "run_dir", "trainer")


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors are one line (no usage block) and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        _fail(message.replace("argument ", "", 1))


def _fail(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _flag(field: str) -> str:
    if field.startswith("-") or " " in field or "." in field or field in _RECIPE_FIELDS:
        return field
    return f"--{field.replace('_', '-')}"


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog=PROG, description="How to fine-tune this model on this GPU, and will it fit: memory "
                     "estimate, batch / accumulation / learning rate / warmup plan, TrainingArguments export.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    # `run RECIPE --dry-run key=value`: overrides may follow the flags, which argparse's subparsers cannot interleave
    args, extra = parser.parse_known_args(argv)
    if extra:
        takes_overrides = getattr(args, "command", None) in ("run", "resume", "validate", "probe", "lr-find")
        if takes_overrides and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


class _Without(logging.Filter):
    """Drops a logger's records whose message starts with ``prefix``; its other records pass."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


#: kernels (0.17.2: ``hf_hub._check_trust_remote_code``, logger ``kernels.hf_hub``) warns on every ``get_kernel``
#: while the Hub is offline, and bitsandbytes (0.50: ``backends/cpu/ops.py``) asks for its CPU 4-bit kernel
#: (``kernels-community/quantization-bitsandbytes``) when it is imported on a CPU with AVX512-BF16 and kernels is
#: installed: a line on every command that loads the stack, about a check the user never asked for (when the kernel
#: cannot be had, bitsandbytes computes with its own)
_KERNELS_TRUST_NOTICE = _Without("Skipping publisher trust check for ")


def _quiet_libraries() -> None:
    """Library notices that are not the user's concern, held back: only those (a targeted level or filter)."""
    # bitsandbytes (imported by transformers / TRL / PEFT when installed) logs a notice about an optional CPU kernel
    # on every import
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("kernels.hf_hub").addFilter(_KERNELS_TRUST_NOTICE)  # the same filter once, however often


def _one_line_warning(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001, ARG001
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    _quiet_libraries()
    after = getattr(args, "after", None)  # a command's own epilogue, given the exit code (run records it)
    with warnings.catch_warnings(), contextlib.ExitStack() as stack:  # restores showwarning / stdout when done
        warnings.showwarning = _one_line_warning
        args.stdout = sys.stdout
        if getattr(args, "json", False) or getattr(args, "machine_output", None) is not None and not args.output:
            # the command's output is for programs: what libraries print while it works goes to stderr (DeepSpeed's
            # logger writes to the stdout of when it was imported), the result to stdout (``common.emit``)
            stack.enter_context(contextlib.redirect_stdout(sys.stderr))
        try:
            code = args.func(args) or 0
        except FinetuneHelperError as exc:
            if after:
                after(args, 2)
            _fail(f"{_flag(exc.field)}: {exc.message}")
        except BrokenPipeError:  # `finetune-helper models | head`
            return 0
        except KeyboardInterrupt:  # Ctrl-C where no command handles it (the runner and lr-find do): no traceback
            if after:
                after(args, 130)
            print(f"{PROG}: interrupted (Ctrl-C)", file=sys.stderr)
            return 130
    if after:
        after(args, code)
    return code


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
