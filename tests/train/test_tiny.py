"""The embedded tiny default (finetune_helper/train/tiny.py): offline assets, synthetic data, exact-match scoring."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from finetune_helper.train import tiny
from finetune_helper.train.tiny import (
    FORMATS, MANIFEST_NAME, TINY_LLAMA_CONFIG, build_tiny_assets, exact_match, format_example, question_answer,
    synthetic_dataset, write_dataset,
)

#: integration tier (make test-integration): real torch / transformers / trainer / server work
pytestmark = pytest.mark.integration


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(directory) -> dict[str, str]:
    return {p.name: _digest(p) for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_tiny_assets(tmp_path_factory.mktemp("tiny") / "assets", seed=0)


@pytest.fixture(scope="module")
def tokenizer(assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets)


@pytest.fixture(scope="module")
def model(assets):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(assets)


def _answer(question: str) -> str:
    a, b = question.removeprefix("What is ").removesuffix("?").split(" + ")
    return str(int(a) + int(b))


# ------------------------------------------------------------------------------------------------ module

def test_import_is_light():
    code = ("import sys, finetune_helper.train.tiny as t; "
            "print(sorted(m for m in ('torch', 'transformers', 'tokenizers', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------------------------------------ assets

def test_assets_reload_offline(assets, tokenizer, model):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    names = {p.name for p in assets.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", MANIFEST_NAME} <= names
    cfg = model.config
    assert cfg.model_type == "llama"
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "tie_word_embeddings"):
        assert getattr(cfg, key) == TINY_LLAMA_CONFIG[key], key
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    assert len(tokenizer) <= cfg.vocab_size
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == ("<|pad|>", "<|bos|>", "<|end|>")
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (
        cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    manifest = json.loads((assets / MANIFEST_NAME).read_text())
    assert manifest["seed"] == 0 and manifest["version"] == tiny.TINY_ASSETS_VERSION


def test_assets_deterministic(assets, tmp_path):
    again = build_tiny_assets(tmp_path / "again", seed=0)
    assert _files(again) == _files(assets)  # byte-identical weights, tokenizer, config, manifest
    # another seed: other weights, same tokenizer (built from the same generated text)
    w0, w1 = tiny.build_model(0).state_dict(), tiny.build_model(1).state_dict()
    assert any(not w0[k].equal(w1[k]) for k in w0)
    assert all(w0[k].equal(v) for k, v in tiny.build_model(0).state_dict().items())


def test_assets_idempotent(tmp_path):
    d = build_tiny_assets(tmp_path / "a", seed=0)
    stamps = {p.name: p.stat().st_mtime_ns for p in d.iterdir()}
    assert build_tiny_assets(d, seed=0) == d
    assert {p.name: p.stat().st_mtime_ns for p in d.iterdir()} == stamps  # nothing rewritten
    digests = _files(d)

    build_tiny_assets(d, seed=0, force=True)  # force rewrites (the same bytes)
    assert (d / MANIFEST_NAME).stat().st_mtime_ns != stamps[MANIFEST_NAME]
    assert _files(d) == digests

    (d / "model.safetensors").unlink()  # a damaged directory is rebuilt
    build_tiny_assets(d, seed=0)
    assert _files(d) == digests

    build_tiny_assets(d, seed=1)  # another seed rebuilds
    assert json.loads((d / MANIFEST_NAME).read_text())["seed"] == 1
    assert _digest(d / "model.safetensors") != digests["model.safetensors"]
    assert _digest(d / "tokenizer.json") == digests["tokenizer.json"]


# ------------------------------------------------------------------------------------------------ tokenizer

def test_digits_are_single_tokens(tokenizer):
    for text in ("12345", "What is 37 + 48?", "Reverse the digits 90817.", "1000000"):
        digit_tokens = [t for t in tokenizer.tokenize(text) if any(c.isdigit() for c in t)]
        assert all(len(t) == 1 for t in digit_tokens), digit_tokens
        assert "".join(digit_tokens) == "".join(c for c in text if c.isdigit())
    text = "What is 37 + 48?\nAnswer: 85"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_chat_template_renders_turns(tokenizer):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 37 + 48?"},
            {"role": "assistant", "content": "85"}]
    assert tokenizer.apply_chat_template(msgs, tokenize=False) == (
        "<|bos|><|system|>\nBe brief.<|end|>\n<|user|>\nWhat is 37 + 48?<|end|>\n<|assistant|>\n85<|end|>\n")
    prompt = tokenizer.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|user|>\nWhat is 37 + 48?<|end|>\n<|assistant|>\n")
    assert not tokenizer.apply_chat_template(msgs[:2], tokenize=False).endswith("<|assistant|>\n")
    template = (tokenizer.chat_template if isinstance(tokenizer.chat_template, str)
                else tokenizer.chat_template["default"])
    assert "{% generation %}" in template and "{% endgeneration %}" in template


def test_assistant_tokens_mask_covers_exactly_the_answer(tokenizer):
    msgs = [{"role": "user", "content": "What is 37 + 48?"}, {"role": "assistant", "content": "85"},
            {"role": "user", "content": "What is 10 + 90?"}, {"role": "assistant", "content": "100"}]
    enc = tokenizer.apply_chat_template(msgs, return_assistant_tokens_mask=True, return_dict=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    assert len(ids) == len(mask)
    masked = [tokenizer.convert_ids_to_tokens(i) for i, m in zip(ids, mask) if m]
    assert masked == ["8", "5", "<|end|>", "1", "0", "0", "<|end|>"]  # the answers and their end-of-turn only
    # the mask is two contiguous runs that end right where each assistant turn ends
    runs = [i for i in range(len(mask)) if mask[i] and (i == 0 or not mask[i - 1])]
    assert len(runs) == 2


# ------------------------------------------------------------------------------------------------ datasets

def test_dataset_deterministic_and_correct():
    a = synthetic_dataset(50, seed=3)
    assert a == synthetic_dataset(50, seed=3)
    assert a != synthetic_dataset(50, seed=4)
    for ex in a:
        assert set(ex) == {"instruction", "input", "output"}
        assert ex["output"] == _answer(ex["instruction"])
    assert len({ex["instruction"] for ex in a}) == 50  # drawn without replacement


def test_splits_are_disjoint():
    train = {question_answer(e)[0][-1]["content"] for e in synthetic_dataset(5000, split="train")}
    test = {question_answer(e)[0][-1]["content"] for e in synthetic_dataset(700, split="test", seed=1)}
    assert len(train) == 5000 and len(test) == 700
    assert not train & test
    # whatever the seeds: the split is a property of the problem
    assert not test & {question_answer(e)[0][-1]["content"] for e in synthetic_dataset(5000, seed=7)}
    with pytest.raises(ValueError):
        synthetic_dataset(2000, split="test")  # only ~810 two-digit additions are test problems
    with pytest.raises(ValueError):
        synthetic_dataset(5, split="validation")


def test_all_formats_carry_the_same_problems():
    for system in (None, "Be brief."):
        per_format = {fmt: synthetic_dataset(30, seed=5, fmt=fmt, tasks=("add", "reverse"), system=system)
                      for fmt in FORMATS}
        pairs = {fmt: [question_answer(ex) for ex in exs] for fmt, exs in per_format.items()}
        reference = pairs["messages"]
        assert sum(q[-1]["content"].startswith("Reverse") for q, _ in reference) == 15
        for fmt in FORMATS:
            if fmt == "prompt_completion" and system:  # no system field: the system text leads the prompt
                assert [(q[-1]["content"], a) for q, a in pairs[fmt]] == [
                    (f"{system}\n\n{q[-1]['content']}", a) for q, a in reference]
            else:
                assert pairs[fmt] == reference, fmt
    assert set(per_format["alpaca"][0]) == {"instruction", "input", "output", "system"}
    assert [t["from"] for t in per_format["sharegpt"][0]["conversations"]] == ["system", "human", "gpt"]
    assert [t["role"] for t in per_format["messages"][0]["messages"]] == ["system", "user", "assistant"]
    assert set(per_format["prompt_completion"][0]) == {"prompt", "completion"}
    assert set(per_format["text"][0]) == {"text"}
    with pytest.raises(ValueError):
        format_example("q", "a", fmt="chatml")


@pytest.mark.parametrize("suffix, fmt", [(".jsonl", "messages"), (".json", "sharegpt"), (".csv", "prompt_completion"),
                                         (".parquet", "alpaca"), (".csv", "text")])
def test_write_dataset_round_trips(tmp_path, suffix, fmt):
    from datasets import load_dataset

    examples = synthetic_dataset(25, seed=2, fmt=fmt)
    path = write_dataset(tmp_path / f"data{suffix}", examples)
    builder = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}[suffix]
    features = None
    if suffix == ".csv":  # CSV is untyped: without features "85" would come back as the integer 85
        from datasets import Features, Value

        features = Features({column: Value("string") for column in examples[0]})
    loaded = load_dataset(builder, data_files=str(path), split="train", cache_dir=str(tmp_path / "cache"),
                          features=features)
    assert loaded.to_list() == examples


def test_write_dataset_refuses_nested_csv_and_unknown_suffix(tmp_path):
    with pytest.raises(ValueError, match="flat"):
        write_dataset(tmp_path / "d.csv", synthetic_dataset(3, fmt="messages"))
    with pytest.raises(ValueError, match="suffix"):
        write_dataset(tmp_path / "d.txt", synthetic_dataset(3))


# ------------------------------------------------------------------------------------------------ exact match

def test_exact_match_untrained_is_low_and_deterministic(model, tokenizer):
    test = synthetic_dataset(64, split="test")
    model.train()
    first = exact_match(model, tokenizer, test, batch_size=16)
    assert 0.0 <= first < 0.2
    assert exact_match(model, tokenizer, test, batch_size=64) == first
    assert model.training  # mode restored
    assert tokenizer.padding_side == "right"
    assert exact_match(model, tokenizer, []) == 0.0
    answers = tiny.generate_answers(model, tokenizer, test[:4], max_new_tokens=3)
    assert len(answers) == 4 and all(isinstance(a, str) for a in answers)


@pytest.mark.slow
def test_sft_trainer_assistant_only_loss_and_peft_exact_match(assets, tokenizer, tmp_path):
    """TRL's assistant-only path accepts the template; a few steps run; exact_match works on a PEFT model."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    model = AutoModelForCausalLM.from_pretrained(assets)
    cfg = SFTConfig(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, learning_rate=3e-3, max_steps=6,
                    per_device_train_batch_size=8, logging_steps=1, max_length=64, report_to="none",
                    activation_checkpointing=False, assistant_only_loss=True, save_strategy="no",
                    disable_tqdm=True)
    train = Dataset.from_list(synthetic_dataset(48, fmt="messages"))
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=train, processing_class=tokenizer,
                         peft_config=LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    batch = next(iter(trainer.get_train_dataloader()))
    labels, ids = batch["labels"][0], batch["input_ids"][0]
    kept = tokenizer.convert_ids_to_tokens(ids[labels != -100].tolist())
    assert kept[-1] == "<|end|>" and all(t.isdigit() for t in kept[:-1])  # only the answer is trained on
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    score = exact_match(trainer.model, tokenizer, synthetic_dataset(16, split="test"))
    assert 0.0 <= score <= 1.0


# ------------------------------------------------------------------------------------------------ the shipped base

def test_shipped_base_matches_this_code_and_knows_addition_only_as_text():
    """The base behind builtin:tiny-llama: built by this code (manifest, sha256 of every file), it answers held-out
    problems in its pre-training text format and not through the chat template (what the demo fine-tune teaches)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tiny.check_base()
    model, tok = AutoModelForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(base)
    holdout = synthetic_dataset(tiny.N_HOLDOUT, split="test")
    assert tiny.text_exact_match(model, tok, holdout) >= 0.9
    assert exact_match(model, tok, holdout) <= 0.05


def test_check_base_refuses_a_changed_or_stale_base(tmp_path):
    import shutil

    copy = shutil.copytree(tiny.check_base(), tmp_path / "base")
    assert tiny.check_base(copy) == copy
    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    manifest["pretraining"]["learning_rate"] = 1e-3  # the code's recipe is not what built it
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="stale: \\['pretraining'\\]"):
        tiny.check_base(copy)
    shutil.copy(tiny.check_base() / MANIFEST_NAME, copy / MANIFEST_NAME)
    with (copy / "config.json").open("a") as fh:
        fh.write(" ")
    with pytest.raises(ValueError, match="changed files: \\['config.json'\\]"):
        tiny.check_base(copy)
    with pytest.raises(ValueError, match="no readable tiny base"):
        tiny.check_base(tmp_path / "nothing")


def test_pretrain_base_learns_and_refuses_to_save_a_base_that_never_learned(tmp_path):
    lines = []
    with pytest.raises(RuntimeError, match="nothing was saved"):
        tiny.pretrain_base(tmp_path / "base", steps=40, log=lines.append)
    assert lines[0].startswith("pretrain step 40/40 loss") and "held-out exact match" in lines[-1]
    assert float(lines[0].split("loss ")[1].split()[0]) < 4.0  # from ~6.3 at random init
    assert not (tmp_path / "base").exists()


def test_pretraining_text_aligns_the_answer_with_the_chat_template(tokenizer):
    """As many tokens between the question's '?' and the answer in the text format as in the chat template."""
    text = tokenizer(tiny.pretraining_text("What is 37 + 48?", "85"), add_special_tokens=False)["input_ids"]
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is 37 + 48?"},
                                          {"role": "assistant", "content": "85"}], tokenize=True, return_dict=True)
    chat = chat["input_ids"]
    q, eight = tokenizer.convert_tokens_to_ids("?"), tokenizer.convert_tokens_to_ids("8")

    def gap(ids):
        return ids.index(eight, ids.index(q)) - ids.index(q)

    assert gap(text) == gap(chat) == 5
