"""With packing, the plan counts the rows TRL packs the examples into, not the examples: counted before planning
from the data tokenized as TRL tokenizes it, and equal to the length of the packed dataset the real ``SFTTrainer``
builds -- for each data format the runner feeds TRL (conversational prompt/completion, messages, plain text)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from finetune_helper.train.tiny import synthetic_dataset, write_dataset

#: integration tier (make test-integration): the real tokenizer, TRL's packing and SFTTrainer
pytestmark = pytest.mark.integration

TINY = Path(__file__).resolve().parents[2] / "recipes" / "tiny-demo.yaml"
QUIET = {"log": lambda _: None}


@pytest.mark.parametrize("fmt", ["alpaca", "messages", "text"])
def test_the_plan_counts_the_packed_rows_the_trainer_trains_on(tmp_path, fmt):
    from finetune_helper.train import runner
    from finetune_helper.train.recipe import load_recipe

    data = write_dataset(tmp_path / "data.jsonl", synthetic_dataset(300, fmt=fmt, seed=1))
    recipe = load_recipe(TINY, [f"data.path={data}", "data.packing=true", "data.max_length=128",
                                "data.eval_fraction=0", "training.max_steps=1"])
    lines: list[str] = []
    prep, tokenizer = runner.prepare(recipe, tmp_path / "run", lines.append)
    rows = prep.plan.request.dataset_size
    trainer = runner.build_trainer(prep, tokenizer, prep.sft_kwargs, [])
    assert rows == len(trainer.train_dataset) < len(prep.train_dataset), (rows, len(trainer.train_dataset))
    eff = prep.plan.effective_batch_size
    assert prep.plan.total_steps == max(1, math.ceil(math.ceil(rows / eff) * prep.plan.request.epochs))
    assert "packed rows of 128 tokens" in prep.plan.reasons["total_steps"]
    assert any(f"300 examples pack into {rows} rows of 128 tokens" in line for line in lines), lines


def test_recommend_dataset_size_wins_over_the_count(tmp_path):
    from finetune_helper.train import runner
    from finetune_helper.train.recipe import load_recipe

    recipe = load_recipe(TINY, ["data.packing=true", "data.max_length=128", "recommend.dataset_size=777",
                                "data.max_examples=200"])
    prep, _ = runner.prepare(recipe, tmp_path / "run", **QUIET)
    assert prep.plan.request.dataset_size == 777
