"""Every shipped recipe loads and validates; real-world ones plan by --dry-run from catalog configs (no weights);
bad recipes get one-line errors naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune_helper import cli
from finetune_helper.errors import FinetuneHelperError
from finetune_helper.train.recipe import load_recipe

#: integration tier (make test-integration): real torch / transformers / trainer / server work
pytestmark = pytest.mark.integration

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))
REAL_WORLD = [p for p in RECIPES if p.stem != "tiny-demo"]


def test_recipes_are_shipped():
    names = {p.stem for p in RECIPES}
    assert "tiny-demo" in names and len(REAL_WORLD) >= 6


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_validates_with_a_run_header(path, capsys):
    from finetune_helper.train.setup import local_device

    recipe = load_recipe(path)
    assert recipe.model.name and recipe.data.path
    header = path.read_text().splitlines()[0:12]
    assert any("finetune-helper run recipes/" + path.name in line for line in header), "header says how to run it"
    if recipe.hardware.strategy in ("zero2", "zero3") and local_device() == "cpu":
        with pytest.raises(SystemExit) as exit_info:  # run refuses DeepSpeed without CUDA; validate says so, last
            cli.main(["validate", str(path)])
        assert exit_info.value.code == 2
        assert f"hardware.strategy: {recipe.hardware.strategy}: DeepSpeed runs on CUDA GPUs" in capsys.readouterr().err
    else:
        assert cli.main(["validate", str(path)]) == 0


@pytest.fixture(scope="module")
def local_data(tmp_path_factory) -> Path:
    from finetune_helper.train.tiny import synthetic_dataset, write_dataset

    path = tmp_path_factory.mktemp("data") / "alpaca.jsonl"
    write_dataset(path, synthetic_dataset(400, fmt="alpaca"))
    return path


@pytest.mark.parametrize("path", REAL_WORLD, ids=lambda p: p.stem)
def test_real_world_recipes_dry_run_from_catalog_configs(path, local_data, tmp_path):
    from finetune_helper.train.runner import run

    out = tmp_path / "run"
    # a local file has one split and no configurations: the Hub dataset's are replaced with it
    result = run(path, [f"data.path={local_data}", "data.split=train", "data.config="], output_dir=str(out),
                 dry_run=True, log=lambda _: None)
    assert result.exit_code == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["fits"], (path.stem, plan["reasons"]["fits"])
    assert plan["train_examples"] > 0 and plan["reasons"]["learning_rate"]
    args = json.loads((out / "training_args.json").read_text())
    assert args["per_device_train_batch_size"] == plan["per_device_train_batch_size"]
    from transformers import HfArgumentParser
    from trl import SFTConfig

    kwargs = {**args, "use_cpu": True, "bf16": False, "fp16": False}  # parse on this CPU-only machine
    (tmp_path / "args.json").write_text(json.dumps(kwargs))
    (parsed,) = HfArgumentParser(SFTConfig).parse_json_file(str(tmp_path / "args.json"))
    assert parsed.learning_rate == plan["learning_rate"] and parsed.max_length == args["max_length"]
    assert not any(out.glob("checkpoint-*"))


BAD = {
    "malformed": ("model:\n  name: x\n data: [\n", "line"),
    "unknown_key": ("model:\n  name: x\ndata:\n  path: a.jsonl\n  max_lenght: 12\n", "max_length"),
    "unknown_section": ("modle:\n  name: x\n", "model"),
    "wrong_type": ("model:\n  name: x\ndata:\n  path: a.jsonl\n  max_length: long\n", "data.max_length"),
    "bad_method": ("model:\n  name: x\nmethod:\n  type: prefix\ndata:\n  path: a.jsonl\n", "method.type"),
    "training_field": ("model:\n  name: x\ndata:\n  path: a.jsonl\ntraining:\n  learning_rat: 1.0e-4\n",
                       "learning_rate"),
    "training_type": ("model:\n  name: x\ndata:\n  path: builtin:arithmetic\ntraining:\n  max_steps: abc\n",
                      "training.max_steps"),
    "training_positive": ("model:\n  name: x\ndata:\n  path: builtin:arithmetic\ntraining:\n"
                          "  per_device_train_batch_size: 0\n", "training.per_device_train_batch_size"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_recipes_one_line_exit_2(name, tmp_path, capsys):
    text, needle = BAD[name]
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["validate", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_missing_recipe_and_bad_override(tmp_path):
    with pytest.raises(FinetuneHelperError, match="no such file"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(FinetuneHelperError, match="key=value"):
        load_recipe(RECIPES[0], ["training.max_steps"])


def test_overrides_are_typed(tmp_path):
    recipe = load_recipe(RECIPES[0], ["recommend.lr_max=3e-4", "training.max_steps=20", "data.packing=true"])
    assert recipe.recommend.lr_max == pytest.approx(3e-4) and isinstance(recipe.recommend.lr_max, float)
    assert recipe.training["max_steps"] == 20 and recipe.data.packing is True


def test_data_that_fits_no_format_lists_columns(tmp_path, capsys):
    data = tmp_path / "odd.jsonl"
    data.write_text('{"question": "1+1", "answer": "2"}\n')
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run", str(RECIPES[0]), "--dry-run", "--output-dir", str(tmp_path / "r"), f"data.path={data}",
                  "model.name=meta-llama/Llama-3.1-8B", "hardware.gpu=24GB"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "answer" in err and "question" in err and "Traceback" not in err


def test_missing_data_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run", str(REAL_WORLD[0]), "--dry-run", "--output-dir", str(tmp_path / "r"),
                  f"data.path={tmp_path / 'missing.jsonl'}"])
    assert exit_info.value.code == 2
    assert "data.path" in capsys.readouterr().err


def test_a_key_written_twice_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("model:\n  name: builtin:tiny-llama\ntraining:\n  learning_rate: 1e-4\n  learning_rate: 1e-3\n")
    with pytest.raises(FinetuneHelperError, match=r"not valid YAML \(line 5, column 3\): duplicate key 'learning_rate'"):
        load_recipe(path)


#: the configurations and splits of the Hub datasets the shipped recipes train on, as their dataset cards list them
#: (the ``configs`` / ``dataset_info`` YAML header of each card's README.md; None: the default configuration only)
DATASET_CARDS = {
    # https://huggingface.co/datasets/yahma/alpaca-cleaned: one default configuration, split train
    "yahma/alpaca-cleaned": {"configs": {None}, "splits": {"train"}},
    # https://huggingface.co/datasets/HuggingFaceH4/ultrachat_200k: splits train_sft, test_sft, train_gen, test_gen
    "HuggingFaceH4/ultrachat_200k": {"configs": {None}, "splits": {"train_sft", "test_sft", "train_gen", "test_gen"}},
    # https://huggingface.co/datasets/HuggingFaceTB/smoltalk: no default configuration; "all" or one subset
    # (load_dataset("HuggingFaceTB/smoltalk", "all", split="train") in its card); splits train and test
    "HuggingFaceTB/smoltalk": {"configs": {"all", "smol-magpie-ultra", "smol-constraints", "smol-rewrite",
                                           "smol-summarize"}, "splits": {"train", "test"}},
}


@pytest.mark.parametrize("path", REAL_WORLD, ids=lambda p: p.stem)
def test_shipped_recipes_name_splits_and_configs_their_datasets_have(path):
    recipe = load_recipe(path)
    card = DATASET_CARDS[recipe.data.path]
    assert recipe.data.config in card["configs"], (recipe.data.path, recipe.data.config)
    assert recipe.data.split.split("[")[0] in card["splits"], (recipe.data.path, recipe.data.split)
