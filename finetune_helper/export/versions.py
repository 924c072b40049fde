"""What the installed stack is and supports, read without importing it.

* transformers' ``TrainingArguments`` fields and the two names transformers 5 changed:

  =====================  ==========================  ==========================================
  plan setting           transformers 4.x            transformers 5.x
  =====================  ==========================  ==========================================
  warmup ratio           ``warmup_ratio=0.03``       ``warmup_steps=0.03`` (a float < 1 is a ratio)
  checkpointing          ``gradient_checkpointing``  ``activation_checkpointing`` (old name warns)
  =====================  ==========================  ==========================================

  For the installed version the field names are read from the source of ``transformers/training_args.py`` with
  :mod:`ast` (no import); for a version the caller names (``--transformers-version 4.46``) a table by major version
  is used; :func:`introspected_names` asks the imported class itself (the tests check that the ways agree).
* The supported range of the training stack, from this package's own requirements (``pyproject.toml``):
  :func:`check_stack` runs before a run (refuses a version below the range, which the runner relies on:
  transformers 5's ``warmup_steps`` ratio and ``activation_checkpointing``, TRL 1's ``SFTConfig.max_length`` /
  ``assistant_only_loss``; warns above it).  ``constraints.txt`` pins what the tests passed with; ``make
  test-latest`` tests the newest versions the ranges allow.

No torch or transformers import here.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib.metadata
import importlib.util
import re
from pathlib import Path

from ..errors import FinetuneHelperError

#: The oldest transformers major the exports are written for (the package requires >= 4.46).
MIN_MAJOR = 4
#: The settings transformers 5 renamed, both ways: an override may use either name.
RENAMES = {"warmup_ratio": "warmup_steps", "warmup_steps": "warmup_ratio",
           "gradient_checkpointing": "activation_checkpointing", "activation_checkpointing": "gradient_checkpointing"}
#: Names accepted in overrides whatever the target version (translated to the target's name).
ALIASES = frozenset(RENAMES)


# --------------------------------------------------------------------------------------------- transformers
def installed_version() -> str | None:
    """The installed transformers version from the package metadata (no import), or None."""
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return None


def _major(version: str) -> int:
    m = re.match(r"\s*v?(\d+)(?:\.\d+)*", str(version))
    if not m:
        raise FinetuneHelperError("transformers-version", f"{version!r} is not a version such as 4.46 or 5")
    major = int(m.group(1))
    if major < MIN_MAJOR:
        raise FinetuneHelperError("transformers-version", f"{version} is too old: exports are written for "
                                  f"transformers {MIN_MAJOR}.x and later")
    return major


def target_major(version: str | None = None) -> int:
    """The transformers major version to write for: ``version`` ("4", "4.46", "5.23.0"), or the installed one."""
    if version is None or str(version).strip() == "":
        version = installed_version()
        if version is None:
            raise FinetuneHelperError("transformers-version", "transformers is not installed: name the version to "
                                      "write for (e.g. --transformers-version 5)")
    return _major(str(version))


@functools.lru_cache(maxsize=1)
def installed_field_names() -> frozenset[str] | None:
    """``TrainingArguments``' init fields in the installed transformers, read from its source with :mod:`ast`
    (neither transformers nor torch is imported), or None when they cannot be read."""
    return _class_fields("transformers", "training_args.py", "TrainingArguments")


@functools.lru_cache(maxsize=1)
def installed_sft_field_names() -> frozenset[str]:
    """The fields TRL's ``SFTConfig`` adds to ``TrainingArguments`` (``max_length``, ``packing_strategy``,
    ``loss_type``, ``dataset_num_proc``...), read the same way; empty when TRL's source cannot be read."""
    return _class_fields("trl", "trainer/sft_config.py", "SFTConfig") or frozenset()


@functools.lru_cache(maxsize=1)
def _installed_fsdp_flag() -> bool:
    """Whether the installed TrainingArguments documents ``fsdp=True`` (its help text, read without import)."""
    spec = importlib.util.find_spec("transformers")
    for location in (spec.submodule_search_locations or []) if spec else []:
        try:
            return "fsdp=True" in (Path(location) / "training_args.py").read_text(encoding="utf-8")
        except OSError:
            continue
    return False


def _class_fields(package: str, relative: str, class_name: str) -> frozenset[str] | None:
    """The init fields of dataclass ``class_name`` in ``package``'s file ``relative``, by :mod:`ast`."""
    try:
        spec = importlib.util.find_spec(package)  # a top-level package: found, not executed
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / relative
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError):
            continue
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and node.name == class_name:
                names = {stmt.target.id for stmt in node.body
                         if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                         and _is_init_field(stmt)}
                return frozenset(names) or None
    return None


def _is_init_field(stmt: ast.AnnAssign) -> bool:
    if "ClassVar" in ast.unparse(stmt.annotation):
        return False
    value = stmt.value
    if isinstance(value, ast.Call):
        for kw in value.keywords:
            if kw.arg == "init" and isinstance(kw.value, ast.Constant) and kw.value.value is False:
                return False
    return True


@dataclasses.dataclass(frozen=True)
class Names:
    """Which of the renamed arguments a TrainingArguments version has."""

    warmup_ratio: bool
    activation_checkpointing: bool
    fields: frozenset[str] | None  # all init fields when known (for checking overrides)
    label: str
    #: ``fsdp=True`` with everything in ``fsdp_config`` (newer 5.x; the ``"full_shard auto_wrap"`` string warns
    #: there), else the string, which every version reads
    fsdp_flag: bool = False

    @classmethod
    def from_fields(cls, fields: frozenset[str], label: str, *, fsdp_flag: bool = False) -> Names:
        return cls("warmup_ratio" in fields, "activation_checkpointing" in fields, fields, label, fsdp_flag)


def names_for(version: str | None) -> Names:
    """Metadata path: the names for ``version`` (None: the installed one) without importing transformers."""
    major = target_major(version)
    if version is None or str(version).strip() == "":
        fields = installed_field_names()
        if fields is not None:
            return Names.from_fields(fields, f"transformers {installed_version()}", fsdp_flag=_installed_fsdp_flag())
    return Names(warmup_ratio=major < 5, activation_checkpointing=major >= 5, fields=None,
                  label=f"transformers {major}.x")


def introspected_names() -> Names:
    """Introspection path: the installed ``TrainingArguments``' own fields (imports transformers)."""
    from transformers import TrainingArguments

    fields = frozenset(f.name for f in dataclasses.fields(TrainingArguments) if f.init)
    return Names.from_fields(fields, f"transformers {installed_version()}", fsdp_flag=_installed_fsdp_flag())


# --------------------------------------------------------------------------------------------- the stack
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


# --------------------------------------------------------------------------------------------- TRL
@functools.lru_cache(maxsize=1)
def trl_fuses_lm_head() -> bool:
    """The installed TRL's ``SFTTrainer`` computes its loss through the fused, chunked LM head
    (``trl.trainer.utils.add_fused_lm_head``: no vocabulary-wide logits).  Read from TRL's source, not imported."""
    try:
        spec = importlib.util.find_spec("trl")
    except (ImportError, ValueError):
        return False
    for location in (spec.submodule_search_locations or []) if spec else []:
        try:
            source = (Path(location) / "trainer" / "sft_trainer.py").read_text(encoding="utf-8")
        except OSError:
            continue
        return "add_fused_lm_head(" in source and "fused_lm_head=True" in source
    return False
