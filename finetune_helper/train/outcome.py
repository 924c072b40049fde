"""How a run ends: the exit codes of ``finetune-helper run``, the stop that ends a run early on purpose, and the
result of one that did not.

Exit codes: 0 done; 2 bad input; 3 stopped because the loss diverged (NaN/inf or exploding; the last good
checkpoint is kept); 4 out of memory even at per-device batch 1; 130 interrupted by Ctrl-C / SIGTERM after saving a
checkpoint (``--resume`` continues).  No torch import here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_OOM, EXIT_INTERRUPTED = 0, 2, 3, 4, 130


class RunStopped(BaseException):
    """A run that ended early on purpose; ``code`` is the exit code.

    A ``BaseException`` (like ``KeyboardInterrupt``): raised by the signal handler while the run prepares, it must
    not be swallowed by a library's ``except Exception`` around the code it interrupts (dataset loading, say), which
    would turn a Stop into a "failed" run."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class RunResult:
    run_dir: Path
    exit_code: int
    summary: dict[str, Any] = field(default_factory=dict)

