"""Byte amounts: parsing and printing, explicit about GB (10**9) versus GiB (2**30).

NVIDIA and AMD sell memory in marketing "GB" that are really GiB (an "80GB" A100 reports 81920 MiB), while disk
and network vendors use decimal GB.  We keep bytes everywhere inside and say which unit we print.
"""

from __future__ import annotations

import math
import re

from .errors import FinetuneHelperError

KB, MB, GB, TB = 10**3, 10**6, 10**9, 10**12
KiB, MiB, GiB, TiB = 2**10, 2**20, 2**30, 2**40

_UNITS = {
    "b": 1,
    "kb": KB, "mb": MB, "gb": GB, "tb": TB,
    "kib": KiB, "mib": MiB, "gib": GiB, "tib": TiB,
}
_AMOUNT = re.compile(r"^\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def looks_like_amount(text: str) -> bool:
    """True for strings such as ``24GB``, ``80 GiB``, ``16gib`` (a number followed by a byte unit)."""
    m = _AMOUNT.match(text)
    return bool(m) and m.group(2).lower() in _UNITS and m.group(2) != ""


def parse_bytes(text: str, field: str = "memory") -> int:
    """Parse ``24GB`` (24 * 10**9 bytes) or ``80GiB`` (80 * 2**30 bytes) into bytes.

    A bare number is refused: the unit must be stated, since GB and GiB differ by 7%.
    """
    m = _AMOUNT.match(str(text))
    if not m:
        raise FinetuneHelperError(field, f"{text!r} is not an amount of memory (examples: 24GB, 80GiB)")
    value, unit = float(m.group(1)), m.group(2).lower()
    if unit == "":
        raise FinetuneHelperError(field, f"{text!r} has no unit: write GB (10^9 bytes) or GiB (2^30 bytes), e.g. 24GB")
    if unit not in _UNITS:
        raise FinetuneHelperError(field, f"unknown unit {m.group(2)!r} in {text!r}: use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB")
    if not math.isfinite(value) or value * _UNITS[unit] > 2**62:
        raise FinetuneHelperError(field, f"{text!r} is not a plausible amount of memory")
    amount = int(round(value * _UNITS[unit]))
    if amount <= 0:
        raise FinetuneHelperError(field, f"memory must be > 0, got {text!r}")
    return amount


def fmt_gib(n_bytes: float, digits: int = 2) -> str:
    """``12.34 GiB`` (binary gibibytes, 2**30 bytes)."""
    return f"{n_bytes / GiB:.{digits}f} GiB"


def fmt_count(n: int) -> str:
    """Human parameter count: 8.03B, 494M, 1.2K."""
    for div, suffix in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}" if n / div < 100 else f"{n / div:.0f}{suffix}"
    return str(n)


def fmt_duration(seconds: float) -> str:
    """``1:02:03`` (hours:minutes:seconds), ``?`` for an unknown (non-finite) duration."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def fmt_run_length(seconds: float) -> str:
    """``0.42 s``, ``45 s``, ``12 min``, ``3 h 05 min``, ``2 d 4 h``: a run's length at the precision a plan has
    (two significant digits under 10 s, where a tiny model's whole run falls)."""
    if seconds < 9.95:
        return f"{seconds:.2g} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    if minutes < 90:
        return f"{minutes:.0f} min"
    hours, minutes = divmod(round(minutes), 60)
    if hours < 48:
        return f"{hours} h {minutes:02d} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"
