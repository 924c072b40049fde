"""Loading the data catalogs (``data/models.yaml``, ``data/gpus.yaml``) and looking names up in them.

Both files cite the source of every entry; this module only reads them.
"""

from __future__ import annotations

import difflib
import functools
import re
from importlib import resources
from typing import Any

import yaml

try:  # libyaml's C loader reads the catalogs ~10x faster than the pure-Python one
    _Loader: Any = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - PyYAML built without libyaml
    _Loader = yaml.SafeLoader


def normalize(name: str) -> str:
    """Lowercase and drop spaces, hyphens, underscores: ``A100-80GB`` == ``a100 80gb`` == ``a10080gb``."""
    return re.sub(r"[\s\-_]+", "", str(name).lower())


@functools.lru_cache(maxsize=None)
def _load(filename: str) -> dict[str, Any]:
    text = resources.files("finetune_helper.recommender").joinpath("data", filename).read_text(encoding="utf-8")
    return yaml.load(text, Loader=_Loader)


def model_entries() -> list[dict[str, Any]]:
    return _load("models.yaml")["models"]


def gpu_entries() -> list[dict[str, Any]]:
    return _load("gpus.yaml")["gpus"]


@functools.lru_cache(maxsize=None)
def _index(kind: str) -> dict[str, dict[str, Any]]:
    entries, key = (model_entries(), "id") if kind == "models" else (gpu_entries(), "name")
    index: dict[str, dict[str, Any]] = {}
    for entry in entries:
        names = [entry[key], *entry.get("aliases", [])]
        if kind == "models":
            names.append(entry["id"].split("/")[-1])
        for name in names:
            index.setdefault(normalize(name), entry)
    return index


def find_model(name: str) -> dict[str, Any] | None:
    """The catalog entry whose Hub id or alias is ``name`` (case, spaces, hyphens and underscores ignored)."""
    return _index("models").get(normalize(name))


def find_gpu(name: str) -> dict[str, Any] | None:
    return _index("gpus").get(normalize(name))


def suggest(name: str, kind: str, n: int = 3) -> list[str]:
    """Close catalog names for an unknown ``name``, for the error message."""
    entries, key = (model_entries(), "id") if kind == "models" else (gpu_entries(), "name")
    display = {normalize(e[key]): e[key] for e in entries}
    for e in entries:
        for alias in e.get("aliases", []):
            display.setdefault(normalize(alias), e[key])
    hits = difflib.get_close_matches(normalize(name), list(display), n=8, cutoff=0.5)
    out: list[str] = []
    for hit in hits:
        if display[hit] not in out:
            out.append(display[hit])
    return out[:n]


def lr_reference(method: str, family: str) -> dict[str, Any]:
    """The reference learning rate and effective batch for a method and optimizer family (``data/lr_references.yaml``)."""
    for ref in _load("lr_references.yaml")["references"]:
        if ref["method"] == method and ref["family"] == family:
            return ref
    raise KeyError((method, family))
