"""The replica of the runner's step is the runner's step: same tracked peak with real tensors, and the same again
with fake ones (which is what lets real-size models be traced without their weights)."""

from __future__ import annotations

import json

import pytest

from .conftest import recipe

#: integration tier (make test-integration): real torch / transformers / trainer / server work
pytestmark = pytest.mark.integration


@pytest.mark.parametrize("arch,method,training,data", [
    ("llama", {"type": "full"}, {"bf16": True}, "padded"),
    ("qwen2", {"type": "full"}, {"bf16": True}, "packed"),
    ("llama", {"type": "lora", "lora_r": 8, "lora_dropout": 0.05}, {"bf16": True}, "padded"),
    ("qwen2", {"type": "full", "weights_dtype": "bf16"}, {"bf16": True, "gradient_checkpointing": True}, "unpadded"),
    ("phi3", {"type": "lora", "lora_r": 8, "lora_dropout": 0.0}, {}, "unpadded"),
])
def test_replica_tracks_the_same_peak_as_the_runners_own_steps(model_dir, text_data, tmp_path, arch, method,
                                                                training, data):
    from finetune_helper.measure.replica import measure_replica
    from finetune_helper.measure.runner_step import measure_recipe
    from finetune_helper.recommender.model import ModelSpec
    from finetune_helper.train.setup import executed_setup

    packing = data == "packed"
    r = recipe(model_dir(arch), text_data["padded" if packing else data], method=method, training=training,
               packing=packing)
    runner = measure_recipe(r, steps=3, run_dir=tmp_path / "run")
    config = json.loads((model_dir(arch) / "config.json").read_text())
    shape, padded = runner.batches[1]
    setup = executed_setup(r, ModelSpec.from_config(config), runner.sft_kwargs, device="cpu", batch_shape=shape,
                           padded=padded)
    real = measure_replica(config, setup, steps=3)
    # steps 2 and 3 (optimizer states exist) are the steady ones; the runner's batches differ only in token values
    assert abs(real[1] - runner.steps[1].tracked_bytes) / runner.steps[1].tracked_bytes < 0.005
    if not (padded or packing):
        assert measure_replica(config, setup, steps=3, fake=True) == real  # fake tensors: byte for byte


@pytest.mark.parametrize("method", ["full", "lora"])
def test_fake_tensors_keep_tied_weights_one_parameter(method):
    """An embedding shared with the LM head (Qwen2.5-0.5B, Llama-3.2-1B, Gemma) is one parameter: one weight, one
    gradient, one set of optimizer states, with fake tensors as with real ones."""
    from finetune_helper.measure.replica import measure_replica
    from finetune_helper.recommender.training_setup import TrainingSetup

    from .conftest import tiny_arch_config

    config = {**tiny_arch_config("llama"), "tie_word_embeddings": True, "vocab_size": 4096}
    setup = TrainingSetup(method=method, micro_batch_size=2, seq_len=32, device="cpu", padded=False,
                          optim="adamw_torch")
    assert measure_replica(config, setup, steps=2, fake=True) == measure_replica(config, setup, steps=2)
