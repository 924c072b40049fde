"""The estimate against measurements of what runs, never against its own formulas.

* tiny models through the runner's own steps (``measure_recipe``: prepare, load, SFTTrainer, three optimizer steps
  under the live-bytes tracker), the estimate asked for the setup that ran at the batch shape the collator made;
* real-size catalog configs (fewer layers: the per-layer terms repeat) through the replica under fake tensors.

The full grids (63 and 30 configurations) are ``benchmarks/estimate_vs_runner.py`` and
``benchmarks/estimate_vs_fake.py``; their figures are in the README.  5% is the target they meet.
"""

from __future__ import annotations

import json

import pytest

from .conftest import recipe

#: integration tier (make test-integration): real torch / transformers / trainer / server work
pytestmark = pytest.mark.integration

TOLERANCE = 0.05


@pytest.mark.parametrize("arch,method,training,data,packing,trainer", [
    ("llama", {"type": "full"}, {"bf16": True}, "padded", False, "trl"),
    ("llama", {"type": "full"}, {"bf16": True, "gradient_checkpointing": True}, "unpadded", False, "trl"),
    ("qwen2", {"type": "full", "weights_dtype": "bf16"}, {"bf16": True}, "unpadded", False, "trl"),
    ("gemma2", {"type": "lora", "lora_r": 8, "lora_dropout": 0.05}, {"bf16": True}, "padded", False, "trl"),
    ("phi3", {"type": "lora", "lora_r": 8, "target_modules": ["qkv_proj"]},
     {"bf16": True, "gradient_checkpointing": True}, "unpadded", False, "trl"),
    ("llama", {"type": "qlora", "lora_r": 8}, {}, "padded", False, "trl"),
    ("llama", {"type": "full"}, {}, "padded", True, "trl"),
    # 48 packed examples of 64 tokens: without the block-diagonal mask over the 3072-token row the estimate is 11% low
    ("qwen2", {"type": "lora", "lora_r": 8}, {"bf16": True, "per_device_train_batch_size": 48}, "unpadded", True,
     "trl"),
    # accumulating: the gradients live through the next micro-steps (forward under autocast's weight cache included)
    ("llama", {"type": "full"}, {"bf16": True, "gradient_checkpointing": True, "gradient_accumulation_steps": 2},
     "unpadded", False, "trl"),
    # a recipe with trainer: transformers runs transformers.Trainer (the model's own loss: full logits in fp32)
    ("llama", {"type": "full"}, {"bf16": True}, "padded", False, "transformers"),
    ("qwen2", {"type": "lora", "lora_r": 8}, {"bf16": True, "gradient_checkpointing": True}, "unpadded", False,
     "transformers"),
])
def test_estimate_of_the_runners_step_is_within_5_percent_of_its_tracked_peak(model_dir, text_data, tmp_path, arch,
                                                                               method, training, data, packing,
                                                                               trainer):
    from finetune_helper.measure.runner_step import measure_recipe
    from finetune_helper.recommender.memory import estimate_memory
    from finetune_helper.recommender.model import ModelSpec
    from finetune_helper.train.setup import executed_setup

    if method["type"] == "qlora":
        pytest.importorskip("bitsandbytes")
    r = recipe(model_dir(arch), text_data[data], method=method, training=training, packing=packing, trainer=trainer)
    measured = measure_recipe(r, steps=3, run_dir=tmp_path / "run")
    assert measured.trainer_class == ("SFTTrainer" if trainer == "trl" else "Trainer")
    spec = ModelSpec.from_config(json.loads((model_dir(arch) / "config.json").read_text()))
    accumulation = int(measured.sft_kwargs["gradient_accumulation_steps"])
    for step in measured.steps[1:]:
        shape, padded = step.largest_batch
        setup = executed_setup(r, spec, measured.sft_kwargs, device="cpu", batch_shape=shape, padded=padded)
        predicted = estimate_memory(spec, setup, accumulation=accumulation).allocated_peak
        assert abs(predicted - step.tracked_bytes) / step.tracked_bytes < TOLERANCE, (predicted, step)


@pytest.mark.parametrize("model,method,gc,seq,accumulation", [
    ("meta-llama/Llama-3.1-8B", "lora", False, 1024, 1),
    ("meta-llama/Llama-3.1-8B", "full", True, 1024, 1),
    ("Qwen/Qwen2.5-7B", "lora", True, 2048, 1),
    ("google/gemma-2-9b", "lora", True, 1024, 1),
    # accumulating with tied embeddings: the lm_head's part of the tied gradient waits for the embedding's
    ("meta-llama/Llama-3.2-1B", "full", True, 1024, 2),
])
def test_estimate_of_real_size_steps_is_within_5_percent_under_fake_tensors(model, method, gc, seq, accumulation):
    from finetune_helper.measure.replica import measure_replica
    from finetune_helper.recommender.catalog import find_model
    from finetune_helper.recommender.memory import estimate_memory
    from finetune_helper.recommender.model import ModelSpec
    from finetune_helper.recommender.training_setup import TrainingSetup

    config = {**find_model(model)["config"], "num_hidden_layers": 4}
    spec = ModelSpec.from_config(config)
    setup = TrainingSetup(method=method, micro_batch_size=1, seq_len=seq, gradient_checkpointing=gc, device="cpu",
                          padded=False, attn_implementation=spec.default_attn_implementation)
    tracked = max(measure_replica(config, setup, steps=2, fake=True, accumulation=accumulation))
    predicted = estimate_memory(spec, setup, accumulation=accumulation).allocated_peak
    assert abs(predicted - tracked) / tracked < TOLERANCE, (predicted, tracked)
