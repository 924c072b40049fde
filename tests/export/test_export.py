"""Exports of a plan as TrainingArguments: every text format parses back, with the real transformers, to the same
object as ``to_training_arguments``; version names; overrides; the text exports import neither torch nor
transformers."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from transformers import HfArgumentParser, TrainingArguments
from transformers.utils import is_torch_bf16_gpu_available

import finetune_helper as fh
from finetune_helper.export import formats, training_args, versions
from finetune_helper.export.training_args import arguments_class
from finetune_helper.errors import FinetuneHelperError

#: integration tier (make test-integration): real torch / transformers / trainer / server work
pytestmark = pytest.mark.integration

MODEL = "Qwen/Qwen2.5-0.5B"
OUT = "outputs/qwen"
ROOT = Path(__file__).resolve().parents[2]
#: transformers refuses bf16=True on a machine without a bf16 GPU unless use_cpu=True. The plans are for GPUs, so on a
#: CPU-only machine the tests add that one argument to both sides of every comparison; on a GPU they add nothing.
MACHINE = {} if is_torch_bf16_gpu_available() else {"use_cpu": True}
FLOAT_FIELDS = ("learning_rate", "warmup_steps", "weight_decay", "max_grad_norm", "num_train_epochs")


@pytest.fixture(scope="module")
def plans() -> dict:
    return {
        "full": fh.recommend(MODEL, gpu="24GB", method="full", dataset_size=5000),
        "lora": fh.recommend(MODEL, gpu="24GB", method="lora", dataset_size=5000, gradient_checkpointing=True),
        "sgd": fh.recommend(MODEL, gpu="24GB", method="full", dataset_size=5000, optim="sgd"),
        "fp16": fh.recommend(MODEL, gpu="T4", method="lora", dataset_size=20_000),
        # schedules with lr_scheduler_kwargs (a dict field: every format must carry it back)
        "wsd": fh.recommend(MODEL, gpu="24GB", method="lora", dataset_size=5000, scheduler="warmup_stable_decay"),
        "min_lr": fh.recommend(MODEL, gpu="24GB", method="full", dataset_size=5000, scheduler="cosine_with_min_lr"),
        # the plain transformers.Trainer target: TrainingArguments, no SFTConfig fields
        "hf": fh.recommend(MODEL, gpu="24GB", method="lora", dataset_size=5000, trainer="transformers"),
        "hf_full": fh.recommend(MODEL, gpu="24GB", method="full", dataset_size=5000, trainer="transformers"),
    }


PLAN_NAMES = ("full", "lora", "sgd", "fp16", "wsd", "min_lr", "hf", "hf_full")


def build(plan, **overrides) -> TrainingArguments:
    return training_args.to_training_arguments(plan, OUT, **MACHINE, **overrides)


def assert_same_args(got: TrainingArguments, want: TrainingArguments) -> None:
    """Every dataclass field equal, one by one, and of the same type (the class too: SFTConfig or
    TrainingArguments)."""
    assert type(got) is type(want)
    diffs = {f.name: (getattr(got, f.name), getattr(want, f.name)) for f in dataclasses.fields(type(want))
             if getattr(got, f.name) != getattr(want, f.name)
             or type(getattr(got, f.name)) is not type(getattr(want, f.name))}
    assert not diffs, diffs
    for name in FLOAT_FIELDS:
        assert isinstance(getattr(got, name), float), name


# --------------------------------------------------------------------------------------------- real object
@pytest.mark.parametrize("name", PLAN_NAMES)
def test_to_training_arguments_carries_the_plan(plans, name):
    plan = plans[name]
    args = build(plan)
    assert isinstance(args, TrainingArguments)
    assert args.output_dir == OUT
    assert args.per_device_train_batch_size == plan.per_device_train_batch_size
    assert args.gradient_accumulation_steps == plan.gradient_accumulation_steps
    assert args.learning_rate == plan.learning_rate
    assert args.weight_decay == plan.weight_decay
    assert args.max_grad_norm == plan.max_grad_norm
    assert args.lr_scheduler_type.value == plan.lr_scheduler_type
    assert args.optim.value == plan.optim
    assert (args.bf16, args.fp16) == (plan.bf16, plan.fp16)
    assert args.num_train_epochs == plan.request.epochs
    assert args.report_to in ([], "none", ["none"])  # transformers 5 turns "none" into []
    assert args.seed == 42
    assert args.save_strategy.value == "steps"
    assert args.logging_steps == training_args.logging_steps_for(plan.total_steps)
    assert args.save_steps == training_args.save_steps_for(plan.total_steps)
    if versions.target_major() >= 5:
        assert isinstance(args.warmup_steps, float) and 0 <= args.warmup_steps < 1
        assert args.warmup_steps == plan.warmup_ratio
        assert args.get_warmup_steps(plan.total_steps) == plan.warmup_steps
        assert args.activation_checkpointing is plan.gradient_checkpointing
    else:  # pragma: no cover - transformers 4.x
        assert args.warmup_ratio == plan.warmup_ratio
    assert args.gradient_checkpointing is plan.gradient_checkpointing


def test_plans_cover_both_precisions_checkpointing_and_sgd(plans):
    assert plans["full"].bf16 and plans["fp16"].fp16 and not plans["fp16"].bf16
    assert plans["lora"].gradient_checkpointing is True
    assert plans["sgd"].optim == "sgd"


def test_plan_method_delegates(plans):
    assert_same_args(fh.to_training_arguments(plans["lora"], OUT, **MACHINE), build(plans["lora"]))


def test_fp16_plan_builds_without_use_cpu(plans):
    args = training_args.to_training_arguments(plans["fp16"], OUT)
    assert args.fp16 is True and args.bf16 is False and args.use_cpu is False


@pytest.mark.skipif(bool(not MACHINE), reason="this machine has a bf16 GPU")
def test_bf16_plan_on_cpu_explains_use_cpu(plans):
    with pytest.raises(FinetuneHelperError, match="use_cpu=True") as err:
        training_args.to_training_arguments(plans["full"], OUT)
    assert err.value.field == "training-arguments"


# --------------------------------------------------------------------------------------------- text formats
@pytest.mark.parametrize("name", PLAN_NAMES)
def test_json_round_trip(plans, name, tmp_path):
    plan = plans[name]
    text = formats.render(plan, "json", OUT)
    data = json.loads(text)
    assert "hub_token" not in data
    path = tmp_path / "args.json"
    path.write_text(json.dumps({**data, **MACHINE}))
    (parsed,) = HfArgumentParser(arguments_class(plan)).parse_json_file(str(path))
    assert_same_args(parsed, build(plan))


@pytest.mark.parametrize("name", PLAN_NAMES)
def test_yaml_round_trip_keeps_floats(plans, name, tmp_path):
    plan = plans[name]
    text = formats.render(plan, "yaml", OUT)
    data = yaml.safe_load(text)
    for key in FLOAT_FIELDS:
        assert isinstance(data[key], float), (key, data[key])
    assert data == training_args.training_kwargs(plan, OUT)
    path = tmp_path / "args.yaml"
    path.write_text(text + "".join(f"{k}: {str(v).lower()}\n" for k, v in MACHINE.items()))
    (parsed,) = HfArgumentParser(arguments_class(plan)).parse_yaml_file(str(path))
    assert_same_args(parsed, build(plan))


def test_yaml_comments_carry_reasons(plans):
    plan = plans["full"]
    text = formats.to_yaml(plan, OUT)
    lr_line = next(line for line in text.splitlines() if line.startswith("learning_rate:"))
    assert lr_line.split("  # ", 1)[1] == " ".join(plan.reasons["learning_rate"].split())
    assert text.startswith("# SFTConfig for " + MODEL)
    assert formats.to_yaml(plans["hf"], OUT).startswith("# TrainingArguments for " + MODEL)


@pytest.mark.parametrize("value", [3e-4, 2e-5, 1e-5, 2.1213203435596425e-05, 1e17, 1e16, 0.0, 1.0, 0.03, 5e-324, 1e-300])
def test_yaml_float_format(value):
    text = formats._yaml_float(value)
    assert "." in text
    if "e" in text:
        assert text.split("e")[1][0] in "+-"
    loaded = yaml.safe_load(f"x: {text}")["x"]
    assert isinstance(loaded, float) and loaded == value


@pytest.mark.parametrize("name", ["full", "hf_full"])
def test_python_snippet_runs_and_builds_the_same_args(plans, tmp_path, monkeypatch, capsys, name):
    """The snippet, run as a script (``runpy``: as ``__main__``, in a namespace of its own, from its folder; in this
    process, which has imported transformers and TRL already: a fresh interpreter spent ~8 s on that), prints the
    arguments the plan builds."""
    import runpy

    plan = plans[name]
    text = formats.render(plan, "python", OUT)
    compile(text, "args.py", "exec")
    script = text
    if MACHINE:  # the one machine-specific argument (see MACHINE), added as the first keyword
        opening = f"args = {training_args.config_class(plan)}(\n"
        script = text.replace(opening, opening + "".join(f"    {k}={v!r},\n" for k, v in MACHINE.items()))
        assert script != text
    path = tmp_path / "args.py"
    path.write_text(script)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    runpy.run_path(str(path), run_name="__main__")
    assert json.loads(capsys.readouterr().out) == json.loads(build(plan).to_json_string())


@pytest.mark.parametrize("name, imports", [("lora", "from trl import SFTConfig"),
                                           ("hf", "from transformers import TrainingArguments")])
def test_python_snippet_comments_carry_reasons(plans, name, imports):
    plan = plans[name]
    lines = formats.to_python(plan, OUT).splitlines()
    assert imports in lines
    assert lines[-1] == "    print(args.to_json_string())"
    ckpt = "activation_checkpointing" if versions.target_major() >= 5 else "gradient_checkpointing"
    for key, reason in (("learning_rate", "learning_rate"), ("per_device_train_batch_size", "per_device_train_batch_size"),
                        ("gradient_accumulation_steps", "gradient_accumulation_steps"), ("optim", "optim"),
                        ("bf16", "precision"), (ckpt, "gradient_checkpointing"), ("weight_decay", "weight_decay"),
                        ("lr_scheduler_type", "lr_scheduler_type"), ("max_grad_norm", "max_grad_norm")):
        line = next(line for line in lines if line.startswith(f"    {key}="))
        assert line.endswith("  # " + " ".join(plan.reasons[reason].split())), line
    warm = "warmup_steps" if versions.target_major() >= 5 else "warmup_ratio"
    assert any(line.startswith(f"    {warm}={plan.warmup_ratio!r},") for line in lines)


@pytest.mark.parametrize("name", PLAN_NAMES)
def test_cli_round_trip(plans, name):
    plan = plans[name]
    text = formats.render(plan, "cli", OUT)
    assert "\n" not in text.strip()
    assert f"--bf16 {plan.bf16}" in text
    argv = shlex.split(text) + [a for k, v in MACHINE.items() for a in (f"--{k}", str(v))]
    (parsed,) = HfArgumentParser(arguments_class(plan)).parse_args_into_dataclasses(args=argv)
    assert_same_args(parsed, build(plan))


def test_cli_quotes_awkward_output_dirs(plans):
    out = "runs/my run's dir"
    argv = shlex.split(formats.to_cli(plans["lora"], out))
    assert argv[argv.index("--output_dir") + 1] == out


# --------------------------------------------------------------------------------------------- versions
def test_version_4_names(plans):
    plan = plans["lora"]
    kw = training_args.training_kwargs(plan, "out", version="4")
    assert kw["warmup_ratio"] == plan.warmup_ratio
    assert kw["gradient_checkpointing"] is True
    assert "warmup_steps" not in kw and "activation_checkpointing" not in kw
    assert training_args.training_kwargs(plan, "out", version="4.46.3") == kw
    assert "warmup_ratio: " in formats.to_yaml(plan, "out", version="4.46")
    assert "gradient_checkpointing=True" in formats.to_python(plan, "out", version="4")


@pytest.mark.parametrize("name", PLAN_NAMES)
def test_version_5_names(plans, name):
    plan = plans[name]
    kw = training_args.training_kwargs(plan, "out", version="5")
    assert isinstance(kw["warmup_steps"], float) and 0 <= kw["warmup_steps"] < 1
    assert kw["warmup_steps"] == plan.warmup_ratio
    assert kw["activation_checkpointing"] is plan.gradient_checkpointing
    assert "warmup_ratio" not in kw and "gradient_checkpointing" not in kw
    assert kw["output_dir"] == "out" and kw["report_to"] == "none" and kw["seed"] == 42
    assert kw["save_strategy"] == "steps"
    assert 1 <= kw["logging_steps"] <= 10 and kw["save_steps"] >= kw["logging_steps"]


def test_target_major():
    installed = importlib.metadata.version("transformers")
    assert versions.target_major() == int(installed.split(".")[0])
    import transformers

    assert versions.target_major() == int(transformers.__version__.split(".")[0])
    assert versions.target_major("4") == 4
    assert versions.target_major("4.46") == 4
    assert versions.target_major("5.23.0") == 5
    assert versions.target_major("v5") == 5
    for bad in ("abc", "3.1", ""):
        if bad == "":
            assert versions.target_major(bad) == int(installed.split(".")[0])  # empty means "installed"
            continue
        with pytest.raises(FinetuneHelperError) as err:
            versions.target_major(bad)
        assert err.value.field == "transformers-version"


def test_introspection_and_metadata_paths_agree(plans):
    fields = frozenset(f.name for f in dataclasses.fields(TrainingArguments) if f.init)
    assert versions.installed_field_names() == fields  # the ast reading of the source, no import
    assert versions.names_for(None) == versions.introspected_names()
    plan = plans["lora"]
    major = str(versions.target_major())
    assert training_args.training_kwargs(plan, OUT) == training_args.training_kwargs(plan, OUT, version=major)
    assert set(training_args.training_kwargs(plans["hf"], OUT)) <= fields
    assert set(training_args.training_kwargs(plan, OUT)) <= fields | versions.installed_sft_field_names()
    # what the text exports write is what to_training_arguments passes
    args = build(plan)
    for key, value in training_args.training_kwargs(plan, OUT).items():
        got = getattr(args, key)
        assert got == value or getattr(got, "value", None) == value or (key == "report_to" and got in ([], ["none"])), key


def test_logging_and_save_steps():
    assert [training_args.logging_steps_for(n) for n in (1, 49, 50, 100, 499, 500, 10_000)] == [1, 1, 1, 2, 9, 10, 10]
    assert training_args.save_steps_for(10) == 2
    assert training_args.save_steps_for(237) == 48
    assert training_args.save_steps_for(100_000) == 500
    assert all(training_args.save_steps_for(n) >= training_args.logging_steps_for(n) for n in range(1, 3000))


# --------------------------------------------------------------------------------------------- overrides, errors
def test_overrides_win(plans):
    plan = plans["full"]
    args = build(plan, learning_rate=1e-4, per_device_train_batch_size=3, logging_steps=1, seed=7, report_to="none")
    assert (args.learning_rate, args.per_device_train_batch_size, args.logging_steps, args.seed) == (1e-4, 3, 1, 7)
    kw = training_args.training_kwargs(plan, OUT, version="5", learning_rate=1e-4, save_total_limit=2)
    assert kw["learning_rate"] == 1e-4 and kw["save_total_limit"] == 2


def test_overrides_of_renamed_settings_use_the_target_name(plans):
    plan = plans["full"]
    v5 = training_args.training_kwargs(plan, OUT, version="5", warmup_ratio=0.2, gradient_checkpointing=True)
    assert v5["warmup_steps"] == 0.2 and v5["activation_checkpointing"] is True
    assert "warmup_ratio" not in v5 and "gradient_checkpointing" not in v5
    v4 = training_args.training_kwargs(plan, OUT, version="4", warmup_steps=0.2, activation_checkpointing=True)
    assert v4["warmup_ratio"] == 0.2 and v4["gradient_checkpointing"] is True
    steps = training_args.training_kwargs(plan, OUT, version="5", warmup_steps=100)
    assert steps["warmup_steps"] == 100 and "warmup_ratio" not in steps
    args = build(plan, warmup_ratio=0.2, gradient_checkpointing=True)
    assert args.get_warmup_steps(1000) == 200 and args.gradient_checkpointing is True
    with pytest.raises(FinetuneHelperError, match="not both"):
        training_args.training_kwargs(plan, OUT, warmup_ratio=0.1, warmup_steps=0.1)
    with pytest.raises(FinetuneHelperError) as err:
        training_args.training_kwargs(plan, OUT, version="5", warmup_ratio=1.5)
    assert err.value.field == "warmup_ratio"


def test_unknown_override_names_the_key(plans):
    plan = plans["full"]
    with pytest.raises(FinetuneHelperError) as err:
        training_args.to_training_arguments(plan, OUT, learning_rat=1e-4)
    assert err.value.field == "learning_rat"
    assert "learning_rat" in str(err.value) and "did you mean learning_rate" in str(err.value)
    with pytest.raises(FinetuneHelperError) as err:
        training_args.training_kwargs(plan, OUT, warmup_ratoi=0.1)  # checked without import too
    assert err.value.field == "warmup_ratoi" and "warmup_ratio" in str(err.value)
    with pytest.raises(FinetuneHelperError, match="zzzz"):
        fh.to_training_arguments(plan, OUT, zzzz=1)


def test_bad_format(plans):
    with pytest.raises(FinetuneHelperError) as err:
        formats.render(plans["full"], "toml", OUT)
    assert err.value.field == "format" and "json, yaml, python, cli" in str(err.value)


def test_render_dispatches(plans):
    plan = plans["sgd"]
    assert formats.render(plan, "json", OUT) == formats.to_json(plan, OUT)
    assert formats.render(plan, "yaml", OUT, version="4") == formats.to_yaml(plan, OUT, version="4")
    assert formats.render(plan, "python", OUT) == formats.to_python(plan, OUT)
    assert formats.render(plan, "cli", OUT) == formats.to_cli(plan, OUT)
    assert json.loads(formats.to_json(plan, OUT))["optim"] == "sgd"


# --------------------------------------------------------------------------------------------- no heavy imports
def test_text_exports_import_neither_torch_nor_transformers():
    code = textwrap.dedent(f"""
        import sys
        from finetune_helper.export import formats, training_args, versions
        import finetune_helper as fh
        plan = fh.recommend({MODEL!r}, gpu="24GB", method="lora", dataset_size=5000)
        for fmt in formats.FORMATS:
            for version in (None, "4", "5"):
                assert formats.render(plan, fmt, "out", version=version)
        training_args.training_kwargs(plan, "out", learning_rate=1e-4)
        assert versions.installed_field_names()
        print(sorted(m for m in ("torch", "transformers") if m in sys.modules))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_no_module_level_heavy_import():
    for module in (formats, training_args, versions):
        source = Path(module.__file__).read_text()
        top_level = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
        assert not any("transformers" in line or "torch" in line for line in top_level), module.__name__


# --------------------------------------------------------------------------------------------- every strategy
#: (gpus, strategy, offload) of every way the plans run: one process, DDP, FSDP, DeepSpeed ZeRO-2 / ZeRO-3 with and
#: without offload
STRATEGIES = [(1, "auto", "none"), (2, "ddp", "none"), (2, "fsdp", "none"), (2, "zero2", "none"),
              (2, "zero2", "optimizer"), (2, "zero3", "none"), (2, "zero3", "optimizer"), (2, "zero3", "all")]


def parse_back(plan, fmt: str, tmp_path: Path):
    """The arguments ``fmt`` exports, read back as a user's script reads them (plus this machine's ``use_cpu``)."""
    cls = arguments_class(plan)
    text = formats.render(plan, fmt, OUT)
    if fmt == "cli":
        argv = shlex.split(text) + [a for k, v in MACHINE.items() for a in (f"--{k}", str(v))]
        return HfArgumentParser(cls).parse_args_into_dataclasses(args=argv)[0]
    if fmt == "python":
        opening = f"args = {training_args.config_class(plan)}(\n"
        namespace: dict = {}
        exec(text.replace(opening, opening + "".join(f"    {k}={v!r},\n" for k, v in MACHINE.items())), namespace)
        return namespace["args"]
    path = tmp_path / f"args.{fmt}"
    data = json.loads(text) if fmt == "json" else yaml.safe_load(text)
    path.write_text(json.dumps({**data, **MACHINE}) if fmt == "json" else yaml.safe_dump({**data, **MACHINE}))
    parser = HfArgumentParser(cls)
    return (parser.parse_json_file if fmt == "json" else parser.parse_yaml_file)(str(path))[0]


@pytest.mark.parametrize("fmt", ["json", "yaml", "python", "cli"])
@pytest.mark.parametrize("gpus, strategy, offload", STRATEGIES)
def test_every_format_of_every_strategy_parses_back(tmp_path, fmt, gpus, strategy, offload):
    """On the installed transformers, every format of every strategy reads back to the arguments the plan builds
    (an FSDP plan's CLI flags included: ``--fsdp True`` would be the option string "True", refused)."""
    if strategy.startswith("zero"):
        pytest.importorskip("deepspeed")
    plan = fh.recommend("meta-llama/Llama-3.1-8B", gpu="H100", gpus=gpus, method="full", strategy=strategy,
                        offload=offload)
    assert plan.distributed == {"auto": "single GPU"}.get(strategy, strategy)
    parsed = parse_back(plan, fmt, tmp_path)
    assert_same_args(parsed, build(plan))
    if strategy == "fsdp":
        assert parsed.fsdp_plugin_args["state_dict_type"] == "SHARDED_STATE_DICT"
        assert parsed.fsdp_config["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]
    if strategy.startswith("zero"):
        assert parsed.deepspeed["zero_optimization"]["stage"] == int(strategy[-1])
