"""The time model's host-operator counts (``data/throughput.yaml``, ``host_ops``) against a fresh count of the
runner's own micro-step on the installed stack, on configurations the table was not derived from (3 layers; LoRA on
four or three linears; the tests' own tiny configurations): a table that drifted from the stack, or a composition
rule (per layer, per LoRA-wrapped linear, per architecture) that does not hold, fails here.  The table itself comes
from ``benchmarks/host_ops.py`` (2 and 4 layers)."""

from __future__ import annotations

import pytest

from .conftest import recipe, tiny_arch_config

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("arch,method,training", [
    ("llama", {"type": "full"}, {"bf16": True}),
    ("llama", {"type": "lora", "lora_r": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
     {"bf16": True, "gradient_checkpointing": True}),
    ("llama", {"type": "qlora", "lora_r": 8}, {"bf16": True}),
    ("gemma2", {"type": "lora", "lora_r": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
     {"bf16": True, "gradient_checkpointing": True}),
], ids=["llama-full", "llama-lora-qkvo-gc", "llama-qlora", "gemma2-lora-qv-down-gc"])
def test_the_operator_table_predicts_a_fresh_count_of_the_runners_micro_step(model_dir, text_data, tmp_path, arch,
                                                                            method, training):
    from finetune_helper.measure.host_ops import count_micro_step_ops
    from finetune_helper.recommender.model import ModelSpec
    from finetune_helper.recommender.throughput import host_ops_per_micro_step
    from finetune_helper.recommender.training_setup import TrainingSetup

    counted = count_micro_step_ops(recipe(model_dir(arch, 3), text_data["unpadded"], method=method,
                                          training=training), run_dir=tmp_path / "run").ops
    spec = ModelSpec.from_config(tiny_arch_config(arch, 3))
    setup = TrainingSetup(method=method["type"], micro_batch_size=1, seq_len=64, lora_r=8,
                          lora_target_modules=tuple(method.get("target_modules", ())) or "all-linear",
                          gradient_checkpointing=training.get("gradient_checkpointing", False))
    predicted = host_ops_per_micro_step(spec, setup)
    print(f"{arch}: predicted {predicted:.0f} operators, counted {counted}")
    assert predicted == pytest.approx(counted, rel=0.03), (predicted, counted)
