"""Recipes: plain YAML saying what to fine-tune on what; the recommender fills in the rest.

A recipe has these sections (every key optional except ``model.name`` and ``data.path``)::

    model:     {name, trust_remote_code, attn_implementation}
    method:    {type: full|lora|qlora, lora_r, lora_alpha, lora_dropout, target_modules}
    data:      {path, format, columns, eval_fraction, max_length, packing, max_examples}
    hardware:  {gpu, gpus}
    recommend: {target_effective_batch, lr_min, lr_max, epochs, dataset_size}
    training:  {any TrainingArguments field: wins over the recommendation, reported as an override}
    trainer: trl | transformers
    seed: 42
    output_dir: runs/NAME

``load_recipe`` reads and checks a file; ``apply_overrides`` applies ``section.key=value`` strings from the command
line; every problem is a one-line ``FinetuneHelperError`` naming the field (``data.path``, ``method.type`` ...).
No torch or transformers import here.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .. import defaults
from ..errors import FinetuneHelperError
from ..recommender.training_setup import METHODS

#: Built-in offline assets (finetune_helper.train.tiny): the shipped pre-trained tiny base and the synthetic task data.
BUILTIN_MODEL = "builtin:tiny-llama"
BUILTIN_DATA = "builtin:arithmetic"
#: local data files the runner reads (datasets_io.load_data)
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
#: ``data.format`` values: ``auto`` detects from the columns (finetune_helper.train.data).
DATA_FORMATS = ("auto", "alpaca", "sharegpt", "messages", "prompt_completion", "text")


@dataclass
class ModelSection:
    #: catalog id or alias, Hub id, local directory, or ``builtin:tiny-llama`` (built offline by the project).
    name: str = ""
    #: run the model repository's own Python code (only when you trust it).
    trust_remote_code: bool = False
    #: ``sdpa``, ``eager`` or ``flash_attention_2``; empty means the architecture's default.
    attn_implementation: str | None = None


@dataclass
class MethodSection:
    #: ``full`` fine-tuning, ``lora`` (PEFT adapters on a 16-bit base) or ``qlora`` (adapters on an NF4 base).
    type: str = defaults.RECIPE_METHOD
    lora_r: int = defaults.LORA_R
    lora_alpha: int = defaults.LORA_ALPHA
    lora_dropout: float = defaults.LORA_DROPOUT
    #: ``all-linear`` (every linear but the output layer) or a list of module names such as [q_proj, v_proj].
    target_modules: str | list[str] = defaults.TARGET_MODULES
    #: full fine-tuning's weight storage: empty lets the planner decide (fp32 masters under bf16/fp16 autocast,
    #: pure bf16 only when that does not fit), ``fp32`` or ``bf16`` (pure-bf16 weights, gradients and states).
    weights_dtype: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            self.target_modules = [self.target_modules]  # one name (PEFT would read a bare string as a regex)
        if self.type not in METHODS:
            raise FinetuneHelperError("method.type", f"{self.type!r} is not one of {', '.join(METHODS)}")
        if self.lora_r <= 0:
            raise FinetuneHelperError("method.lora_r", f"must be a positive integer, got {self.lora_r}")
        if not 0 <= self.lora_dropout < 1:
            raise FinetuneHelperError("method.lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        if self.weights_dtype not in (None, "fp32", "bf16"):
            raise FinetuneHelperError("method.weights_dtype", f"{self.weights_dtype!r} is not one of fp32, bf16 "
                                      "(or empty: the planner decides)")
        if self.weights_dtype is not None and self.type != "full":
            raise FinetuneHelperError("method.weights_dtype", "is an option of full fine-tuning (a LoRA base is "
                                      "stored in the compute dtype)")


@dataclass
class DataSection:
    #: a local .json/.jsonl/.csv/.parquet file, a Hub dataset id, or ``builtin:arithmetic`` (generated offline).
    path: str = ""
    #: the split to train on: a Hub dataset's own split name (``train_sft``), or ``train`` for a local file (slices
    #: such as ``train[:1000]`` work for both).
    split: str = "train"
    #: a Hub dataset's configuration (subset) name, when it has several; empty for its default.
    config: str | None = None
    #: ``auto`` or one of alpaca, sharegpt, messages, prompt_completion, text.
    format: str = "auto"
    #: rename your columns to the format's names, e.g. {question: instruction, answer: output}.
    columns: dict[str, str] = field(default_factory=dict)
    #: fraction held out for evaluation, in [0, 0.5].
    eval_fraction: float = 0.05
    #: tokens per sequence (longer examples are truncated); empty means the recommender's sequence length.
    max_length: int | None = None
    #: pack examples padding-free into sequences of ``max_length`` (TRL ``packing=True``).
    packing: bool = False
    #: use at most this many training examples (quick trials).
    max_examples: int | None = None

    def __post_init__(self) -> None:
        if not self.split.strip():
            raise FinetuneHelperError("data.split", "must name a split, e.g. train or train_sft")
        if self.format not in DATA_FORMATS:
            raise FinetuneHelperError("data.format", f"{self.format!r} is not one of {', '.join(DATA_FORMATS)}")
        if not 0 <= self.eval_fraction <= 0.5:
            raise FinetuneHelperError("data.eval_fraction", f"must be in [0, 0.5], got {self.eval_fraction}")
        for name in ("max_length", "max_examples"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise FinetuneHelperError(f"data.{name}", f"must be a positive integer, got {value}")


@dataclass
class HardwareSection:
    #: a GPU name (see ``finetune-helper gpus``), an amount such as 24GB, or ``auto`` (the local GPU).
    gpu: str = "auto"
    gpus: int = 1
    #: how several GPUs share the work: auto (the fastest predicted of DDP, FSDP and, where DeepSpeed is installed and
    #: CUDA runs, ZeRO-2 / ZeRO-3), ddp, fsdp, or DeepSpeed zero2 / zero3 (needs ``pip install deepspeed`` and CUDA).
    strategy: str = defaults.STRATEGY
    #: DeepSpeed's offload to host memory: none, optimizer (zero2 / zero3) or all (zero3, parameters too).
    offload: str = defaults.OFFLOAD

    def __post_init__(self) -> None:
        if self.gpus < 1:
            raise FinetuneHelperError("hardware.gpus", f"must be >= 1, got {self.gpus}")
        if self.strategy not in defaults.STRATEGIES:
            raise FinetuneHelperError("hardware.strategy", f"{self.strategy!r} is not one of "
                                      f"{', '.join(defaults.STRATEGIES)}")
        if self.offload not in defaults.OFFLOADS:
            raise FinetuneHelperError("hardware.offload", f"{self.offload!r} is not one of "
                                      f"{', '.join(defaults.OFFLOADS)}")


@dataclass
class RecommendSection:
    target_effective_batch: int = defaults.TARGET_EFFECTIVE_BATCH
    lr_min: float = defaults.LR_MIN
    lr_max: float = defaults.LR_MAX
    epochs: float = defaults.EPOCHS
    #: training examples; empty means counted from the data.
    dataset_size: int | None = None
    #: the learning-rate schedule after warmup: cosine, linear, constant_with_warmup, cosine_with_min_lr or
    #: warmup_stable_decay.
    scheduler: str = defaults.SCHEDULER

    def __post_init__(self) -> None:
        if self.scheduler not in defaults.SCHEDULES:
            raise FinetuneHelperError("recommend.scheduler", f"{self.scheduler!r} is not one of "
                                      f"{', '.join(defaults.SCHEDULES)}")
        if self.target_effective_batch <= 0:
            raise FinetuneHelperError("recommend.target_effective_batch", f"must be > 0, got {self.target_effective_batch}")
        if not 0 < self.lr_min <= self.lr_max < 1:
            raise FinetuneHelperError("recommend.lr_min", f"need 0 < lr_min <= lr_max < 1, got {self.lr_min:g} and "
                                      f"{self.lr_max:g}")
        if self.epochs <= 0:
            raise FinetuneHelperError("recommend.epochs", f"must be > 0, got {self.epochs}")


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    method: MethodSection = field(default_factory=MethodSection)
    data: DataSection = field(default_factory=DataSection)
    hardware: HardwareSection = field(default_factory=HardwareSection)
    recommend: RecommendSection = field(default_factory=RecommendSection)
    #: TrainingArguments fields that win over the recommendation.
    training: dict[str, Any] = field(default_factory=dict)
    #: the trainer that runs (and that the plan is made for): ``trl`` (TRL's ``SFTTrainer``: its fused LM head never
    #: builds the vocabulary-wide logits) or ``transformers`` (``transformers.Trainer`` with the model's own loss, on
    #: the data TRL prepares: full logits in fp32, a smaller micro-batch).
    trainer: str = defaults.TRAINER
    seed: int = defaults.SEED
    #: where the run folder goes; empty means runs/<recipe file stem>.
    output_dir: str | None = None

    def __post_init__(self) -> None:
        if not self.model.name:
            raise FinetuneHelperError("model.name", "is required: a catalog name, Hub id, local directory or "
                                      "builtin:tiny-llama")
        if not self.data.path:
            raise FinetuneHelperError("data.path", "is required: a .json/.jsonl/.csv/.parquet file, a Hub dataset id "
                                      "or builtin:arithmetic")
        _check_training_keys(self.training)
        if self.trainer not in defaults.TRAINERS:
            raise FinetuneHelperError("trainer", f"{self.trainer!r} is not one of {', '.join(defaults.TRAINERS)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)


#: the data path a recipe made from a recommendation starts with, until the user names their own dataset
PLACEHOLDER_DATA = "train.jsonl"


def recipe_from_settings(*, model: str, gpu: str, gpus: int = 1, method: str = defaults.RECIPE_METHOD,
                         seq_len: int | None = None, dataset_size: int | None = None, epochs: float = defaults.EPOCHS,
                         target_effective_batch: int = defaults.TARGET_EFFECTIVE_BATCH, lr_min: float = defaults.LR_MIN,
                         lr_max: float = defaults.LR_MAX, data_path: str = PLACEHOLDER_DATA,
                         scheduler: str = defaults.SCHEDULER, strategy: str = defaults.STRATEGY,
                         offload: str = defaults.OFFLOAD, trainer: str = defaults.TRAINER) -> Recipe:
    """A recipe that reproduces a recommendation (the app's "recipe YAML" download and its Train tab)."""
    return Recipe(model=ModelSection(name=model), method=MethodSection(type=method),
                  data=DataSection(path=data_path, max_length=seq_len),
                  hardware=HardwareSection(gpu=gpu, gpus=gpus, strategy=strategy, offload=offload),
                  recommend=RecommendSection(target_effective_batch=target_effective_batch, lr_min=lr_min,
                                             lr_max=lr_max, epochs=epochs, dataset_size=dataset_size,
                                             scheduler=scheduler), trainer=trainer)


_SECTIONS = {"model": ModelSection, "method": MethodSection, "data": DataSection, "hardware": HardwareSection,
             "recommend": RecommendSection}
_TOP_LEVEL = {f.name for f in dataclasses.fields(Recipe)}


#: SFTConfig fields a recipe sets in its data section, where the planner reads them
_DATA_FIELDS = {"max_length": "data.max_length", "packing": "data.packing"}


def _check_training_keys(training: dict[str, Any]) -> None:
    """Names in ``training`` must be TrainingArguments fields of the installed transformers (read without import)."""
    from ..export.versions import ALIASES, installed_field_names, installed_sft_field_names

    known = installed_field_names()
    if known is None:
        return
    known = known | installed_sft_field_names() | ALIASES
    for key in training:
        if key in _DATA_FIELDS:
            raise FinetuneHelperError(f"training.{key}", f"is {_DATA_FIELDS[key]} in a recipe (the plan is made for "
                                      "it): set it there")
        if key == "output_dir":
            raise FinetuneHelperError("training.output_dir", "is set by --output-dir or the recipe's top-level "
                                      "output_dir (checkpoints must land in the run folder)")
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=2, cutoff=0.6)
            raise FinetuneHelperError(f"training.{key}", "is not a TrainingArguments or SFTConfig field"
                                      + (f"; did you mean {' or '.join(close)}?" if close else ""))


# ------------------------------------------------------------------------------------------------ typing
def _type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping",
             list: "a list", type(None): "empty"}
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return names.get(origin or tp, str(tp))


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """``value`` as type ``tp`` or a one-line error. Strings such as ``3e-4`` (PyYAML keeps them as str) become
    floats where a number is expected; ints become floats; nothing else is converted."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, name)
            except FinetuneHelperError as exc:
                if "finite" in exc.message:
                    raise
                continue
        raise FinetuneHelperError(name, f"must be {_type_name(tp)}, got {value!r}")
    base = origin or tp
    if base is bool:
        if isinstance(value, bool):
            return value
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif base is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise FinetuneHelperError(name, f"must be a finite number, got {value!r}")
            return number
    elif base is str:
        if isinstance(value, str):
            return value
    elif base is dict:
        if isinstance(value, dict):
            return {str(k): v for k, v in value.items()}
    elif base is list:
        if isinstance(value, list):
            return [str(v) for v in value]
    raise FinetuneHelperError(name, f"must be {_type_name(tp)}, got {value!r}")


def _build_section(cls: type, raw: Any, section: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise FinetuneHelperError(section, f"must be a mapping of keys to values, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.5)
            raise FinetuneHelperError(f"{section}.{key}", "unknown key" + (f"; did you mean {close[0]}?" if close else
                                      f"; {section} takes {', '.join(known)}"))
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}")
    return cls(**kwargs)


def recipe_from_dict(raw: Any) -> Recipe:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise FinetuneHelperError("recipe", "must be a YAML mapping with sections model, method, data, hardware, "
                                  "recommend, training")
    for key in raw:
        if key not in _TOP_LEVEL:
            close = difflib.get_close_matches(str(key), sorted(_TOP_LEVEL), n=1, cutoff=0.5)
            raise FinetuneHelperError("recipe", f"unknown section {key!r}" + (f"; did you mean {close[0]}?" if close
                                      else f"; sections are {', '.join(sorted(_TOP_LEVEL))}"))
    sections = {name: _build_section(cls, raw.get(name), name) for name, cls in _SECTIONS.items()}
    training = raw.get("training") or {}
    if not isinstance(training, dict):
        raise FinetuneHelperError("training", f"must be a mapping of TrainingArguments fields, got {training!r}")
    return Recipe(**sections, training=dict(training),
                  trainer=_coerce(raw.get("trainer", defaults.TRAINER), str, "trainer"),
                  seed=_coerce(raw.get("seed", defaults.SEED), int, "seed"),
                  output_dir=_coerce(raw.get("output_dir"), str | None, "output_dir"))


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML whose mappings may not repeat a key (the YAML spec requires unique keys; PyYAML silently keeps the last,
    so ``lr`` written twice would train with whichever came second)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, source: str = "") -> Any:
    """``text`` parsed as YAML, or a one-line error (field ``recipe``) naming ``source`` and the line."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        prefix = f"{source}: " if source else ""
        raise FinetuneHelperError("recipe", f"{prefix}is not valid YAML{where}: {getattr(exc, 'problem', exc)}") \
            from None


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and check a recipe file."""
    p = Path(path)
    if not p.is_file():
        raise FinetuneHelperError("recipe", f"no such file: {path}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FinetuneHelperError("recipe", f"{path}: not readable as UTF-8 text: {exc}") from None
    return recipe_from_dict(apply_overrides(parse_yaml(text, str(path)), overrides))


def apply_overrides(raw: Any, overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``section.key=value`` strings (values parsed as YAML scalars: ``20``, ``true``, ``3.0e-4``) onto ``raw``."""
    data: dict[str, Any] = dict(raw or {}) if isinstance(raw, dict) else {}
    for item in overrides:
        if "=" not in item:
            raise FinetuneHelperError("override", f"{item!r} is not key=value (e.g. training.max_steps=20)")
        key, _, text = item.partition("=")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        parts = key.strip().split(".")
        if len(parts) == 1:
            data[parts[0]] = value
            continue
        if len(parts) != 2:
            raise FinetuneHelperError(key, "overrides have the form section.key=value")
        section = data.get(parts[0])
        section = dict(section) if isinstance(section, dict) else {}
        section[parts[1]] = value
        data[parts[0]] = section
    return data


def resolve_recipe_gpu(recipe: Recipe):  # -> GPUSpec
    """``hardware.gpu`` resolved, its errors named after the recipe field."""
    from ..recommender.gpu import resolve_gpu

    try:
        return resolve_gpu(recipe.hardware.gpu)
    except FinetuneHelperError as exc:
        raise FinetuneHelperError("hardware.gpu", exc.message) from None


def resolve_recipe_model(name: str):  # -> ModelSpec
    """A model name or path from the recipe resolved, its errors named ``model.name``."""
    from ..recommender.model import resolve_model

    try:
        return resolve_model(name)
    except FinetuneHelperError as exc:
        raise FinetuneHelperError("model.name", exc.message) from None


def check_references(recipe: Recipe) -> list[str]:
    """Check what can be checked offline and without torch: the GPU, a catalog / local / built-in model, a local data
    file. Returns notes on what only the run can check (Hub models and datasets)."""
    from ..recommender import catalog

    notes: list[str] = []
    if recipe.hardware.gpu != "auto":
        resolve_recipe_gpu(recipe)
    name = recipe.model.name
    if name.startswith("builtin:"):
        if name != BUILTIN_MODEL:
            raise FinetuneHelperError("model.name", f"unknown built-in model {name!r}; the built-in is {BUILTIN_MODEL}")
    elif catalog.find_model(name) is not None or Path(name).expanduser().is_dir():
        resolve_recipe_model(name)
    else:
        notes.append(f"model.name {name!r} is not in the catalog: its config.json is fetched from the Hub at run time")
    path = recipe.data.path
    if path.startswith("builtin:"):
        if path != BUILTIN_DATA:
            raise FinetuneHelperError("data.path", f"unknown built-in data {path!r}; the built-in is {BUILTIN_DATA}")
    elif Path(path).suffix.lower() in DATA_SUFFIXES or path.startswith((".", "/", "~")):
        if not Path(path).expanduser().exists():
            raise FinetuneHelperError("data.path", f"no such file: {path}")
    else:
        notes.append(f"data.path {path!r} is read as a Hub dataset id at run time")
    return notes
