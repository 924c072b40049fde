"""Tiny random models with the project's tokenizer, and plain-text data whose rows are longer than ``max_length``
(unpadded batches) or alternate long and short (padded ones): the inputs of the measured runner steps."""

from __future__ import annotations

import json
import random

import pytest

#: 2 layers, hidden 128, GQA 4/2 heads, vocab 512 (the tiny tokenizer's ~390 tokens fit)
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)
ARCH_EXTRA = {"llama": {}, "qwen2": {"tie_word_embeddings": False},
              "gemma2": {"final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0, "query_pre_attn_scalar": 32},
              "phi3": {"tie_word_embeddings": False}}
MAX_LENGTH = 64


def tiny_arch_config(arch: str, layers: int = TINY["num_hidden_layers"]) -> dict:
    return {"model_type": arch, **TINY, **ARCH_EXTRA.get(arch, {}), "num_hidden_layers": layers}


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """``model_dir(arch, layers=2)``: a saved random-init model of ``arch`` (``tiny_arch_config(arch, layers)``) with
    the tiny tokenizer (built once per session)."""
    root = tmp_path_factory.mktemp("measure-models")
    built: dict[tuple[str, int], object] = {}

    def make(arch: str, layers: int = TINY["num_hidden_layers"]):
        if (arch, layers) not in built:
            import torch
            from transformers import AutoConfig, AutoModelForCausalLM

            from finetune_helper.train.tiny import build_tokenizer

            out = root / f"{arch}-{layers}"
            cfg = tiny_arch_config(arch, layers)
            config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(config).save_pretrained(out)
            build_tokenizer().save_pretrained(out)
            built[arch, layers] = out
        return built[arch, layers]

    return make


@pytest.fixture(scope="session")
def text_data(tmp_path_factory):
    """{"unpadded": rows all longer than MAX_LENGTH tokens, "padded": long and short rows alternating}."""
    root = tmp_path_factory.mktemp("measure-data")
    rng = random.Random(0)

    def row(n: int) -> str:
        return json.dumps({"text": " ".join(str(rng.randrange(10)) for _ in range(n))})

    (root / "long.jsonl").write_text("\n".join(row(200) for _ in range(48)) + "\n")
    (root / "mixed.jsonl").write_text("\n".join(row(200 if i % 2 else rng.randrange(5, 30)) for i in range(48)) + "\n")
    return {"unpadded": root / "long.jsonl", "padded": root / "mixed.jsonl"}


def recipe(model_dir, data, *, method: dict, training: dict, packing: bool = False, trainer: str = "trl"):
    from finetune_helper.train.recipe import recipe_from_dict

    return recipe_from_dict({"trainer": trainer,
        "model": {"name": str(model_dir)}, "method": method,
        "data": {"path": str(data), "max_length": MAX_LENGTH, "packing": packing}, "hardware": {"gpu": "16GiB"},
        "training": {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, **training}, "seed": 0})
