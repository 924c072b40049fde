"""Calibrations: what ``finetune-helper probe`` measured on a device, applied to later plans for the same
device, model and method ("calibrated on this GPU on DATE: +4%").

A calibration is the ratio measured / estimated peak of the runner's own steps at the recommended micro-batch
(``torch.cuda.max_memory_allocated`` on a GPU, tracked live tensor bytes on the CPU).  Plans multiply the allocated
part of every estimate by it (the CUDA context and fragmentation stay as they are) and say so in the ``fits``
reason.  On a GPU it also holds the measured / predicted tokens per second of the same steps: plans for that GPU,
model and method scale the time model's efficiency by it and say so in their time line.  The store is one JSON
file (``FINETUNE_HELPER_CALIBRATION``, default ``~/.cache/finetune_helper/calibration.json``), keyed by device name (the GPU's catalog name, or ``cpu``), model
and method.  Pure Python: the recommender reads it without torch.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

#: a calibration outside this range is more likely a broken measurement than a property of the device: refused
PLAUSIBLE = (0.5, 2.0)
#: the same for a speed calibration: the time model's worst held-out row is 1.7x off
#: (``benchmarks/time_vs_published.py``); a ratio beyond 4x is more likely a broken measurement (a first step with
#: compilation, a shared GPU) and is not applied
PLAUSIBLE_SPEED = (0.25, 4.0)


@dataclass(frozen=True)
class Calibration:
    device: str
    model: str
    method: str
    #: measured / estimated peak at the probed micro-batch
    ratio: float
    measured_bytes: int
    estimated_bytes: int
    micro_batch: int
    date: str
    #: what was measured: ``cuda max_memory_allocated`` or ``tracked live tensor bytes``
    measure: str = ""
    #: on a GPU: measured / predicted tokens per second of the same steps (``recommender.throughput``), and the
    #: measured rate; None where no prediction exists (the CPU, a GPU without catalog rates)
    speed_ratio: float | None = None
    tokens_per_second: float | None = None

    def describe(self) -> str:
        return f"calibrated on {self.device} on {self.date}: {self.ratio - 1:+.0%} (finetune-helper probe)"

    def describe_speed(self) -> str:
        return (f"speed calibrated on {self.device} on {self.date}: measured {self.speed_ratio:.2f}x the prediction "
                f"(finetune-helper probe)")

    @property
    def plausible_speed(self) -> bool:
        return self.speed_ratio is not None and PLAUSIBLE_SPEED[0] <= self.speed_ratio <= PLAUSIBLE_SPEED[1]


def store_path() -> Path:
    return Path(os.environ.get("FINETUNE_HELPER_CALIBRATION",
                               Path.home() / ".cache" / "finetune_helper" / "calibration.json"))


def _key(device: str, model: str, method: str) -> str:
    return f"{device.strip().lower()}|{model.strip()}|{method}"


def _read() -> dict:
    try:
        data = json.loads(store_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def lookup(device: str, model: str, method: str) -> Calibration | None:
    """The stored calibration for this device, model and method, if any (an unreadable store counts as empty)."""
    entry = _read().get(_key(device, model, method))
    if not isinstance(entry, dict):
        return None
    try:
        cal = Calibration(**entry)
    except TypeError:
        return None
    return cal if PLAUSIBLE[0] <= cal.ratio <= PLAUSIBLE[1] else None


def save(cal: Calibration) -> Path:
    """Store ``cal`` (replacing the one for the same device, model and method); written atomically."""
    if not PLAUSIBLE[0] <= cal.ratio <= PLAUSIBLE[1]:
        raise ValueError(f"calibration ratio {cal.ratio:.3f} is outside {PLAUSIBLE}: not stored")
    path = store_path()
    data = _read()
    data[_key(cal.device, cal.model, cal.method)] = asdict(cal)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
