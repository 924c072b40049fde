"""The FLOP estimate against ``FlopCounterMode`` over what runs, never against its own formulas.

* tiny models through the runner's own steps (``measure_recipe(flops=True)``: prepare, load, SFTTrainer or
  transformers.Trainer, three optimizer steps under the counter), the estimate asked for each micro-batch at the
  shape the collator made;
* real-size catalog configs (fewer layers) through the replica under fake tensors.

The grid is ``benchmarks/flops_vs_counter.py``; 5% is the issue's target, and the counts agree exactly where the
step is modelled (the tolerance covers nothing known).
"""

from __future__ import annotations

import json

import pytest

from .conftest import recipe

pytestmark = pytest.mark.integration

TOLERANCE = 0.05


@pytest.mark.parametrize("arch,method,training,data,packing,trainer", [
    ("llama", {"type": "full"}, {"bf16": True}, "padded", False, "trl"),
    ("llama", {"type": "full"}, {"bf16": True, "gradient_checkpointing": True}, "unpadded", False, "trl"),
    ("qwen2", {"type": "lora", "lora_r": 8}, {"bf16": True, "gradient_checkpointing": True}, "padded", False, "trl"),
    ("gemma2", {"type": "lora", "lora_r": 8, "lora_dropout": 0.05}, {"bf16": True}, "padded", False, "trl"),
    ("phi3", {"type": "lora", "lora_r": 8, "target_modules": ["qkv_proj"]}, {"bf16": True}, "unpadded", False, "trl"),
    # packed rows: one row of every example, the block-diagonal mask over it
    ("qwen2", {"type": "lora", "lora_r": 8}, {"bf16": True, "per_device_train_batch_size": 8}, "unpadded", True,
     "trl"),
    ("llama", {"type": "full"}, {"bf16": True, "gradient_accumulation_steps": 2}, "padded", False, "transformers"),
])
def test_flops_of_the_runners_steps_match_the_counter(model_dir, text_data, tmp_path, arch, method, training, data,
                                                      packing, trainer):
    from finetune_helper.measure.runner_step import measure_recipe
    from finetune_helper.recommender.flops import estimate_flops
    from finetune_helper.recommender.model import ModelSpec
    from finetune_helper.train.setup import executed_setup

    r = recipe(model_dir(arch), text_data[data], method=method, training=training, packing=packing, trainer=trainer)
    measured = measure_recipe(r, steps=3, run_dir=tmp_path / "run", track=False, flops=True)
    spec = ModelSpec.from_config(json.loads((model_dir(arch) / "config.json").read_text()))
    assert len(measured.steps) == 3
    for step in measured.steps:
        predicted = sum(estimate_flops(spec, executed_setup(r, spec, measured.sft_kwargs, device="cpu",
                                                            batch_shape=shape, padded=padded)).counted
                        for shape, padded in step.batches)
        assert step.flops and abs(predicted - step.flops) / step.flops < TOLERANCE, (predicted, step.flops, step)


@pytest.mark.parametrize("model,method,gc,seq,batch,padded,loss", [
    ("meta-llama/Llama-3.1-8B", "lora", False, 1024, 1, False, "fused"),
    ("meta-llama/Llama-3.1-8B", "full", True, 1024, 1, False, "fused"),
    ("Qwen/Qwen2.5-7B", "lora", True, 512, 2, True, "logits"),
    ("google/gemma-2-9b", "full", True, 512, 1, False, "fused"),
])
def test_flops_of_real_size_steps_match_the_counter_under_fake_tensors(model, method, gc, seq, batch, padded, loss):
    from finetune_helper.measure.flops import count_replica_step
    from finetune_helper.recommender.catalog import find_model
    from finetune_helper.recommender.flops import estimate_flops
    from finetune_helper.recommender.model import ModelSpec
    from finetune_helper.recommender.training_setup import TrainingSetup

    config = {**find_model(model)["config"], "num_hidden_layers": 2}
    spec = ModelSpec.from_config(config)
    setup = TrainingSetup(method=method, micro_batch_size=batch, seq_len=seq, gradient_checkpointing=gc, device="cpu",
                          padded=padded, loss=loss, attn_implementation=spec.default_attn_implementation)
    counted = count_replica_step(config, setup)
    assert abs(estimate_flops(spec, setup).counted - counted) / counted < TOLERANCE


@pytest.mark.parametrize("model", ["meta-llama/Llama-3.1-8B", "Qwen/Qwen2.5-7B", "google/gemma-2-9b",
                                   "microsoft/Phi-3-mini-4k-instruct", "meta-llama/Llama-3.2-1B"])
def test_model_flops_per_token_is_trls_mfu_convention(model):
    """MFU's numerator as TRL computes it (``trl.trainer.utils.compute_flops_per_token``: 6N + 12LHQT from the
    transformers config), an implementation of the same convention that shares nothing with ours."""
    from transformers import AutoConfig
    from trl.trainer.utils import compute_flops_per_token

    from finetune_helper.recommender.catalog import find_model
    from finetune_helper.recommender.flops import model_flops_per_token
    from finetune_helper.recommender.model import ModelSpec

    config = dict(find_model(model)["config"])
    spec = ModelSpec.from_config(config)
    hf = AutoConfig.for_model(config.pop("model_type"), **config)
    for seq in (512, 4096):
        assert model_flops_per_token(spec, seq) == compute_flops_per_token(hf, seq)
