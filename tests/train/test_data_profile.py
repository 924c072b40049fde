"""The data's profile (``finetune_helper.train.data_profile``) against independent computations: percentiles against
numpy, the padding waste against TRL's own collator and against the batches the real SFTTrainer's dataloader draws,
the packed rows against the dataset the real SFTTrainer packs, the approximation without a tokenizer against the
characters of the file, and the sampling error against the full computation.

The statistics are pure Python (unit tier); what reads data or loads the tokenizer / TRL is marked integration."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from finetune_helper.errors import FinetuneHelperError
from finetune_helper.train import data_profile as dp
from finetune_helper.train.tiny import format_example

TINY = Path(__file__).resolve().parents[2] / "recipes" / "tiny-demo.yaml"
QUIET = {"log": lambda _: None}
integration = pytest.mark.integration


def varied(n: int, seed: int = 0, fmt: str = "alpaca", mean_filler: float = 30) -> list[dict]:
    """Addition problems with a skewed run of digits after the question (the tiny tokenizer splits digits one by
    one): token lengths from about 20 to a few hundred, with a long tail."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randrange(10, 100), rng.randrange(10, 100)
        filler = "".join(str(rng.randrange(10)) for _ in range(int(rng.expovariate(1 / mean_filler))))
        out.append(format_example(f"What is {a} + {b}? {filler}".strip(), str(a + b), fmt=fmt))
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- pure statistics

def test_nearest_rank_is_numpys_inverted_cdf():
    np = pytest.importorskip("numpy")
    rng = random.Random(1)
    for n in (1, 2, 7, 100, 1001):
        values = sorted(rng.randrange(1, 500) for _ in range(n))
        for p in (1, 50, 90, 99, 100):
            assert dp.nearest_rank(values, p) == int(np.percentile(values, p, method="inverted_cdf")), (n, p)


def test_percentile_bounds_cover_the_population_percentile_at_least_95_percent_of_the_time():
    """Draw 400 samples of 500 from a skewed population of 20,000: each percentile of the population lies within the
    stated bounds of (about) 95% of the samples -- at least 93% here (ties make the interval conservative)."""
    rng = random.Random(2)
    population = [int(rng.lognormvariate(5, 0.8)) + 1 for _ in range(20_000)]
    ordered = sorted(population)
    truth = {p: dp.nearest_rank(ordered, p) for p in (50, 90, 99)}
    covered = dict.fromkeys(truth, 0)
    draws = 400
    for _ in range(draws):
        sample = sorted(rng.sample(population, 500))
        for p in truth:
            low, high = dp.percentile_bounds(sample, p, len(population))
            covered[p] += low <= truth[p] <= high
    for p, hits in covered.items():
        assert 0.93 <= hits / draws <= 1.0, (p, hits / draws)
    assert dp.percentile_bounds(ordered, 99, len(ordered)) == (truth[99], truth[99])  # everything read: exact


def test_share_standard_error_is_the_spread_of_the_estimates():
    rng = random.Random(3)
    population = [rng.random() < 0.07 for _ in range(30_000)]
    share = sum(population) / len(population)
    estimates = [sum(rng.sample(population, 1000)) / 1000 for _ in range(500)]
    mean = sum(estimates) / len(estimates)
    spread = math.sqrt(sum((e - mean) ** 2 for e in estimates) / (len(estimates) - 1))
    assert spread == pytest.approx(dp.share_se(share, 1000, len(population)), rel=0.15)
    assert dp.share_se(share, 1000, 1000) == 0  # everything read


def test_padding_by_hand():
    # data order, batch 2: [3, 1] pads to 3 x 2 = 6 (2 padded), [2, 2] to 4 (none): 2 of 10 positions
    out = dp.padding([3, 1, 2, 2], 2, seed=None)
    assert (out["positions"], out["tokens"], out["waste"]) == (10, 8, 0.2)
    # the last batch keeps what is left (the Trainer's DataLoader does not drop it)
    assert dp.padding([5, 1, 1], 2, seed=None)["positions"] == 10 + 1
    assert dp.padding([4] * 9, 4)["waste"] == 0
    with pytest.raises(FinetuneHelperError):
        dp.padding([1, 2], 0)


def test_histogram_counts_every_example_once():
    rng = random.Random(4)
    values = sorted(rng.randrange(10, 4000) for _ in range(3000))
    p99 = dp.nearest_rank(values, 99)
    bars = dp.histogram(values, p99)
    assert sum(bar["count"] for bar in bars) == len(values)
    assert sum(bar["share"] for bar in bars) == pytest.approx(1)
    assert len(bars) <= dp.HISTOGRAM_BINS + 1 and bars[0]["low"] == values[0] and bars[-1]["high"] == values[-1]
    assert bars[-1]["low"] == p99 + 1  # the bar above p99
    assert all(a["high"] + 1 == b["low"] for a, b in zip(bars, bars[1:]))
    assert dp.histogram([7, 7, 7], 7) == [{"low": 7, "high": 7, "count": 3, "share": 1.0}]


# ------------------------------------------------------------------------------------------ against TRL itself

def trainer_for(tmp_path: Path, data: Path, *, max_length: int, batch: int, packing: bool = False):
    """The real SFTTrainer the runner builds for ``data`` (the tiny base, no eval split)."""
    from finetune_helper.train import runner
    from finetune_helper.train.recipe import load_recipe

    recipe = load_recipe(TINY, [f"data.path={data}", f"data.max_length={max_length}", "data.eval_fraction=0",
                                f"data.packing={'true' if packing else 'false'}",
                                f"training.per_device_train_batch_size={batch}", "training.max_steps=1"])
    prep, tokenizer = runner.prepare(recipe, tmp_path / f"run-{max_length}-{batch}-{packing}", **QUIET)
    return runner.build_trainer(prep, tokenizer, prep.sft_kwargs, [])


@integration
@pytest.mark.parametrize("fmt", ["alpaca", "messages", "text"])
def test_the_profile_is_what_the_trainer_trains_on(tmp_path, fmt):
    """Lengths, percentiles, truncation, padding waste and packed rows of the profile against the real SFTTrainer
    the runner builds for the same file: its tokenized (truncated) dataset, TRL's collator on it, the batches its
    dataloader draws, and the dataset it packs."""
    import numpy as np
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    data = write_jsonl(tmp_path / "data.jsonl", varied(600, seed=5, fmt=fmt))
    max_length, batch = 48, 8
    profile = dp.profile_data(str(data), model=dp.BUILTIN_MODEL, max_length=max_length, batch=batch)
    assert (profile.examples, profile.sample_size, profile.format) == (600, 600, fmt)
    assert profile.tokenizer and not profile.approximated and profile.max_length == max_length

    # the lengths, tokenized in batches, are token_lengths' (one example at a time, as TRL tokenizes)
    from finetune_helper.train import data as dataio

    loaded, detected = dataio.load_data(str(data))
    tokenizer = dp.load_tokenizer(str(dp._tokenizer_source(dp._model_spec(dp.BUILTIN_MODEL))[0]))[0]
    converted, _, _ = dataio.to_trl_dataset(loaded, detected, assistant_mask_supported=True)
    assert list(profile.lengths) == dataio.token_lengths(converted, tokenizer)

    trainer = trainer_for(tmp_path, data, max_length=max_length, batch=batch)
    ids = trainer.train_dataset["input_ids"]
    # every example it keeps, in data order, truncated as TRL truncates it; those whose answer starts beyond
    # max_length are dropped (no trained token left), as the profile says
    kept = [min(n, max_length) for n, start in zip(profile.lengths, profile.starts) if start < max_length]
    assert [len(x) for x in ids] == kept
    assert max(profile.lengths) > max_length  # some are truncated: the check means something
    assert profile.trained_examples == len(ids) == 600 - round(600 * profile.dropped_share)
    assert (profile.dropped_share > 0) == (fmt != "text")  # prompts longer than 48 tokens; text trains every token
    labels = trainer.train_dataset["labels"]
    for i, start in enumerate(s for s in profile.starts if s < max_length):  # where the trained tokens start
        assert next(j for j, label in enumerate(labels[i]) if label != -100) == start
    lengths = np.array(profile.lengths)
    for q in dp.PERCENTILES:
        assert getattr(profile, f"p{q}") == int(np.percentile(lengths, q, method="inverted_cdf"))
    assert profile.truncated_share == pytest.approx(float(np.mean(lengths > max_length)))
    # padding: TRL's own collator on the trainer's examples, batched in the profile's order: the same waste
    collator = DataCollatorForLanguageModeling(pad_token_id=trainer.processing_class.pad_token_id)
    order = dp.batch_order(len(ids), dp.ORDER_SEED)
    padded = positions = 0
    for start in range(0, len(order), batch):
        out = collator([{"input_ids": ids[i]} for i in order[start:start + batch]])
        positions += out["attention_mask"].numel()
        padded += int((out["attention_mask"] == 0).sum())
    assert profile.padding_waste == pytest.approx(padded / positions)
    assert profile.unpacked_positions == positions
    # the batches the Trainer itself draws (its RandomSampler, seeded by the recipe): the figure within its error
    padded = positions = 0
    for batch_data in trainer.get_train_dataloader():
        mask = batch_data["attention_mask"]
        positions += mask.numel()
        padded += int((mask == 0).sum())
    assert positions > 0 and batch_data["input_ids"].shape[1] <= max_length
    assert abs(padded / positions - profile.padding_waste) <= dp.Z95 * math.sqrt(2) * profile.padding_waste_se, (
        padded / positions, profile.padding_waste, profile.padding_waste_se)
    assert torch.is_tensor(mask)
    # packing: the rows the packing SFTTrainer trains on
    packing = trainer_for(tmp_path, data, max_length=max_length, batch=batch, packing=True)
    assert profile.packed_rows == len(packing.train_dataset) < profile.examples
    assert profile.packed_positions == profile.packed_rows * max_length


@integration
def test_the_rows_counted_per_packing_batch_are_one_call_over_all(tmp_path):
    """TRL packs in the batches of datasets' map (1000 examples): counted per batch (for the sampling error) they
    sum to one pack_dataset call over all the lengths."""
    from finetune_helper.train.data import packed_rows

    rng = random.Random(6)
    lengths = [int(rng.lognormvariate(4, 0.7)) + 1 for _ in range(2500)]
    chunks = dp._packed_chunks([min(n, 128) for n in lengths], 128, "bfd")
    assert [m for _, m in chunks] == [1000, 1000, 500]
    assert sum(r for r, _ in chunks) == packed_rows(lengths, 128)


@integration
def test_without_a_tokenizer_the_lengths_are_characters_over_four(tmp_path):
    rows = varied(200, seed=7, fmt="text")
    data = write_jsonl(tmp_path / "text.jsonl", rows)
    profile = dp.profile_data(str(data), model="7B")
    assert profile.approximated and profile.tokenizer is None and "size" in profile.tokenizer_note
    assert list(profile.lengths) == [math.ceil(len(r["text"]) / 4) for r in rows]
    d = profile.to_dict()
    assert d["tokenizer"] is None and "~4 characters" in d["approximation"]
    # a Hub model whose tokenizer is not cached, offline: the same approximation, saying why
    offline = dp.profile_data(str(data), model="meta-llama/Llama-3.1-8B")
    assert offline.approximated and "offline" in offline.tokenizer_note
    assert offline.lengths == profile.lengths and offline.model_max_length == 131072
    # conversations: their contents
    chats = varied(50, seed=8, fmt="messages")
    profile = dp.profile_data(str(write_jsonl(tmp_path / "chat.jsonl", chats)), model="7B")
    assert list(profile.lengths) == [math.ceil(sum(len(m["content"]) for m in r["messages"]) / 4) for r in chats]


@integration
def test_a_sample_states_its_error_and_the_full_computation_lies_within_it(tmp_path):
    """12,000 examples, 3,000 sampled: each estimate is within its stated 95% error of the figure computed on every
    example (percentiles within their bounds; shares, padding waste and packed rows within 1.96 standard errors --
    for the padding waste, of the difference of two random orders)."""
    data = write_jsonl(tmp_path / "big.jsonl", varied(12_000, seed=9, fmt="text", mean_filler=40))
    full = dp.profile_data(str(data), model=dp.BUILTIN_MODEL, sample=0, max_length=96, batch=8)
    est = dp.profile_data(str(data), model=dp.BUILTIN_MODEL, sample=3000, max_length=96, batch=8)
    assert not full.sampled and est.sampled and (est.examples, est.sample_size) == (12_000, 3000)
    d = est.to_dict()
    assert d["sampled"] and d["sample_seed"] == dp.SAMPLE_SEED and "order statistics" in d["sampling_error"]
    for q in dp.PERCENTILES:
        low, high = est.percentile_bounds[f"p{q}"]
        assert low <= getattr(full, f"p{q}") <= high, (q, low, high, getattr(full, f"p{q}"))
        assert low <= getattr(est, f"p{q}") <= high
    assert full.truncated_share > 0.02  # a share worth estimating
    assert abs(est.truncated_share - full.truncated_share) <= dp.Z95 * est.truncated_share_se
    assert abs(est.padding_waste - full.padding_waste) <= dp.Z95 * math.hypot(est.padding_waste_se,
                                                                              full.padding_waste_se)
    assert 0 < est.packed_rows_se and abs(est.packed_rows - full.packed_rows) <= dp.Z95 * est.packed_rows_se
    assert est.unpacked_positions == pytest.approx(full.unpacked_positions, rel=0.03)
    assert full.truncated_share_se == 0 and full.packed_rows_se == 0  # everything read: exact


@integration
def test_memory_caps_the_recommended_max_length(tmp_path):
    """Long documents (approximated: no Llama tokenizer offline) whose p99 does not fit a 12 GB card with QLoRA: the
    recommendation is the longest length that fits, its truncation follows, and 8 tokens more would not fit."""
    import dataclasses

    from finetune_helper.recommender.gpu import resolve_gpu
    from finetune_helper.recommender.model import resolve_model
    from finetune_helper.recommender.plan import PlanRequest, recommend_plan

    rng = random.Random(10)
    rows = [{"text": "word " * int(rng.lognormvariate(9.5, 0.6))} for _ in range(300)]
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    spec = resolve_model("meta-llama/Llama-3.1-8B")
    profile = dp.profile_data(str(data), model=spec)
    req = PlanRequest(model=spec, gpu=resolve_gpu("12GB"), method="qlora")
    assert not recommend_plan(dataclasses.replace(req, seq_len=profile.p99)).fits
    plan, capped = dp.plan_with_data(req, profile)
    assert capped.max_length_source == "memory" and plan.fits
    assert capped.recommended_max_length == capped.max_length == plan.request.seq_len < profile.p99
    assert capped.recommended_max_length % 8 == 0
    assert not recommend_plan(dataclasses.replace(req, seq_len=capped.max_length + 8)).fits
    assert capped.truncated_share == sum(n > capped.max_length for n in profile.lengths) / len(profile.lengths)
    assert "fits in" in capped.max_length_reason and plan.request.dataset_size == 300
    assert capped.batch == plan.per_device_train_batch_size
    # a length given is kept even where it does not fit
    plan, given = dp.plan_with_data(dataclasses.replace(req, seq_len=65536), profile)
    assert given.max_length == 65536 and given.max_length_given and not plan.fits


@integration
def test_bad_input_names_its_field(tmp_path):
    with pytest.raises(FinetuneHelperError) as exc:
        dp.profile_data(str(tmp_path / "missing.jsonl"), model="7B")
    assert exc.value.field == "data.path" and "no such file" in exc.value.message
    data = write_jsonl(tmp_path / "d.jsonl", varied(5))
    with pytest.raises(FinetuneHelperError) as exc:
        dp.profile_data(str(data), model="7B", split="test")
    assert exc.value.field == "data.split"
    with pytest.raises(FinetuneHelperError) as exc:
        dp.profile_data(str(data), model="7B", sample=-1)
    assert exc.value.field == "data-sample"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}) + "\n" for _ in range(30)))
    with pytest.raises(FinetuneHelperError) as exc:  # a row of the file, not of the sample, is named
        dp.profile_data(str(bad), model=dp.BUILTIN_MODEL, sample=10, seed=3)
    first = sorted(random.Random(3).sample(range(30), 10))[0]
    assert exc.value.message.startswith(f"row {first}:")
