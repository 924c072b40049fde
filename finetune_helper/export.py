"""The plan as ``transformers.TrainingArguments``: a real object, or JSON / YAML / Python / CLI text.

Two ways to pick the argument names, because transformers 5 renamed two of the plan's settings:

=====================  ==========================  ==========================================
plan setting           transformers 4.x            transformers 5.x
=====================  ==========================  ==========================================
warmup ratio           ``warmup_ratio=0.03``       ``warmup_steps=0.03`` (a float < 1 is a ratio)
checkpointing          ``gradient_checkpointing``  ``activation_checkpointing`` (old name warns)
=====================  ==========================  ==========================================

* the **text exports** (:func:`render`, what ``finetune-helper export`` prints) never import transformers or torch
  (importing them costs seconds). They write for :func:`target_major`: a version the caller names, or the installed
  one read from the package metadata. For the installed version the field names are read from the source of
  ``transformers/training_args.py`` with :mod:`ast` (no import), so a field is written only where it exists;
  for a named version a table by major version is used.
* :func:`to_training_arguments` imports transformers and picks the names by introspecting the installed
  ``TrainingArguments`` (``dataclasses.fields``). The tests check that both ways agree on the installed version.

Settings the plan does not decide, added to every export:

* ``logging_steps = max(1, min(10, total_steps // 50))``: about 50 log lines on a short run, every 10 steps on a
  long one (a loss curve with enough points, without flooding the console);
* ``save_strategy="steps"`` with ``save_steps = max(logging_steps, min(500, ceil(total_steps / 5)))``: about five
  checkpoints on a short run, every 500 steps (the transformers default) on a long one. Full fine-tunes of large
  models write weights + optimizer states per checkpoint: add ``save_total_limit`` for those;
* ``report_to="none"`` (no tracker is assumed) and ``seed=42``.

Overrides (keyword arguments of :func:`training_kwargs` / :func:`to_training_arguments`) win over all of these.
An override may use either version's name for the two renamed settings; it is written under the target's name.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import importlib.metadata
import importlib.util
import json
import math
import re
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import FinetuneHelperError

if TYPE_CHECKING:  # pragma: no cover
    from .plan import Plan

FORMATS = ("json", "yaml", "python", "cli")
#: The oldest transformers major the exports are written for (the package requires >= 4.46).
MIN_MAJOR = 4
#: ``plan.reasons`` key that explains each exported argument (both versions' names).
REASON_KEYS = {
    "per_device_train_batch_size": "per_device_train_batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "learning_rate": "learning_rate",
    "warmup_ratio": "warmup_ratio",
    "warmup_steps": "warmup_ratio",
    "gradient_checkpointing": "gradient_checkpointing",
    "activation_checkpointing": "gradient_checkpointing",
    "optim": "optim",
    "bf16": "precision",
    "fp16": "precision",
    "lr_scheduler_type": "lr_scheduler_type",
    "max_grad_norm": "max_grad_norm",
    "weight_decay": "weight_decay",
}
#: Names accepted in overrides whatever the target version (translated to the target's name).
ALIASES = frozenset({"warmup_ratio", "warmup_steps", "gradient_checkpointing", "activation_checkpointing"})


# --------------------------------------------------------------------------------------------- versions
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
    try:
        spec = importlib.util.find_spec("transformers")  # a top-level package: found, not executed
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "training_args.py"
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError):
            continue
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and node.name == "TrainingArguments":
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
class _Names:
    """Which of the renamed arguments a TrainingArguments version has."""

    warmup_ratio: bool
    activation_checkpointing: bool
    fields: frozenset[str] | None  # all init fields when known (for checking overrides)
    label: str

    @classmethod
    def from_fields(cls, fields: frozenset[str], label: str) -> _Names:
        return cls("warmup_ratio" in fields, "activation_checkpointing" in fields, fields, label)


def _names_for(version: str | None) -> _Names:
    """Metadata path: the names for ``version`` (None: the installed one) without importing transformers."""
    major = target_major(version)
    if version is None or str(version).strip() == "":
        fields = installed_field_names()
        if fields is not None:
            return _Names.from_fields(fields, f"transformers {installed_version()}")
    return _Names(warmup_ratio=major < 5, activation_checkpointing=major >= 5, fields=None,
                  label=f"transformers {major}.x")


def _introspected_names() -> _Names:
    """Introspection path: the installed ``TrainingArguments``' own fields (imports transformers)."""
    from transformers import TrainingArguments

    fields = frozenset(f.name for f in dataclasses.fields(TrainingArguments) if f.init)
    return _Names.from_fields(fields, f"transformers {installed_version()}")


# --------------------------------------------------------------------------------------------- kwargs
def logging_steps_for(total_steps: int) -> int:
    """About 50 log lines on short runs, every 10 steps on long ones."""
    return max(1, min(10, total_steps // 50))


def save_steps_for(total_steps: int) -> int:
    """About five checkpoints on short runs, every 500 steps on long ones, never more often than logging."""
    return max(logging_steps_for(total_steps), min(500, math.ceil(total_steps / 5)))


def _check_override_names(overrides: dict[str, Any], names: _Names) -> None:
    if names.fields is None:
        return
    known = names.fields | ALIASES
    for key in overrides:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise FinetuneHelperError(key, f"not a TrainingArguments argument in {names.label}{hint}")


def _build(plan: Plan, output_dir: str, names: _Names, overrides: dict[str, Any]) -> dict[str, Any]:
    _check_override_names(overrides, names)
    kwargs: dict[str, Any] = {"output_dir": str(output_dir)}
    kwargs.update(plan.training_kwargs())  # 4.x names: warmup_ratio, gradient_checkpointing
    steps = plan.total_steps
    kwargs.update(logging_steps=logging_steps_for(steps), save_strategy="steps", save_steps=save_steps_for(steps),
                  report_to="none", seed=42)
    # An override under either name of a renamed setting replaces the plan's value under both names.
    if {"warmup_ratio", "warmup_steps"} & overrides.keys():
        kwargs.pop("warmup_ratio", None)
    if {"gradient_checkpointing", "activation_checkpointing"} & overrides.keys():
        kwargs.pop("gradient_checkpointing", None)
    for pair in (("warmup_ratio", "warmup_steps"), ("gradient_checkpointing", "activation_checkpointing")):
        if set(pair) <= overrides.keys():
            raise FinetuneHelperError(pair[1], f"give {pair[0]} or {pair[1]}, not both")
    kwargs.update(overrides)

    # Warmup: a ratio as warmup_ratio (4.x) or as a float warmup_steps < 1 (5.x).
    if names.warmup_ratio:
        steps_value = kwargs.get("warmup_steps")
        if isinstance(steps_value, float) and 0 < steps_value < 1:  # a 5.x-style ratio
            kwargs = _renamed(kwargs, "warmup_steps", "warmup_ratio", steps_value)
    elif "warmup_ratio" in kwargs:
        ratio = kwargs["warmup_ratio"]
        if not (isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and 0 <= ratio < 1):
            raise FinetuneHelperError("warmup_ratio", f"must be a number in [0, 1) to be written as warmup_steps "
                                      f"for {names.label}, got {ratio!r}")
        kwargs = _renamed(kwargs, "warmup_ratio", "warmup_steps", float(ratio))
    # Checkpointing: gradient_checkpointing (4.x) or activation_checkpointing (5.x; the old name warns).
    new, old = "activation_checkpointing", "gradient_checkpointing"
    src, dst = (old, new) if names.activation_checkpointing else (new, old)
    if src in kwargs:
        kwargs = _renamed(kwargs, src, dst, kwargs[src])
    return kwargs


def _renamed(kwargs: dict[str, Any], old: str, new: str, value: Any) -> dict[str, Any]:
    """``kwargs`` with ``old`` replaced by ``new`` = ``value`` at the same position."""
    return {(new if k == old else k): (value if k == old else v) for k, v in kwargs.items()}


def training_kwargs(plan: Plan, output_dir: str, *, version: str | None = None, **overrides: Any) -> dict[str, Any]:
    """The plan's ``TrainingArguments`` keyword arguments, named for transformers ``version`` (default: the
    installed one), plus output, logging, saving and seed settings (see the module docstring); ``overrides`` win.

    Imports neither transformers nor torch. Override names are checked against the installed version's fields
    (read from its source) when writing for the installed version; :func:`to_training_arguments` always checks."""
    return _build(plan, output_dir, _names_for(version), overrides)


def to_training_arguments(plan: Plan, output_dir: str, **overrides: Any) -> Any:
    """A real ``transformers.TrainingArguments`` (imports transformers), with names chosen by introspecting the
    installed class; unknown override names raise :class:`FinetuneHelperError` with close matches."""
    from transformers import TrainingArguments

    kwargs = _build(plan, output_dir, _introspected_names(), overrides)
    try:
        return TrainingArguments(**kwargs)
    except (TypeError, ValueError) as exc:
        hint = ""
        if kwargs.get("bf16") and not kwargs.get("use_cpu") and "bf16" in str(exc):
            hint = (" (the plan is for a GPU with bfloat16 and this machine has none: to build the arguments here "
                    "anyway, pass use_cpu=True)")
        raise FinetuneHelperError("training-arguments", f"transformers {installed_version()} rejected the "
                                  f"arguments: {_one_line(str(exc))}{hint}") from exc


# --------------------------------------------------------------------------------------------- text formats
def _header(plan: Plan, names: _Names) -> list[str]:
    r = plan.request
    lines = [f"TrainingArguments for {r.model.name}, {r.method} fine-tuning on {r.gpus} x {r.gpu.name}, "
             f"written by finetune-helper for {names.label}",
             f"effective batch {plan.effective_batch_size}, about {plan.total_steps} optimizer steps"]
    if not plan.fits:
        lines.append("WARNING: this plan does not fit in GPU memory: " + _one_line(plan.reasons.get("fits", "")))
    return lines


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _comment(plan: Plan, key: str) -> str | None:
    if key in REASON_KEYS and REASON_KEYS[key] in plan.reasons:
        return _one_line(plan.reasons[REASON_KEYS[key]])
    if key == "num_train_epochs" and "total_steps" in plan.reasons:
        return "total steps: " + _one_line(plan.reasons["total_steps"])
    if key == "logging_steps":
        return "about 50 log lines on a short run, every 10 steps on a long one"
    if key == "save_steps":
        return "about five checkpoints on a short run, every 500 steps on a long one"
    return None


def to_json(plan: Plan, output_dir: str, version: str | None = None) -> str:
    """For ``HfArgumentParser(TrainingArguments).parse_json_file``."""
    return json.dumps(training_kwargs(plan, output_dir, version=version), indent=2) + "\n"


def _yaml_float(value: float) -> str:
    """A float PyYAML (YAML 1.1) reads back as a float: a dot, and a signed exponent (``2.0e-05``, not ``2e-5``)."""
    if math.isnan(value):
        return ".nan"
    if math.isinf(value):
        return ".inf" if value > 0 else "-.inf"
    text = repr(float(value)).lower()
    mantissa, _, exponent = text.partition("e")
    if "." not in mantissa:
        mantissa += ".0"
    if exponent and exponent[0] not in "+-":
        exponent = "+" + exponent
    return mantissa + ("e" + exponent if exponent else "")


def _yaml_dumper() -> type:
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(float, lambda d, v: d.represent_scalar("tag:yaml.org,2002:float", _yaml_float(v)))
    return Dumper


def to_yaml(plan: Plan, output_dir: str, version: str | None = None) -> str:
    """For ``HfArgumentParser(TrainingArguments).parse_yaml_file``; each setting commented with its reason."""
    import yaml

    names = _names_for(version)
    kwargs = _build(plan, output_dir, names, {})
    dumper = _yaml_dumper()
    lines = [f"# {line}" for line in _header(plan, names)]
    for key, value in kwargs.items():
        text = yaml.dump({key: value}, Dumper=dumper, default_flow_style=True, sort_keys=False,
                         width=math.inf, allow_unicode=True).strip()
        text = text[1:-1] if text.startswith("{") and text.endswith("}") else text  # {k: v} -> k: v
        comment = _comment(plan, key)
        lines.append(f"{text}  # {comment}" if comment and "\n" not in text else text)
    return "\n".join(lines) + "\n"


def to_python(plan: Plan, output_dir: str, version: str | None = None) -> str:
    """A runnable snippet building ``args = TrainingArguments(...)``; run as a script it prints the args as JSON."""
    names = _names_for(version)
    kwargs = _build(plan, output_dir, names, {})
    lines = ['"""' + _header(plan, names)[0] + '."""', ""]
    lines += [f"# {line}" for line in _header(plan, names)[1:]]
    lines += ["", "from transformers import TrainingArguments", "", "args = TrainingArguments("]
    for key, value in kwargs.items():
        line = f"    {key}={value!r},"
        comment = _comment(plan, key)
        lines.append(f"{line}  # {comment}" if comment else line)
    lines += [")", "", 'if __name__ == "__main__":', "    print(args.to_json_string())"]
    return "\n".join(lines) + "\n"


def _cli_value(value: Any) -> list[str]:
    if isinstance(value, bool):
        return [str(value)]
    if isinstance(value, float):
        return [repr(value)]
    if isinstance(value, dict):
        return [json.dumps(value)]
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [str(value)]


def to_cli(plan: Plan, output_dir: str, version: str | None = None) -> str:
    """``--key value`` arguments on one line, for a script that parses ``TrainingArguments`` with
    ``HfArgumentParser`` (``python train.py <these>``); booleans are written ``--bf16 True``."""
    kwargs = _build(plan, output_dir, _names_for(version), {})
    parts: list[str] = []
    for key, value in kwargs.items():
        if value is None:
            continue
        parts.append(f"--{key}")
        parts += [shlex.quote(v) for v in _cli_value(value)]
    return " ".join(parts) + "\n"


_RENDERERS = {"json": to_json, "yaml": to_yaml, "python": to_python, "cli": to_cli}


def render(plan: Plan, fmt: str, output_dir: str, version: str | None = None) -> str:
    """The plan as ``fmt`` text: one of json, yaml, python, cli. Imports neither transformers nor torch."""
    try:
        renderer = _RENDERERS[fmt]
    except (KeyError, TypeError):
        raise FinetuneHelperError("format", f"{fmt!r} is not an export format; choose from {', '.join(FORMATS)}") \
            from None
    return renderer(plan, output_dir, version=version)


__all__ = [
    "FORMATS", "installed_field_names", "installed_version", "logging_steps_for", "render", "save_steps_for",
    "target_major", "to_cli", "to_json", "to_python", "to_training_arguments", "to_yaml", "training_kwargs",
]
