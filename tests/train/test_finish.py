"""Who may generate for the held-out exact match: never rank 0 alone over sharded parameters, and not before
training under ZeRO-3 (the weights were partitioned at load; the engine that gathers them comes with training)."""

from __future__ import annotations

import pytest

from finetune_helper.recommender.zero import deepspeed_config
from finetune_helper.train.finish import can_generate


@pytest.mark.parametrize("world, kwargs, before, after", [
    ("1", {}, True, True),
    ("2", {}, True, True),  # DDP: every rank holds the whole model
    ("1", {"deepspeed": deepspeed_config("zero2")}, True, True),
    ("1", {"deepspeed": deepspeed_config("zero3")}, False, True),  # ZeRO-Offload on one GPU: partitioned at load
    ("1", {"deepspeed": deepspeed_config("zero3", "all")}, False, True),
    ("2", {"deepspeed": deepspeed_config("zero3")}, False, False),
    ("2", {"fsdp": True}, False, False),
    ("1", {"fsdp": True}, True, True),  # FSDP wraps the model when training starts
])
def test_generation_is_left_out_where_the_parameters_are_not_whole(monkeypatch, world, kwargs, before, after):
    monkeypatch.setenv("WORLD_SIZE", world)
    assert can_generate(kwargs, trained=False) is before
    assert can_generate(kwargs, trained=True) is after
