"""The time model's host-operator counts (``data/throughput.yaml``, ``host_ops``) against a fresh count of the
runner's own micro-step on the installed stack, on configurations the table was not derived from (3 layers; LoRA on
four linears): a table that drifted from the stack, or a composition rule (per layer, per LoRA-wrapped linear) that
does not hold, fails here.  The table itself comes from ``benchmarks/host_ops.py`` (2 and 4 layers)."""

from __future__ import annotations

import pytest

from .conftest import TINY, recipe

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def three_layer_llama(tmp_path_factory):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from finetune_helper.train.tiny import build_tokenizer

    out = tmp_path_factory.mktemp("llama-3-layers")
    config = AutoConfig.for_model("llama", **{**TINY, "num_hidden_layers": 3})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    return out


@pytest.mark.parametrize("method,training", [
    ({"type": "full"}, {"bf16": True}),
    ({"type": "lora", "lora_r": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
     {"bf16": True, "gradient_checkpointing": True}),
    ({"type": "qlora", "lora_r": 8}, {"bf16": True}),
], ids=["full", "lora-qkvo-gc", "qlora"])
def test_the_operator_table_predicts_a_fresh_count_of_the_runners_micro_step(three_layer_llama, text_data, tmp_path,
                                                                            method, training):
    from finetune_helper.measure.host_ops import count_micro_step_ops
    from finetune_helper.recommender.model import ModelSpec
    from finetune_helper.recommender.throughput import host_ops_per_micro_step
    from finetune_helper.recommender.training_setup import TrainingSetup

    counted = count_micro_step_ops(recipe(three_layer_llama, text_data["unpadded"], method=method, training=training),
                                   run_dir=tmp_path / "run").ops
    spec = ModelSpec.from_config({"model_type": "llama", **TINY, "num_hidden_layers": 3})
    setup = TrainingSetup(method=method["type"], micro_batch_size=1, seq_len=64, lora_r=8,
                          lora_target_modules=tuple(method.get("target_modules", ())) or "all-linear",
                          gradient_checkpointing=training.get("gradient_checkpointing", False))
    predicted = host_ops_per_micro_step(spec, setup)
    assert predicted == pytest.approx(counted, rel=0.03), (predicted, counted)
