"""The library versions the runner supports, read from this package's own requirements (``pyproject.toml``).

One source: the ranges in ``pyproject.toml``'s ``dependencies`` are what pip enforces at install time and what
:func:`check_stack` checks before a run (an environment can drift after install: a later ``pip install -U``, a
``PYTHONPATH``, a GPU image with its own stack).  Below a range's minimum the runner refuses (the code relies on
what those versions added: transformers 5's ``warmup_steps`` ratio and ``activation_checkpointing``, TRL 1's
``SFTConfig.max_length`` / ``assistant_only_loss``); above its maximum it warns (untested, may work).

``constraints.txt`` pins the exact versions the tests passed with (``make setup`` installs them); ``make
test-latest`` runs the tests against the newest versions the ranges allow.  No torch or transformers import here.
"""

from __future__ import annotations

import functools
import importlib.metadata
import re

from .errors import FinetuneHelperError

#: the stack whose behaviour the runner depends on (the others are plain dependencies)
CHECKED = ("torch", "transformers", "trl", "peft", "accelerate", "datasets")
DISTRIBUTION = "finetune-helper"


def _version_tuple(version: str) -> tuple[int, ...]:
    """``5.24.0`` -> (5, 24, 0); ``2.13.0+cpu`` -> (2, 13, 0); ``1.0.0rc1`` -> (1, 0, 0)."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0].split("rc")[0].split("dev")[0])[:3])


def _parse_requirement(text: str) -> tuple[str, list[tuple[str, tuple[int, ...]]]] | None:
    """``transformers>=5.0,<6`` -> ("transformers", [(">=", (5, 0)), ("<", (6,))]); None for markers / extras."""
    if ";" in text:
        return None
    m = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*(.*)$", text)
    if not m:
        return None
    name, rest = m.group(1).lower().replace("_", "-"), m.group(2)
    bounds = [(op, _version_tuple(v)) for op, v in re.findall(r"(>=|<=|==|<|>)\s*([0-9][0-9A-Za-z.+]*)", rest)]
    return name, bounds


@functools.lru_cache(maxsize=1)
def supported_ranges() -> dict[str, str]:
    """{package: "the range pyproject.toml gives"} for :data:`CHECKED`, from the installed metadata."""
    try:
        requires = importlib.metadata.requires(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:  # not installed (a bare checkout on sys.path)
        return {}
    out = {}
    for text in requires:
        parsed = _parse_requirement(text)
        if parsed and parsed[0] in CHECKED:
            out[parsed[0]] = text.split(";")[0].strip()[len(parsed[0]):].strip()
    return out


def installed_stack() -> dict[str, str | None]:
    """{package: installed version or None} for :data:`CHECKED` (recorded in a run's plan.json)."""
    out: dict[str, str | None] = {}
    for name in CHECKED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _holds(version: tuple[int, ...], op: str, bound: tuple[int, ...]) -> bool:
    width = max(len(version), len(bound))
    v, b = version + (0,) * (width - len(version)), bound + (0,) * (width - len(bound))
    return {">=": v >= b, ">": v > b, "<=": v <= b, "<": v < b, "==": v == b}[op]


def check_stack(installed: dict[str, str] | None = None) -> list[str]:
    """Warnings for packages newer than their supported range; a :class:`FinetuneHelperError` (field ``stack``)
    for one that is missing or older than the range's minimum.  ``installed`` ({package: version}) is for tests;
    by default the installed distributions are read."""
    installed = installed_stack() if installed is None else installed
    warnings = []
    for name, spec in supported_ranges().items():
        version = installed.get(name)
        if version is None:
            raise FinetuneHelperError("stack", f"{name} is not installed; the runner needs {name}{spec} "
                                      "(pip install -c constraints.txt -e .)")
        _, bounds = _parse_requirement(name + spec) or (name, [])
        v = _version_tuple(version)
        for op, bound in bounds:
            if _holds(v, op, bound):
                continue
            if op in (">=", ">", "=="):
                raise FinetuneHelperError("stack", f"{name} {version} is installed; the runner needs {name}{spec} "
                                          "(pip install -c constraints.txt -e .)")
            warnings.append(f"{name} {version} is newer than the tested range {name}{spec}: it may work; "
                            "`make test-latest` checks it")
    return warnings
