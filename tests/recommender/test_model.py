"""Parameter counts from configs, proved equal to transformers models built on the meta device."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from finetune_helper.recommender import catalog
from finetune_helper.errors import FinetuneHelperError
from finetune_helper.recommender.model import ModelSpec, generic_size_config, resolve_model

from ..conftest import ARCHS, tiny_config

#: integration tier (make test-integration): real torch / transformers / trainer / server work
pytestmark = pytest.mark.integration


def meta_model(config: dict):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
    tf_config = AutoConfig.for_model(config["model_type"], **kwargs)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(tf_config)


def measured(config: dict) -> tuple[int, int]:
    params = list(meta_model(config).parameters())
    return sum(p.numel() for p in params), len(params)


VARIANTS = [
    {},
    {"tie_word_embeddings": True},
    {"tie_word_embeddings": False, "attention_bias": True, "mlp_bias": True},
    {"head_dim": 24, "num_key_value_heads": 4},
    {"num_key_value_heads": 1, "intermediate_size": 100},
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(f"{k}={v[k]}" for k in v) or "default")
@pytest.mark.parametrize("model_type", ARCHS)
def test_tiny_counts_equal_meta_instantiation(model_type, variant):
    config = tiny_config(model_type, **variant)
    spec = ModelSpec.from_config(config)
    assert spec.counted_parameters is None  # counted from the formula, not by instantiation
    assert (spec.num_parameters(), spec.num_parameter_tensors()) == measured(config)


@pytest.mark.parametrize("model_type", ARCHS)
def test_config_defaults_follow_transformers(model_type):
    """A config.json without head_dim / tie_word_embeddings counts with the config class's defaults."""
    config = tiny_config(model_type)
    del config["head_dim"]
    config["hidden_size"] = 128
    spec = ModelSpec.from_config(config)
    assert (spec.num_parameters(), spec.num_parameter_tensors()) == measured(config)


ENTRIES = catalog.model_entries()


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["id"] for e in ENTRIES])
def test_catalog_counts_equal_meta_instantiation(entry):
    spec = ModelSpec.from_config(entry["config"], name=entry["id"])
    assert spec.num_parameters() == measured(entry["config"])[0]


def test_catalog_covers_required_models():
    ids = {e["id"] for e in ENTRIES}
    required = {"meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-70B", "meta-llama/Llama-3.2-1B",
                "meta-llama/Llama-3.2-3B", "Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-72B",
                "mistralai/Mistral-7B-v0.1", "HuggingFaceTB/SmolLM2-1.7B"}
    assert required <= ids
    assert len(ENTRIES) >= 25
    types = {e["config"]["model_type"] for e in ENTRIES}
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3"} <= types
    assert any("TinyLlama" in i for i in ids)
    for e in ENTRIES:
        assert e["source"].startswith("https://"), e["id"]


@pytest.mark.parametrize("name,params", [
    ("meta-llama/Llama-3.1-8B", 8_030_261_248),   # model card / safetensors index
    ("Qwen/Qwen2.5-7B", 7_615_616_512),
    ("mistralai/Mistral-7B-v0.1", 7_241_732_096),
    ("meta-llama/Llama-3.2-1B", 1_235_814_400),
    ("Qwen/Qwen2.5-0.5B", 494_032_768),
])
def test_known_published_sizes(name, params):
    assert resolve_model(name).num_parameters() == params


def test_resolve_by_alias_and_case():
    a = resolve_model("llama-3.1-8b")
    b = resolve_model("META-LLAMA/Llama-3.1-8B")
    assert a.name == b.name == "meta-llama/Llama-3.1-8B"


def test_local_directory(tmp_path):
    cfg = tiny_config("qwen2", hidden_size=96, num_attention_heads=6)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    spec = resolve_model(str(tmp_path))
    assert spec.origin == "local" and spec.num_parameters() == measured(cfg)[0]


def test_unsupported_architecture_falls_back_to_meta_instantiation(tmp_path):
    cfg = {"model_type": "gpt2", "vocab_size": 300, "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="meta device"):
        spec = resolve_model(str(tmp_path))
    # GPT-2 names its shapes n_embd / n_layer / n_head: read through the config class's attribute map
    assert (spec.hidden_size, spec.num_hidden_layers, spec.intermediate_size) == (32, 2, 128)
    assert spec.num_parameters() == measured(cfg)[0]
    assert spec.num_parameter_tensors() == measured(cfg)[1]


@pytest.mark.parametrize("size,expected", [("7B", 7e9), ("1.5b", 1.5e9), ("70B", 70e9), ("500M", 5e8)])
def test_bare_size_is_generic_llama_with_warning(size, expected):
    with pytest.warns(UserWarning, match="generic Llama"):
        spec = resolve_model(size)
    assert spec.model_type == "llama"
    assert abs(spec.num_parameters() - expected) / expected < 0.15
    assert spec.num_parameters() == measured(generic_size_config(expected))[0]


def test_unknown_name_suggests_catalog_names():
    with pytest.raises(FinetuneHelperError) as err:
        resolve_model("lama-3.1-8")
    assert err.value.field == "model" and "llama-3.1-8b" in str(err.value).lower()


def test_hub_id_offline_names_alternatives():
    code = ("import finetune_helper.recommender.model as m\n"
            "try:\n m.resolve_model('some-org/not-in-catalog-7b')\n"
            "except Exception as e: print(type(e).__name__, '|', e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120).stdout
    assert out.startswith("FinetuneHelperError |")
    assert "catalog" in out and "local directory" in out


def test_a_config_deeper_than_any_real_model_is_refused_before_any_estimate():
    config = {**catalog.find_model("meta-llama/Llama-3.2-1B")["config"], "num_hidden_layers": 100_000}
    with pytest.raises(FinetuneHelperError, match="num_hidden_layers 100000 is beyond any real model"):
        ModelSpec.from_config(config, name="deep")
