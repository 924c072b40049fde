"""Prepare a run: resolve the model, load the tokenizer and the data, plan for the GPU that is here, and build the
run's ``SFTConfig`` arguments -- everything decided before any weights load (what ``--dry-run`` writes: the run
folder's ``recipe.yaml``, ``plan.json`` and ``training_args.json``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import FinetuneHelperError, first_line
from ..export.versions import check_stack, installed_stack
from . import run_folder
from .arguments import sft_kwargs_for
from .preflight import check_targets, saved_arguments
from .recipe import BUILTIN_DATA, BUILTIN_MODEL, Recipe, resolve_recipe_gpu, resolve_recipe_model
from .run_folder import write_json
from .setup import local_device, run_estimate, run_setup

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


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
    """What the recipe asks the planner (the training examples counted from the data unless the recipe says).
    ``hardware.strategy: auto`` may take DeepSpeed ZeRO only where it runs: DeepSpeed installed, CUDA GPUs."""
    import importlib.util

    from ..recommender.calibration import lookup
    from ..recommender.plan import PlanRequest
    from .setup import local_device

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
        strategy=recipe.hardware.strategy, offload=recipe.hardware.offload, trainer=recipe.trainer,
        deepspeed=recipe.hardware.gpus > 1 and importlib.util.find_spec("deepspeed") is not None
        and local_device() == "cuda",
    )


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

    device = local_device()
    if device == "cpu":
        # DeepSpeed (imported by the Trainer's stack when installed) prints a warning to stdout when it finds no
        # accelerator and settles on the CPU; naming the CPU, which is what it would choose, keeps the log clean
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    rows = _train_rows(recipe, spec, train, tokenizer, log)
    try:
        plan = recommend_plan(_plan_request(recipe, spec, gpu, rows))
    except FinetuneHelperError as exc:  # the planner names its command-line flags; a recipe names its fields
        raise FinetuneHelperError(_RECIPE_FIELD.get(exc.field, exc.field), exc.message) from None
    overrides = dict(recipe.training)
    sft_kwargs, adaptations = sft_kwargs_for(recipe, plan, run_dir, device, dry_run=dry_run or check_only,
                                          has_eval=evaluation is not None, trl_kwargs=trl_kwargs)
    resumed = resume
    if resumed:
        saved = saved_arguments(run_dir)
        from_recipe = {k: sft_kwargs[k] for k in _FROM_RECIPE if k in sft_kwargs}
        sft_kwargs = {**saved, **from_recipe}
    prepared = Prepared(recipe=recipe, run_dir=run_dir, model_path=model_path, plan=plan, sft_kwargs=sft_kwargs,
                        overrides=overrides, adaptations=adaptations, train_dataset=train, eval_dataset=evaluation,
                        data_format=fmt, data_note=note, holdout=holdout, resumed=resumed, hardware=hardware)
    return prepared, tokenizer


def _train_rows(recipe: Recipe, spec, train, tokenizer, log: Callable[[str], None]) -> int | None:
    """The training sequences the plan counts steps, warmup and the small-data batch over: the examples, or with
    ``data.packing`` the rows TRL packs them into before training (counted from the data tokenized as TRL will);
    ``recommend.dataset_size`` wins over both."""
    if train is None:
        return None
    if not recipe.data.packing or tokenizer is None or recipe.recommend.dataset_size:
        return len(train)
    from . import data as dataio

    length = recipe.data.max_length or spec.sequence_length(None)
    strategy = str(recipe.training.get("packing_strategy", "bfd"))
    rows = dataio.packed_rows(dataio.token_lengths(train, tokenizer), length, strategy)
    log(f"data: packing: {len(train)} examples pack into {rows} rows of {length} tokens (TRL's {strategy} packing, "
        "before training): the plan counts the rows")
    return rows


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


def write_run_files(prep: Prepared) -> None:
    """recipe.yaml, plan.json, training_args.json and what the run starts with (inputs.json); a resumed run keeps
    the plan.json and the inputs it started with."""
    prep.run_dir.mkdir(parents=True, exist_ok=True)
    (prep.run_dir / run_folder.RECIPE).write_text(run_folder.RECIPE_HEADER + "\n" + prep.recipe.to_yaml())
    if not (prep.resumed and (prep.run_dir / run_folder.INPUTS).is_file()):
        run_folder.write_inputs(prep.run_dir, prep.recipe.to_dict())
    run_folder.write_training_args(prep.run_dir, prep.sft_kwargs)
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
    if prep.recipe.data.packing:
        plan["train_rows"] = prep.plan.request.dataset_size  # packed rows (or recommend.dataset_size)
    plan["eval_examples"] = len(prep.eval_dataset) if prep.eval_dataset is not None else 0
    write_json(prep.run_dir / run_folder.PLAN, plan)
