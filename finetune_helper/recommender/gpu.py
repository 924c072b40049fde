"""The GPU, as the memory we may fill and the precision it supports.

``resolve_gpu`` turns ``--gpu`` into a spec: a catalog name (``H100``, ``a100 80gb``), a plain amount (``24GB`` is
24 * 10**9 bytes, ``80GiB`` is 80 * 2**30 bytes), or ``auto`` (asks torch for the local GPU; the only path that
imports torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import catalog
from ..errors import FinetuneHelperError
from ..units import MiB, fmt_gib, looks_like_amount, parse_bytes


@dataclass(frozen=True)
class GPUSpec:
    #: display name (catalog name, ``24GB GPU``, or the name CUDA reports).
    name: str
    #: total device memory in bytes, as the driver reports it (``torch.cuda.get_device_properties().total_memory``).
    memory_bytes: int
    #: native bfloat16 support (NVIDIA Ampere or newer, AMD CDNA2 or newer).
    bf16: bool = True
    #: dense peak bf16 (or fp16 where bf16 is missing) tensor TFLOP/s, for throughput estimates; None if unknown.
    peak_tflops: float | None = None
    #: peak memory bandwidth in GB/s (10**9 bytes), for the memory-bound parts of a step; None if unknown.
    memory_bandwidth_gbps: float | None = None
    #: ``datacenter``, ``workstation`` or ``consumer`` (the catalog's class), None if unknown.
    kind: str | None = None
    #: where the figures come from.
    source: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.memory_bytes, int) or self.memory_bytes <= 0:
            raise FinetuneHelperError("gpu", f"memory must be > 0 bytes, got {self.memory_bytes!r}")

    @classmethod
    def from_catalog(cls, entry: dict[str, Any]) -> GPUSpec:
        return cls(
            name=entry["name"],
            memory_bytes=int(entry["memory_mib"]) * MiB,
            bf16=bool(entry.get("bf16", False)),
            peak_tflops=entry.get("bf16_tflops") if entry.get("bf16") else entry.get("fp16_tflops"),
            memory_bandwidth_gbps=entry.get("memory_bandwidth_gbps"), kind=entry.get("kind"),
            source=entry.get("source", ""),
        )

    def describe(self) -> str:
        return f"{self.name} ({fmt_gib(self.memory_bytes)}, bf16 {'yes' if self.bf16 else 'no'})"


def resolve_gpu(name: str) -> GPUSpec:
    """``--gpu``: catalog name, amount with a unit, or ``auto``."""
    text = str(name).strip()
    if not text:
        raise FinetuneHelperError("gpu", "empty; give a GPU name (see `finetune-helper gpus`), an amount such as "
                                  "24GB or 80GiB, or auto")
    if text.lower() == "auto":
        return detect_gpu()
    entry = catalog.find_gpu(text)
    if entry is not None:
        return GPUSpec.from_catalog(entry)
    if looks_like_amount(text) or text.lstrip("-+").replace(".", "", 1).isdigit():
        amount = parse_bytes(text, field="gpu")
        return GPUSpec(name=f"{text} GPU", memory_bytes=amount, bf16=True,
                       source="memory given on the command line; bf16 assumed")
    hint = catalog.suggest(text, "gpus")
    raise FinetuneHelperError("gpu", f"unknown GPU {text!r}" + (f"; did you mean {', '.join(hint)}?" if hint else "")
                              + " (list: `finetune-helper gpus`; or an amount such as 24GB or 80GiB)")


def detect_gpu() -> GPUSpec:
    """The first local CUDA/ROCm device, through torch (imported only here)."""
    try:
        import torch
    except ImportError as exc:  # pragma: no cover
        raise FinetuneHelperError("gpu", "auto needs torch installed") from exc
    if not torch.cuda.is_available():
        raise FinetuneHelperError("gpu", "auto found no CUDA GPU on this machine; name one (see `finetune-helper "
                                  "gpus`) or give its memory, e.g. 24GB")
    props = torch.cuda.get_device_properties(0)
    entry = catalog.find_gpu(props.name.replace("NVIDIA", "").strip())
    return GPUSpec(
        name=entry["name"] if entry else props.name,  # the catalog's name: recipes and calibrations use it
        memory_bytes=int(props.total_memory),
        bf16=bool(torch.cuda.is_bf16_supported(including_emulation=False)),  # T4/V100 only emulate bf16
        peak_tflops=(entry or {}).get("bf16_tflops"),
        memory_bandwidth_gbps=(entry or {}).get("memory_bandwidth_gbps"), kind=(entry or {}).get("kind"),
        source="detected with torch.cuda.get_device_properties(0)",
    )


def detect_gpu_count() -> int:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return 0
    return torch.cuda.device_count()
