"""FSDP's sharding in the estimate against torch's own FSDP2 (``fully_shard`` as accelerate applies it, bf16 mixed
precision), 2 ranks on the CPU with gloo: the live tensor bytes per rank between steps and after backward
(finetune_helper/measure/fsdp_states.py)."""

from __future__ import annotations

import pytest

from finetune_helper.recommender.memory import estimate_memory
from finetune_helper.recommender.model import ModelSpec
from finetune_helper.recommender.training_setup import TrainingSetup

pytestmark = pytest.mark.integration

SMALL = {"model_type": "llama", "vocab_size": 2048, "hidden_size": 256, "intermediate_size": 512,
         "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}


@pytest.mark.slow
def test_fsdp_holds_the_shards_the_estimate_says():
    """fp32 weight shards and AdamW states (1/N) between steps (after the Trainer's zero_grad), plus the fp32
    gradient shards after backward."""
    from finetune_helper.measure.fsdp_states import measure

    spec = ModelSpec.from_config(SMALL)
    est = estimate_memory(spec, TrainingSetup(method="full", micro_batch_size=1, seq_len=32), gpus=2,
                          sharding="fsdp")
    staying = est.weights + est.optimizer_states
    result = measure(SMALL, mixed_precision="bf16-accelerate", wrap="accelerate", processes=2)
    for rank in result["ranks"]:
        assert rank["params"] == spec.num_parameters()
        moments = rank["moments"]
        assert moments["after_zero_grad"]["live"] == pytest.approx(staying, rel=0.001)  # the Trainer zero_grads
        assert moments["after_backward"]["live"] == pytest.approx(staying + est.details["gradients.all"], rel=0.001)
