"""``finetune-helper run``: a recipe, filled in by the recommender, trained with the real Hugging Face stack.

The run folder (``--output-dir``, default ``runs/<recipe name>``) holds, before training starts:
``recipe.yaml`` (the fully resolved recipe), ``plan.json`` (the recommendation with its reasons, the recipe's
overrides and what was adapted to this machine) and ``training_args.json`` (readable by
``HfArgumentParser(SFTConfig).parse_json_file``); then ``checkpoint-N/`` folders (safetensors), ``metrics.jsonl``
(one line per logged step), ``final/`` (the model or LoRA adapter, with the tokenizer) and ``summary.json``.

Exit codes: 0 done; 2 bad input; 3 stopped because the loss diverged (NaN/inf or exploding; the last good
checkpoint is kept); 4 out of memory even at per-device batch 1; 130 interrupted by Ctrl-C / SIGTERM after saving a
checkpoint (``--resume`` continues).  Out-of-memory on a step halves the per-device batch and doubles gradient
accumulation (same effective batch, same learning rate) and continues from the last checkpoint.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import FinetuneHelperError, first_line
from ..recommender.optimizers import EIGHT_BIT_FALLBACK, is_eight_bit
from ..recommender.training_setup import TORCH_DTYPE_NAMES
from ..units import fmt_gib
from ..export.versions import RENAMES, check_stack, installed_stack
from . import launch, run_folder
from .callbacks import runner_callbacks
from .divergence import PATIENCE
from .recipe import BUILTIN_DATA, BUILTIN_MODEL, Recipe, load_recipe, resolve_recipe_gpu, resolve_recipe_model
from .run_folder import last_checkpoint, starting_loss, write_json
from .setup import checkpointing

EXIT_OK, EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_OOM, EXIT_INTERRUPTED = 0, 2, 3, 4, 130
#: ChatML with generation markers (Qwen's template format), used when a tokenizer has no chat template of its own;
#: it is saved with the tokenizer in final/ so inference formats prompts the same way.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


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


# ------------------------------------------------------------------------------------------- preparation
@dataclass
class Prepared:
    """Everything decided before any weights are loaded (what ``--dry-run`` writes)."""

    recipe: Recipe
    run_dir: Path
    model_path: str
    plan: Any  # finetune_helper.recommender.plan.Plan
    sft_kwargs: dict[str, Any]
    overrides: dict[str, Any]
    adaptations: list[str]
    train_dataset: Any
    eval_dataset: Any
    data_format: str
    data_note: str | None
    holdout: list[dict] | None  # builtin data: held-out problems for exact match
    #: a resumed run: ``sft_kwargs`` are the run's saved training_args.json (but for the training length)
    resumed: bool = False
    #: the GPU the recipe names and the one planned for (the detected one when they differ)
    hardware: dict[str, str] = field(default_factory=dict)


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _detected_gpu():  # -> GPUSpec | None
    """The local CUDA GPU (name, memory, bf16 support), or None without CUDA; what ``run`` plans for when it differs
    from the recipe's ``hardware.gpu``."""
    import torch

    if not torch.cuda.is_available():
        return None
    from ..recommender.gpu import detect_gpu

    return detect_gpu()


def _resolve_model_path(recipe: Recipe, log: Callable[[str], None]) -> str:
    name = recipe.model.name
    if name == BUILTIN_MODEL:
        from .tiny import check_base

        try:
            path = check_base()
        except ValueError as exc:
            raise FinetuneHelperError("model.name", str(exc)) from None
        log(f"model: {BUILTIN_MODEL} (the tiny Llama pre-trained by finetune_helper.train.tiny, in {path})")
        return str(path)
    return name


def _load_data(recipe: Recipe, tokenizer, log: Callable[[str], None], *, check_only: bool = False):
    from datasets import Dataset

    from . import data as dataio

    if check_only and not recipe.data.path.startswith("builtin:") and not Path(recipe.data.path).expanduser().exists():
        try:
            return _load_data(recipe, tokenizer, log)
        except FinetuneHelperError as exc:
            if exc.field != "data.path" or "could not be loaded" not in exc.message:
                raise
            log(f"note: data.path {recipe.data.path!r} cannot be read here (a Hub dataset, offline?): its split, "
                "configuration and format are checked when the run loads it")
            return None, None, recipe.data.format, {}, None, None

    holdout = None
    if recipe.data.path == BUILTIN_DATA:
        if recipe.data.split != "train" or recipe.data.config:
            raise FinetuneHelperError("data.split" if recipe.data.split != "train" else "data.config",
                                      f"{BUILTIN_DATA} has one split, train, and no configurations")
        from .tiny import N_DEMO_TRAIN, N_HOLDOUT, synthetic_dataset

        n = recipe.data.max_examples or N_DEMO_TRAIN
        fmt = recipe.data.format if recipe.data.format != "auto" else "alpaca"
        dataset = Dataset.from_list(synthetic_dataset(n, seed=recipe.seed, split="train", fmt=fmt))
        holdout = synthetic_dataset(N_HOLDOUT, seed=recipe.seed, split="test", fmt="alpaca")
        detected = dataio.detect_format(dataset.column_names, dataset[0])
        log(f"data: {BUILTIN_DATA} ({n} generated {fmt} examples, {len(holdout)} held-out problems)")
    else:
        dataset, detected = dataio.load_data(recipe.data.path, split=recipe.data.split, config=recipe.data.config,
                                             fmt=None if recipe.data.format == "auto" else recipe.data.format,
                                             columns=recipe.data.columns or None)
        if recipe.data.max_examples:
            dataset = dataset.select(range(min(recipe.data.max_examples, len(dataset))))
        log(f"data: {recipe.data.path} ({len(dataset)} examples, format {detected})")
    train, evaluation = dataio.split_eval(dataset, recipe.data.eval_fraction, recipe.seed)
    if tokenizer is None:  # dry run without the tokenizer: how the loss is masked is decided at run time
        return train, evaluation, detected, {}, "loss masking decided when the tokenizer is loaded", holdout
    supported = dataio.chat_template_supports_assistant_mask(tokenizer)
    train, trl_kwargs, note = dataio.to_trl_dataset(train, detected, assistant_mask_supported=supported)
    if evaluation is not None:
        evaluation, _, _ = dataio.to_trl_dataset(evaluation, detected, assistant_mask_supported=supported)
    if note:
        log(f"data: {note}")
    return train, evaluation, detected, trl_kwargs, note, holdout


def load_tokenizer(model_path: str, recipe: Recipe, log: Callable[[str], None]):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=recipe.model.trust_remote_code)
    except OSError as exc:
        raise FinetuneHelperError("model.name", f"cannot load the tokenizer of {model_path!r} "
                                  f"({first_line(exc)}); give a local directory or a reachable Hub id") from None
    if not tokenizer.chat_template:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        log("tokenizer: no chat template of its own; using the default ChatML template (saved with the tokenizer)")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _plan_request(recipe: Recipe, spec, gpu, n_train: int):  # -> recommender.plan.PlanRequest
    """What the recipe asks the planner (the training examples counted from the data unless the recipe says)."""
    from ..recommender.calibration import lookup
    from ..recommender.plan import PlanRequest

    targets = recipe.method.target_modules
    return PlanRequest(
        model=spec, gpu=gpu, gpus=recipe.hardware.gpus, method=recipe.method.type, seq_len=recipe.data.max_length,
        dataset_size=recipe.recommend.dataset_size or n_train, epochs=recipe.recommend.epochs,
        target_effective_batch=recipe.recommend.target_effective_batch, lr_min=recipe.recommend.lr_min,
        lr_max=recipe.recommend.lr_max, lora_r=recipe.method.lora_r, lora_alpha=recipe.method.lora_alpha,
        lora_dropout=recipe.method.lora_dropout, attn_implementation=recipe.model.attn_implementation,
        lora_target_modules=targets if isinstance(targets, str) else tuple(targets),
        weights_dtype=recipe.method.weights_dtype, calibration=lookup(gpu.name, spec.name, recipe.method.type),
        packing=bool(recipe.data.packing), scheduler=recipe.recommend.scheduler,
        strategy=recipe.hardware.strategy, offload=recipe.hardware.offload,
    )


def _sft_kwargs(recipe: Recipe, plan, run_dir: Path, device: str, *, dry_run: bool, has_eval: bool,
                trl_kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The ``SFTConfig`` keyword arguments of the run (the plan's, the recipe's overrides, what this machine needs)
    checked by building an SFTConfig once, and the adaptations to this machine, each said in a line."""
    from ..export.training_args import training_kwargs

    overrides = dict(recipe.training)
    adaptations: list[str] = []
    kwargs = training_kwargs(plan, str(run_dir), sft=True, **{"seed": recipe.seed, **overrides})
    _check_deepspeed(kwargs, device, dry_run=dry_run)
    if device == "cpu" and dry_run:
        adaptations.append("no CUDA GPU on this machine: a run here would train on the CPU in fp32")
    elif device == "cpu" and overrides.get("bf16") is True:
        kwargs.update(use_cpu=True, bf16=True, fp16=False)
        adaptations.append("no CUDA GPU: training on the CPU under bf16 autocast (training.bf16=true; use_cpu=True)")
    elif device == "cpu":
        kwargs.update(use_cpu=True, bf16=False, fp16=False)
        adaptations.append("no CUDA GPU: training on the CPU in fp32 (use_cpu=True, bf16/fp16 off)")
        if plan.optim not in ("adamw_torch", "adamw_torch_fused", "sgd", "adafactor") and "optim" not in overrides:
            kwargs["optim"] = "adamw_torch"
            adaptations.append(f"optim {plan.optim} needs bitsandbytes on CUDA: adamw_torch on the CPU")
    if device == "cpu" and not dry_run and kwargs.get("fsdp"):
        # accelerate routes FSDP to GPU-like devices only: CPU processes would silently replicate; say so instead
        kwargs = {k: v for k, v in kwargs.items() if k not in ("fsdp", "fsdp_config")}
        adaptations.append("no CUDA GPU: FSDP is accelerate's on GPUs only; the CPU processes train data parallel "
                           "(DDP, gloo), the model replicated")
    if kwargs.get("lr_scheduler_kwargs") and "lr_scheduler_kwargs" not in overrides and int(
            overrides.get("max_steps", -1)) > 0:
        # a run shortened or lengthened by training.max_steps: the schedule's own step counts follow it
        from ..recommender.rules import scheduler_kwargs
        from ..recommender.schedule import warmup_steps_for

        total = int(overrides["max_steps"])
        warmup = warmup_steps_for(kwargs.get("warmup_steps", kwargs.get("warmup_ratio", 0)) or 0, total)
        kwargs["lr_scheduler_kwargs"] = scheduler_kwargs(plan.lr_scheduler_type, total, warmup)
    # keep checkpoints on logging steps, so a diverged loss is seen before it can be saved
    logging_steps = int(kwargs.get("logging_steps", 10))
    if "save_steps" in kwargs and "save_steps" not in overrides:
        kwargs["save_steps"] = max(logging_steps, math.ceil(kwargs["save_steps"] / logging_steps) * logging_steps)
    kwargs.setdefault("include_num_input_tokens_seen", "non_padding")
    kwargs.setdefault("logging_nan_inf_filter", False)  # the Trainer would hide NaN/inf losses from the guard
    kwargs.setdefault("disable_tqdm", True)
    # DDP: every trainable parameter takes part in each step (find_unused_parameters would walk the graph each time)
    kwargs.setdefault("ddp_find_unused_parameters", False)
    kwargs.setdefault("save_total_limit", 3)
    if overrides.get("bf16") is True and device == "cuda" and not plan.request.gpu.bf16:
        raise FinetuneHelperError("training.bf16", f"{plan.request.gpu.name} has no bf16: leave it out (the plan "
                                  "trains in fp16 with loss scaling there)")
    if not has_eval and str(overrides.get("eval_strategy", "no")) != "no":
        raise FinetuneHelperError("training.eval_strategy", f"{overrides['eval_strategy']!r} needs held-out data: set "
                                  "data.eval_fraction above 0 (or eval_strategy to no)")
    if has_eval:
        kwargs.setdefault("eval_strategy", "steps")
        kwargs.setdefault("eval_steps", kwargs.get("save_steps", 100))
        kwargs.setdefault("per_device_eval_batch_size", kwargs["per_device_train_batch_size"])
    sft = {"max_length": plan.request.resolved_seq_len, "packing": recipe.data.packing, **trl_kwargs}
    if recipe.data.packing:
        sft["padding_free"] = True
        attn = recipe.model.attn_implementation or plan.request.model.default_attn_implementation
        if attn != "flash_attention_2" or device == "cpu":
            adaptations.append(
                "data.packing: padding-free rows are attended as one masked sequence without flash_attention_2, "
                "quadratic in the packed length (benchmarks/train_throughput.py: 2.7x slower than padded batches on "
                "the CPU); on a GPU set model.attn_implementation=flash_attention_2")
    sft.update({k: v for k, v in overrides.items() if k in sft})  # training: completion_only_loss wins, say
    return _check_sft_config({**kwargs, **sft}, overrides, device), adaptations


def prepare(recipe: Recipe, run_dir: Path, log: Callable[[str], None] = print, *,
            dry_run: bool = False, resume: bool = False, check_only: bool = False) -> tuple[Prepared, Any]:
    """Resolve model, data and plan; return the preparation and the tokenizer.

    A dry run of a Hub model that is not available offline plans from the catalog config without its tokenizer
    (nothing is downloaded); the loss-masking settings are then decided at run time.  ``check_only``
    (``finetune-helper validate``) goes further: a Hub dataset that cannot be read offline is planned for
    ``recommend.dataset_size`` (or the planner's assumption) and said in the log.  ``resume`` continues with the
    run's saved ``training_args.json`` (an out-of-memory back-off's batch included), only the training length
    taken from the recipe.
    """
    from datasets.utils.logging import disable_progress_bar as datasets_quiet
    from transformers.utils.logging import disable_progress_bar as transformers_quiet

    from ..recommender.plan import recommend_plan

    datasets_quiet()  # one progress line per log from us, no download / shard bars
    transformers_quiet()
    # bitsandbytes (imported by transformers / TRL when installed) warns on every CPU import about an optional kernel
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    for warning in check_stack():  # a version below the supported range is refused here
        log(f"warning: {warning}")
    gpu = resolve_recipe_gpu(recipe)  # before any slow work: a misspelt GPU fails at once
    hardware = {"recipe": gpu.describe()}
    detected = _detected_gpu() if not check_only else None
    if detected is not None and (detected.name, detected.memory_bytes, detected.bf16) != (
            gpu.name, gpu.memory_bytes, gpu.bf16):
        log(f"hardware: this machine has {detected.describe()}; the recipe names {gpu.describe()}: planned for the "
            "GPU that is here")
        gpu = detected
    hardware["planned_for"] = gpu.describe()
    model_path = _resolve_model_path(recipe, log)
    spec = resolve_recipe_model(model_path)
    check_targets(recipe, spec)
    try:
        tokenizer = load_tokenizer(model_path, recipe, log)
    except FinetuneHelperError:
        if not (dry_run or check_only):
            raise
        tokenizer = None
        log(f"tokenizer: {model_path} is not available here; planned without it")
    train, evaluation, fmt, trl_kwargs, note, holdout = _load_data(recipe, tokenizer, log, check_only=check_only)

    device = _device()
    if device == "cpu":
        # DeepSpeed (imported by the Trainer's stack when installed) prints a warning to stdout when it finds no
        # accelerator and settles on the CPU; naming the CPU, which is what it would choose, keeps the log clean
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        plan = recommend_plan(_plan_request(recipe, spec, gpu, len(train) if train is not None else None))
    except FinetuneHelperError as exc:  # the planner names its command-line flags; a recipe names its fields
        raise FinetuneHelperError(_RECIPE_FIELD.get(exc.field, exc.field), exc.message) from None
    overrides = dict(recipe.training)
    sft_kwargs, adaptations = _sft_kwargs(recipe, plan, run_dir, device, dry_run=dry_run or check_only,
                                          has_eval=evaluation is not None, trl_kwargs=trl_kwargs)
    resumed = resume and (saved := run_folder.read_json(run_dir / run_folder.TRAINING_ARGS)) is not None
    if resumed:
        from_recipe = {k: sft_kwargs[k] for k in _FROM_RECIPE if k in sft_kwargs}
        sft_kwargs = {**saved, **from_recipe}
    prepared = Prepared(recipe=recipe, run_dir=run_dir, model_path=model_path, plan=plan, sft_kwargs=sft_kwargs,
                        overrides=overrides, adaptations=adaptations, train_dataset=train, eval_dataset=evaluation,
                        data_format=fmt, data_note=note, holdout=holdout, resumed=resumed, hardware=hardware)
    return prepared, tokenizer


#: the planner's fields (its command-line flags) as the recipe names them
_RECIPE_FIELD = {"seq-len": "data.max_length", "epochs": "recommend.epochs", "dataset-size": "recommend.dataset_size",
                 "target-batch": "recommend.target_effective_batch", "lr-min": "recommend.lr_min",
                 "lora-r": "method.lora_r", "lora-alpha": "method.lora_alpha", "lora-dropout": "method.lora_dropout",
                 "lora_target_modules": "method.target_modules", "weights-dtype": "method.weights_dtype",
                 "attn-implementation": "model.attn_implementation", "gpus": "hardware.gpus", "gpu": "hardware.gpu",
                 "method": "method.type", "model": "model.name", "strategy": "hardware.strategy",
                 "offload": "hardware.offload"}

#: training_args.json fields a resumed run takes from its recipe rather than from the saved arguments: its length,
#: and the run folder as resolved now (a relative one was saved against the first run's working directory)
_FROM_RECIPE = ("num_train_epochs", "max_steps", "output_dir")


def check_targets(recipe: Recipe, spec) -> None:
    """``method.target_modules`` against the model's linear layers, every name: PEFT matches by suffix and refuses
    only when no name matches, so ``[q_projj, v_proj]`` would silently train v_proj alone."""
    targets = recipe.method.target_modules
    if recipe.method.type == "full" or targets == "all-linear":
        return
    try:
        spec.lora_linears(tuple(targets) if isinstance(targets, list) else targets)
    except FinetuneHelperError as exc:
        raise FinetuneHelperError("method.target_modules", exc.message) from None


#: TrainingArguments fields that must be positive when a recipe sets them
_POSITIVE_FIELDS = {"per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                    "learning_rate", "num_train_epochs", "logging_steps", "save_steps", "eval_steps", "max_length"}


def check_training_values(training: dict[str, Any]) -> dict[str, Any]:
    """The recipe's ``training:`` values typed as the SFTConfig fields they set (``"3e-4"`` -> float), with
    one-line errors naming ``training.<key>``; needs no plan (``finetune-helper validate`` uses it)."""
    import typing

    from trl import SFTConfig

    from .recipe import _coerce

    hints = typing.get_type_hints(SFTConfig)
    simple = (int, float, bool, int | None, float | None, bool | None)
    out = dict(training)
    for key, value in training.items():
        tp = hints.get(key)
        if tp in simple:
            out[key] = value = _coerce(value, tp, f"training.{key}")
        if key in _POSITIVE_FIELDS and not (isinstance(value, (int, float)) and value > 0):
            raise FinetuneHelperError(f"training.{key}", f"must be > 0, got {value!r}")
    return out


def _check_sft_config(sft_kwargs: dict[str, Any], overrides: dict[str, Any], device: str) -> dict[str, Any]:
    """Type-check the recipe's ``training:`` values against the SFTConfig fields and build the SFTConfig once, before
    anything is written, so a bad value is a one-line error naming it. Returns the kwargs with coerced values."""
    import warnings

    from trl import SFTConfig

    # an override may name a setting by the other transformers version's name (warmup_ratio, gradient_checkpointing):
    # the export wrote it under the installed version's name
    present = {k: k if k in sft_kwargs else RENAMES.get(k, k) for k in overrides}
    typed = check_training_values({name: sft_kwargs[name] for name in present.values() if name in sft_kwargs})
    sft_kwargs = {**sft_kwargs, **typed}
    probe = dict(sft_kwargs)
    if device == "cpu":  # a dry run on a machine without the planned GPU: check the values, not the hardware
        probe.update(use_cpu=True, bf16=False, fp16=False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            SFTConfig(**probe)
    except (TypeError, ValueError) as exc:
        text = first_line(exc)
        raise FinetuneHelperError("training", f"the TrainingArguments do not build: {text}") from None
    return sft_kwargs


def write_run_files(prep: Prepared) -> None:
    """recipe.yaml, plan.json and training_args.json; a resumed run keeps the plan.json it started with."""
    prep.run_dir.mkdir(parents=True, exist_ok=True)
    (prep.run_dir / run_folder.RECIPE).write_text(run_folder.RECIPE_HEADER + "\n" + prep.recipe.to_yaml())
    write_json(prep.run_dir / run_folder.TRAINING_ARGS, prep.sft_kwargs)
    if prep.resumed and (prep.run_dir / run_folder.PLAN).is_file():
        return
    plan = prep.plan.to_dict()
    plan["overrides"] = prep.overrides
    plan["adaptations"] = prep.adaptations
    plan["data_format"] = prep.data_format
    plan["data_note"] = prep.data_note
    plan["stack"] = installed_stack()
    plan["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")  # the GPUs this run may use
    plan["hardware"] = prep.hardware
    estimate = run_estimate(prep)
    plan["run"] = {"setup": dataclasses.asdict(run_setup(prep, prep.sft_kwargs)), "estimate": estimate.to_dict()}
    plan["train_examples"] = len(prep.train_dataset)
    plan["eval_examples"] = len(prep.eval_dataset) if prep.eval_dataset is not None else 0
    write_json(prep.run_dir / run_folder.PLAN, plan)


# ------------------------------------------------------------------------------------------- training
def run_setup(prep: Prepared, sft_kwargs: dict[str, Any]):  # -> recommender.training_setup.TrainingSetup
    """The setup of the step these arguments run (``train.setup.executed_setup``): what the model is loaded as and
    what the reported estimate describes."""
    from .setup import executed_setup

    return executed_setup(prep.recipe, prep.plan.request.model, sft_kwargs, device=_run_device(sft_kwargs),
                          weights_dtype=prep.plan.weights_dtype)


def run_estimate(prep: Prepared, sft_kwargs: dict[str, Any] | None = None):  # -> MemoryEstimate
    """The memory estimate of the step these arguments run on this machine (what plan.json and summary.json
    report next to the plan made for the recipe's GPU)."""
    from ..recommender.memory import estimate_memory

    kwargs = sft_kwargs if sft_kwargs is not None else prep.sft_kwargs
    setup = run_setup(prep, kwargs)
    gpus = prep.plan.request.gpus  # the processes of the run: FSDP / ZeRO shard over them, DDP replicates
    sharding = "fsdp" if kwargs.get("fsdp") and gpus > 1 else "ddp" if gpus > 1 else "none"
    zero = _zero_strategy(kwargs)
    sharding, offload = zero if zero else (sharding, "none")
    return estimate_memory(prep.plan.request.model, setup, gpus=gpus, sharding=sharding,
                           accumulation=int(kwargs.get("gradient_accumulation_steps", 1)), offload=offload)


def _zero_strategy(sft_kwargs: dict[str, Any]) -> tuple[str, str] | None:
    """(zero2 | zero3, offload) when these arguments run DeepSpeed ZeRO (the plan's config, or a recipe's
    ``training.deepspeed`` dict or JSON file)."""
    from ..recommender.zero import strategy_of

    config = sft_kwargs.get("deepspeed")
    if isinstance(config, str):
        config = run_folder.read_json(Path(config)) or {}
    return strategy_of(config) if isinstance(config, dict) else None


def _shards_parameters(sft_kwargs: dict[str, Any]) -> bool:
    """Whether these arguments split the parameters themselves over the processes (FSDP, ZeRO-3)."""
    return bool(sft_kwargs.get("fsdp")) or (_zero_strategy(sft_kwargs) or ("none",))[0] == "zero3"


def _check_deepspeed(sft_kwargs: dict[str, Any], device: str, *, dry_run: bool) -> None:
    zero = _zero_strategy(sft_kwargs)
    if zero is not None:
        check_deepspeed(zero[0], device, dry_run=dry_run)


def check_deepspeed(strategy: str, device: str | None = None, *, dry_run: bool = False) -> None:
    """A ZeRO run needs DeepSpeed installed, and CUDA GPUs (the Trainer's DeepSpeed path, through accelerate, does
    not run on the CPU); refused at once, before any process starts or anything loads."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise FinetuneHelperError("hardware.strategy", f"{strategy} runs DeepSpeed, which is not installed here: "
                                  "pip install deepspeed (or strategy fsdp)")
    if not dry_run and (device or _device()) == "cpu":
        raise FinetuneHelperError("hardware.strategy", f"{strategy}: DeepSpeed runs on CUDA GPUs and this machine has "
                                  "none (the Trainer's DeepSpeed path does not train on the CPU): use fsdp or ddp "
                                  "here, or --dry-run to write the run's arguments")


def _run_device(sft_kwargs: dict[str, Any]) -> str:
    """Where these arguments run: the CPU when they say so (``use_cpu``), else CUDA (a dry run on a machine without
    a GPU writes the arguments for the GPU the recipe names)."""
    return "cpu" if sft_kwargs.get("use_cpu") else "cuda"




def _load_model(prep: Prepared, sft_kwargs: dict[str, Any]):
    """The model as :func:`run_setup` says: fp32 masters for mixed-precision full fine-tuning, bf16 for pure-bf16,
    the compute dtype for a LoRA base, NF4 linears (bitsandbytes) for QLoRA."""
    import torch
    from transformers import AutoModelForCausalLM

    setup = run_setup(prep, sft_kwargs)
    kwargs: dict[str, Any] = {"dtype": getattr(torch, TORCH_DTYPE_NAMES[setup.load_dtype]),
                              "trust_remote_code": prep.recipe.model.trust_remote_code,
                              "attn_implementation": setup.attn_implementation}
    if setup.method == "qlora":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise FinetuneHelperError("method.type", "qlora needs the bitsandbytes package (pip install "
                                      "bitsandbytes); use lora or full without it") from None
        from transformers import BitsAndBytesConfig

        # bitsandbytes >= 0.45 quantizes and runs 4-bit layers on the CPU too (slowly): tiny models train there
        compute = getattr(torch, TORCH_DTYPE_NAMES[setup.dtype])
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
            # FSDP shards one dtype per unit: 4-bit weights stored in the compute dtype can be wrapped with the
            # rest (PEFT's docs, "FSDP + QLoRA" and "DeepSpeed + QLoRA" with ZeRO-3: bnb_4bit_quant_storage
            # matching the other parameters' dtype)
            **({"bnb_4bit_quant_storage": compute} if _shards_parameters(sft_kwargs) else {}))
    try:
        return AutoModelForCausalLM.from_pretrained(prep.model_path, **kwargs)
    except OSError as exc:
        raise FinetuneHelperError("model.name", f"cannot load weights of {prep.model_path!r} "
                                  f"({first_line(exc)})") from None


def _peft_config(recipe: Recipe):
    if recipe.method.type == "full":
        return None
    from peft import LoraConfig

    targets = recipe.method.target_modules
    return LoraConfig(r=recipe.method.lora_r, lora_alpha=recipe.method.lora_alpha,
                      lora_dropout=recipe.method.lora_dropout, task_type="CAUSAL_LM",
                      target_modules=targets if isinstance(targets, str) else list(targets))


def build_trainer(prep: Prepared, tokenizer, sft_kwargs: dict[str, Any], callbacks: list) -> Any:
    """The run's ``SFTTrainer`` for these arguments: its model loaded as the setup says, PEFT applied."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(**sft_kwargs)
    model = _load_model(prep, sft_kwargs)
    trainer_class = SFTTrainer
    if prep.plan.lr_scheduler_type == "step_decay" and sft_kwargs.get("lr_scheduler_type") == "constant_with_warmup":
        trainer_class = _with_lambda_schedule(SFTTrainer, "step_decay", prep.plan.lr_scheduler_kwargs)
    trainer = trainer_class(model=model, args=args, train_dataset=prep.train_dataset, eval_dataset=prep.eval_dataset,
                            processing_class=tokenizer, peft_config=_peft_config(prep.recipe), callbacks=callbacks)
    for printer in (PrinterCallback, ProgressCallback):  # our Progress callback prints one line per log instead
        trainer.remove_callback(printer)
    return trainer


def _with_lambda_schedule(trainer_class, scheduler: str, options: dict[str, Any]):
    """``trainer_class`` whose scheduler is a ``LambdaLR`` of :func:`recommender.schedule.lr_at`'s ``scheduler``
    (a schedule ``transformers.get_scheduler`` has no type for), over the Trainer's own step count and warmup."""
    from torch.optim.lr_scheduler import LambdaLR

    from ..recommender.schedule import lr_at

    class LambdaScheduled(trainer_class):
        def create_scheduler(self, num_training_steps: int, optimizer=None):
            if self.lr_scheduler is None:
                warmup = self.args.get_warmup_steps(num_training_steps)
                self.lr_scheduler = LambdaLR(optimizer or self.optimizer, lambda step: lr_at(
                    step, 1.0, num_training_steps, warmup, scheduler, options))
                self._created_lr_scheduler = True
            return self.lr_scheduler

    return LambdaScheduled


def _back_off(sft_kwargs: dict[str, Any], run_dir: Path, log: Callable[[str], None], *,
              cuda: bool) -> dict[str, Any]:
    """After an out-of-memory step, the planner's ladder, one rung at a time, with the same effective batch and
    learning rate: halve the per-device batch (twice the accumulation); at batch 1, gradient checkpointing; then
    8-bit optimizer states (before the first checkpoint only: a checkpoint's optimizer state does not load into
    another optimizer; CUDA and bitsandbytes needed).  Continues from the last checkpoint; returns the event as the
    summary records it, or stops with exit 4 when no rung is left."""
    batch, accum = sft_kwargs["per_device_train_batch_size"], sft_kwargs["gradient_accumulation_steps"]
    ckpt = last_checkpoint(run_dir)
    event: dict[str, Any] = {"resumed_from": ckpt.name if ckpt else None}
    if batch > 1:
        new_batch = batch // 2
        new_accum = math.ceil(batch * accum / new_batch)
        sft_kwargs["per_device_train_batch_size"] = new_batch
        sft_kwargs["gradient_accumulation_steps"] = new_accum
        sft_kwargs["per_device_eval_batch_size"] = min(sft_kwargs.get("per_device_eval_batch_size", new_batch),
                                                       new_batch)
        same = new_batch * new_accum == batch * accum
        what = (f"per-device batch {batch} -> {new_batch}, accumulation {accum} -> {new_accum} "
                + ("(effective batch and learning rate unchanged)" if same else
                   f"(effective batch {batch * accum} -> {new_batch * new_accum}, learning rate unchanged)"))
        event.update(per_device_train_batch_size=[batch, new_batch], gradient_accumulation_steps=[accum, new_accum])
    elif not checkpointing(sft_kwargs):
        key = "gradient_checkpointing" if "gradient_checkpointing" in sft_kwargs else "activation_checkpointing"
        sft_kwargs[key] = True
        what = "gradient checkpointing on at per-device batch 1 (each layer recomputed in backward)"
        event["gradient_checkpointing"] = [False, True]
    elif not is_eight_bit(sft_kwargs.get("optim", "")) and cuda and ckpt is None and _has_bitsandbytes():
        old = sft_kwargs.get("optim")
        sft_kwargs["optim"] = EIGHT_BIT_FALLBACK
        what = f"8-bit optimizer states ({old} -> {EIGHT_BIT_FALLBACK}) at batch 1 with checkpointing"
        event["optim"] = [old, EIGHT_BIT_FALLBACK]
    else:
        raise RunStopped(EXIT_OOM, "out of memory at per-device batch 1 with gradient checkpointing"
                         + (" and 8-bit optimizer states" if is_eight_bit(sft_kwargs.get("optim", "")) else "")
                         + ": use method.type=qlora, a shorter data.max_length, or more GPUs (--gpus N)"
                         + ("" if is_eight_bit(sft_kwargs.get("optim", "")) else
                            "; training.optim=paged_adamw_8bit on a CUDA GPU with bitsandbytes"))
    log(f"CUDA out of memory: {what}; continuing from {ckpt.name if ckpt else 'the start'}")
    return event


def _has_bitsandbytes() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def _train_with_backoff(prep: Prepared, tokenizer, callbacks: list, resume_from: str | None, state: dict[str, Any],
                        log: Callable[[str], None]) -> tuple[Any, Any, list[dict[str, Any]], float | None]:
    """Build the trainer and train, climbing the back-off ladder on out-of-memory (see :func:`_back_off`).

    Returns the trainer, its train output, the back-off events and the held-out exact match before training."""
    import torch

    sft_kwargs = dict(prep.sft_kwargs)
    oom_events: list[dict[str, Any]] = []
    before = None
    while True:
        try:
            trainer = build_trainer(prep, tokenizer, sft_kwargs, callbacks)
        except torch.OutOfMemoryError as exc:
            raise RunStopped(EXIT_OOM, f"out of memory while loading the model onto the GPU ({first_line(exc)}): "
                             "use method.type=qlora (a 4-bit base), a smaller model, or more GPUs (--gpus N)") from None
        if len(trainer.train_dataset) == 0:
            raise FinetuneHelperError("data.max_length", f"{sft_kwargs.get('max_length')} tokens leave no answer token "
                                      "in any example (TRL drops those): raise data.max_length")
        if before is None and prep.holdout and launch.is_main():
            before = _exact_match(prep, trainer.model, tokenizer)
        state["phase"] = "training"
        state["estimated_peak_memory_bytes"] = run_estimate(prep, sft_kwargs).allocated_peak
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()  # each attempt's peak is its own
        try:
            return trainer, trainer.train(resume_from_checkpoint=resume_from), oom_events, before
        except torch.OutOfMemoryError:
            if launch.world_size() > 1:  # the other processes wait in a collective: no back-off, stop them all
                raise RunStopped(EXIT_OOM, f"out of memory on rank {launch.rank()} of {launch.world_size()}: run "
                                 "again with a smaller training.per_device_train_batch_size or "
                                 "training.gradient_checkpointing=true") from None
        del trainer  # outside the except block, so the traceback no longer holds it
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        oom_events.append(_back_off(sft_kwargs, prep.run_dir, log, cuda=torch.cuda.is_available()))
        write_json(prep.run_dir / run_folder.TRAINING_ARGS, sft_kwargs)  # what runs now, and what a resume continues
        resume_from = oom_events[-1]["resumed_from"] and str(prep.run_dir / oom_events[-1]["resumed_from"])


def _training_summary(prep: Prepared, trainer, output, state: dict[str, Any]) -> dict[str, Any]:
    """Steps, losses and throughput of this session, and on CUDA the measured peak next to the estimate."""
    import torch

    metrics = output.metrics
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    runtime = metrics.get("train_runtime") or 0
    tokens = (trainer.state.num_input_tokens_seen or 0) - state.get("tokens_at_start", 0)  # this session's tokens
    summary: dict[str, Any] = {
        "run_dir": str(prep.run_dir), "global_step": trainer.state.global_step, "max_steps": trainer.state.max_steps,
        "train_loss_first": losses[0] if losses else None, "train_loss_last": losses[-1] if losses else None,
        "train_loss_mean": metrics.get("train_loss"),
        "tokens_per_second": round(tokens / runtime, 1) if runtime else None}
    summary["estimated_peak_memory_bytes"] = state.get("estimated_peak_memory_bytes")
    if torch.cuda.is_available():
        summary["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
        summary["peak_memory_reserved_bytes"] = torch.cuda.max_memory_reserved()
    return summary


def _stop_early(run_dir: Path, summary: dict[str, Any], state: dict[str, Any]) -> None:
    """A diverged or interrupted run: its summary written, then :class:`RunStopped` with the exit code."""
    ckpt = last_checkpoint(run_dir)
    if state.get("diverged"):
        d = state["diverged"]
        lr = d["learning_rate"]
        code, status = EXIT_DIVERGED, "diverged"
        message = (f"loss diverged at step {d['step']} ({d['why']}): learning rate {lr:.2g} is likely too high: try "
                   f"{lr / 10:.2g}; last good checkpoint: {ckpt if ckpt else 'none'}")
    else:
        code, status = EXIT_INTERRUPTED, "interrupted"
        message = (f"interrupted by {state['signal']} at step {summary['global_step']}; checkpoint {ckpt}; "
                   "run again with --resume to continue")
    summary.update(status=status, message=message)
    if launch.is_main():
        write_json(run_dir / run_folder.SUMMARY, summary)
    raise RunStopped(code, message)


def _finish(prep: Prepared, trainer, tokenizer, summary: dict[str, Any], before: float | None) -> None:
    """The final evaluation, ``final/`` (model or adapter, with the tokenizer) and held-out exact match."""
    if prep.eval_dataset is not None:
        last_eval = [h for h in trainer.state.log_history if "eval_loss" in h]
        if last_eval and last_eval[-1]["step"] == trainer.state.global_step:
            summary["eval_loss"] = last_eval[-1]["eval_loss"]
        else:
            summary["eval_loss"] = trainer.evaluate().get("eval_loss")
    final = prep.run_dir / run_folder.FINAL
    trainer.save_model(str(final))  # every rank (FSDP gathers the shards); the main process writes
    summary["final"] = str(final)
    if not launch.is_main():
        return
    tokenizer.save_pretrained(str(final))
    if prep.holdout and not (launch.world_size() > 1 and _shards_parameters(prep.sft_kwargs)):
        # (a sharded model generates only with every rank taking part: rank 0 alone would wait for the others)
        summary["exact_match_before"] = before
        summary["exact_match_after"] = _exact_match(prep, trainer.model, tokenizer)


def train(prep: Prepared, tokenizer, *, resume: bool = False, log: Callable[[str], None] = print,
          extra_callbacks: list | None = None, state: dict[str, Any] | None = None) -> RunResult:
    """Train with OOM back-off; ``state`` is shared with the signal handler ``run`` installs."""
    import torch

    run_dir = prep.run_dir
    state = state if state is not None else {}
    if resume and (first := starting_loss(run_dir, PATIENCE)) is not None:
        state["first_loss"] = first  # the divergence guard's reference
    if torch.cuda.is_available():
        state.update(cuda=True)
    callbacks = list(extra_callbacks or []) + runner_callbacks(run_dir, log, state)
    t0 = time.time()
    start, skipped = run_folder.resume_point(run_dir) if resume else (None, [])
    for path, why in skipped if start is not None else ():
        log(f"{path.name} is incomplete ({why}): resuming from {start.name}")
    trainer, output, oom_events, before = _train_with_backoff(prep, tokenizer, callbacks,
                                                              str(start) if start else None, state, log)
    state["phase"] = "finishing"
    summary = {**_training_summary(prep, trainer, output, state), "oom_backoffs": oom_events,
               "wall_seconds": round(time.time() - t0, 2)}
    if state.get("diverged") or state.get("signal"):
        _stop_early(run_dir, summary, state)
    _finish(prep, trainer, tokenizer, summary, before)
    summary["status"] = "done"
    summary["processes"] = launch.world_size()
    if launch.is_main():
        write_json(run_dir / run_folder.SUMMARY, summary)
    return RunResult(run_dir, EXIT_OK, summary)


def _exact_match(prep: Prepared, model, tokenizer) -> float | None:
    from .tiny import exact_match

    if model is None:
        return None
    was_training = model.training
    acc = exact_match(model, tokenizer, prep.holdout)
    model.train(was_training)
    return acc


def format_summary(summary: dict[str, Any]) -> str:
    def f(v, fmt="{:.4f}"):
        return "-" if v is None else fmt.format(v)

    lines = [f"run: {summary.get('status', '?')} at step {summary.get('global_step')}/{summary.get('max_steps')} "
             f"in {summary.get('wall_seconds')} s -> {summary.get('run_dir')}",
             f"train loss: first {f(summary.get('train_loss_first'))}, last {f(summary.get('train_loss_last'))}; "
             f"eval loss: {f(summary.get('eval_loss'))}; tokens/s: {f(summary.get('tokens_per_second'), '{:,.0f}')}"]
    if "exact_match_after" in summary:
        lines.append(f"exact match on held-out problems: before {f(summary.get('exact_match_before'), '{:.1%}')}, "
                     f"after {f(summary.get('exact_match_after'), '{:.1%}')}")
    if "peak_memory_bytes" in summary:
        lines.append(f"peak GPU memory (torch.cuda.max_memory_allocated): {fmt_gib(summary['peak_memory_bytes'])}; "
                     f"estimated {fmt_gib(summary['estimated_peak_memory_bytes'])}")
    for event in summary.get("oom_backoffs", []):  # each rung records what it changed: batch, checkpointing, optim
        changes = ", ".join(f"{k} {v[0]} -> {v[1]}" for k, v in event.items() if k != "resumed_from")
        lines.append(f"out-of-memory back-off: {changes}, resumed from {event['resumed_from']}")
    if summary.get("final"):
        lines.append(f"saved: {summary['final']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- entry point
def run(recipe_path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, output_dir: str | None = None,
        dry_run: bool = False, resume: bool = False, log: Callable[[str], None] = print,
        extra_callbacks: list | None = None, state: dict[str, Any] | None = None) -> RunResult:
    """Run ``recipe_path`` into its run folder.  ``state`` (optional, shared with the caller) says how far the run
    came: ``state["folder_ok"]`` once the run folder's checks passed, ``state["wrote_files"]`` once it wrote its
    run files (a refused run writes nothing)."""
    state = state if state is not None else {}
    recipe = _absolute_paths(load_recipe(recipe_path, overrides))
    run_dir = default_run_dir(recipe, recipe_path, output_dir)
    main = launch.is_main()
    if not main:  # one of several processes: rank 0 checks, writes and prints
        log = _silent
    else:
        check_run_folder(run_dir, dry_run=dry_run, resume=resume)
    state["folder_ok"] = True  # nothing in the folder stands in the way (its exit code may be recorded)
    if resume:
        start, skipped = run_folder.resume_point(run_dir)
        if start is None:
            raise FinetuneHelperError("resume", f"no complete checkpoint in {run_dir} to resume from" + (
                f" ({skipped[-1][0].name}: {skipped[-1][1]})" if skipped else ""))
        longer = _check_resume_matches(recipe, run_dir)
        if run_folder.finished(run_dir) and not longer:
            message = (f"{run_dir} finished already (summary.json); nothing to resume and nothing was changed. To "
                       f"train longer, raise its length: {' or '.join(sorted(_RESUMABLE_CHANGES))}")
            log(message)
            return RunResult(run_dir, EXIT_OK, {"status": "finished", "message": message})
    state["phase"] = "preparing"

    def on_signal(signum, frame):  # noqa: ARG001
        name = signal.Signals(signum).name
        if state["phase"] == "preparing":
            raise RunStopped(EXIT_INTERRUPTED, f"interrupted by {name} before training started; nothing to resume")
        if state["phase"] == "finishing":
            log(f"{name}: finishing the final save first")
            return
        state["signal"] = name
        log(f"{name}: saving a checkpoint at the end of this step, then stopping")

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _run(recipe, run_dir, dry_run=dry_run, resume=resume, log=log, extra_callbacks=extra_callbacks,
                    state=state)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _absolute_paths(recipe: Recipe) -> Recipe:
    """The recipe with a local data file and model folder as absolute paths, so that the run folder's recipe.yaml
    resumes from any working directory (``finetune-helper resume RUN_DIR``)."""
    data, model = Path(recipe.data.path).expanduser(), Path(recipe.model.name).expanduser()
    if not recipe.data.path.startswith("builtin:") and data.exists():
        recipe.data.path = str(data.resolve())
    if not recipe.model.name.startswith("builtin:") and model.is_dir():
        recipe.model.name = str(model.resolve())
    return recipe


def _silent(line: str) -> None:  # noqa: ARG001 - the log of a process other than rank 0
    return None


def default_run_dir(recipe: Recipe, recipe_path: str | Path, output_dir: str | None) -> Path:
    """``--output-dir``, else the recipe's ``output_dir``, else ``runs/<recipe file stem>``."""
    return Path(output_dir or recipe.output_dir or Path("runs") / Path(recipe_path).stem)


def check_run_folder(run_dir: Path, *, dry_run: bool, resume: bool) -> None:
    """Refuse, before anything is written, what would write over a run or a user's file."""
    if run_dir.exists() and not run_dir.is_dir():
        raise FinetuneHelperError("output-dir", f"{run_dir} is a file, not a folder")
    _check_writable(run_dir)
    own = run_dir / run_folder.RECIPE
    if own.exists() and not run_folder.is_own_recipe(own):
        raise FinetuneHelperError("output-dir", f"{own} is not a recipe.yaml a run wrote (your own recipe?); a run "
                                  "writes its resolved recipe there: choose another --output-dir (nothing was written)")
    traces = run_folder.run_traces(run_dir)
    if dry_run and traces:
        raise FinetuneHelperError("output-dir", f"{run_dir} holds a run ({', '.join(traces)}); a dry run would rewrite "
                                  "its recipe.yaml, plan.json and training_args.json: give the dry run another "
                                  "--output-dir (nothing was written)")
    if not resume and not dry_run and traces:
        raise FinetuneHelperError("output-dir", f"{run_dir} already holds a run ({', '.join(traces)}); pass --resume "
                                  "(or finetune-helper resume) to continue it, or --output-dir for a new one "
                                  "(nothing was overwritten)")


def _check_writable(run_dir: Path) -> None:
    """The run folder can be created and written (before minutes of loading), or a one-line error; nothing is
    created here (a refused run leaves no folder behind)."""
    probe = run_dir.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise FinetuneHelperError("output-dir", f"cannot write in {run_dir}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise FinetuneHelperError("output-dir", f"cannot write in {run_dir}: {probe} is not writable")


#: recipe settings a resumed run may change: only how long it trains
_RESUMABLE_CHANGES = {"recommend.epochs", "training.max_steps", "training.num_train_epochs"}


def _check_resume_matches(recipe: Recipe, run_dir: Path) -> bool:
    """``--resume`` continues the same run: its saved recipe.yaml must agree but for the training length.  Returns
    whether the training length changed."""
    import yaml

    saved_file = run_dir / run_folder.RECIPE
    if not saved_file.is_file():
        return False
    saved = yaml.safe_load(saved_file.read_text(encoding="utf-8")) or {}
    now = recipe.to_dict()

    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in d.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict) and key != "columns":
                out.update(flat(value, name + "."))
            else:
                out[name] = value
        return out

    a, b = flat(saved), flat(now)
    longer = False
    for key in sorted(set(a) | set(b)):
        if key == "output_dir":
            continue
        if key in _RESUMABLE_CHANGES:
            longer = longer or a.get(key) != b.get(key)
            continue
        if a.get(key) != b.get(key):
            raise FinetuneHelperError(key, f"differs from the run being resumed ({a.get(key)!r} in {saved_file}, "
                                      f"{b.get(key)!r} now); --resume continues the same run (only the training "
                                      "length may change): use a new --output-dir for a different recipe")
    return longer


def _run(recipe: Recipe, run_dir: Path, *, dry_run: bool, resume: bool, log: Callable[[str], None],
         extra_callbacks: list | None, state: dict[str, Any]) -> RunResult:
    prep, tokenizer = prepare(recipe, run_dir, log, dry_run=dry_run, resume=resume)
    plan = prep.plan
    if prep.resumed:
        a = prep.sft_kwargs
        log(f"resuming with the run's own training_args.json: per-device batch {a['per_device_train_batch_size']} x "
            f"accumulation {a['gradient_accumulation_steps']}, lr {a['learning_rate']:.2e}")
    else:
        log(f"plan: per-device batch {plan.per_device_train_batch_size} x accumulation "
            f"{plan.gradient_accumulation_steps} x {plan.request.gpus} GPU = {plan.effective_batch_size}, lr "
            f"{plan.learning_rate:.2e}, warmup {plan.warmup_ratio:.1%}, {plan.optim}, checkpointing "
            f"{'on' if plan.gradient_checkpointing else 'off'} ({'fits' if plan.fits else 'DOES NOT FIT'}: "
            f"{plan.reasons['fits']})")
    for key, value in prep.overrides.items():
        log(f"override from the recipe's training section: {key}={value!r} (wins over the recommendation)")
    estimate = run_estimate(prep)
    log(f"estimate of the step training_args.json runs ({run_setup(prep, prep.sft_kwargs).device}): "
        f"{fmt_gib(estimate.allocated_peak)} peak tensor memory, at the {estimate.peak_phase}")
    for note in prep.adaptations:
        log(f"adapted: {note}")
    if launch.is_main():
        write_run_files(prep)
        state["wrote_files"] = True
    log(f"wrote {run_dir}/recipe.yaml, training_args.json" + (" (plan.json: the run's own, kept)" if prep.resumed
                                                                 else ", plan.json"))
    if dry_run:
        return RunResult(run_dir, EXIT_OK, {"status": "dry-run", "run_dir": str(run_dir)})
    return train(prep, tokenizer, resume=resume, log=log, extra_callbacks=extra_callbacks, state=state)


__all__ = ["run", "prepare", "train", "RunResult", "RunStopped", "format_summary"]
