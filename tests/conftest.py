"""Shared tiny fixtures: config dicts small enough to build real models in milliseconds on CPU."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

#: the architectures counted exactly without torch (finetune_helper/architectures.py)
ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")


def tiny_config(model_type: str, **overrides) -> dict:
    """A random-init-sized config.json dict of ``model_type`` (vocab 512, hidden 64, 2 layers, GQA 4/2 heads)."""
    cfg = {
        "model_type": model_type, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 176,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "max_position_embeddings": 512, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
    }
    cfg.update(overrides)
    return cfg


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param
