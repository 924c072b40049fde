"""DeepSpeed ZeRO in the estimate, checked against the installed DeepSpeed's own estimator functions
(``estimate_zero2_model_states_mem_needs``, ``estimate_zero3_model_states_mem_needs``) with the model's parameters
and largest module counted by DeepSpeed's ``model_to_params`` on a meta-device model."""

from __future__ import annotations

import pytest

from finetune_helper.recommender.memory import estimate_memory
from finetune_helper.recommender.model import resolve_model
from finetune_helper.recommender.training_setup import TrainingSetup
from finetune_helper.recommender.zero import largest_module_parameters, zero_states

pytestmark = pytest.mark.integration

deepspeed = pytest.importorskip("deepspeed")

MODELS = ["meta-llama/Llama-3.1-8B", "Qwen/Qwen2.5-7B", "google/gemma-2-9b", "Qwen/Qwen2.5-0.5B"]


def deepspeed_counts(name: str) -> tuple[int, int]:
    """(total parameters, largest module's own parameters) as DeepSpeed's ``model_to_params`` counts them, on the
    model built on the meta device (its total dedupes by data pointer, which meta tensors lack: numel is summed
    over unique parameters instead)."""
    import torch
    from deepspeed.runtime.zero.stage3 import model_to_params
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = resolve_model(name)
    config = AutoConfig.for_model(**spec.config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    _, largest = model_to_params(model)
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    return total, largest


@pytest.mark.parametrize("name", MODELS)
def test_parameter_counts_are_deepspeeds(name):
    spec = resolve_model(name)
    total, largest = deepspeed_counts(name)
    assert spec.num_parameters() == total
    assert largest_module_parameters(spec) == largest


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("gpus, nodes", [(1, 1), (8, 1), (16, 2)])
@pytest.mark.parametrize("offload", ["none", "optimizer"])
def test_zero2_model_states_against_deepspeeds_estimator(name, gpus, nodes, offload):
    """Equal, but for the device staging buffer of the largest parameter that ZeRO-2's offload keeps (measured on
    the engine, test_the_engine_holds_what_the_estimate_says)."""
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    spec = resolve_model(name)
    total, largest = deepspeed_counts(name)
    cpu, gpu = estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=gpus // nodes, num_nodes=nodes,
                                                     cpu_offload=offload == "optimizer")
    ours = zero_states(spec, strategy="zero2", offload=offload, gpus=gpus, trainable=total, frozen_bytes=0,
                       nodes=nodes)
    staging = 2 * largest if offload == "optimizer" else 0
    assert ours.gpu - staging == pytest.approx(gpu, rel=1e-6, abs=8)
    if offload != "none":  # without offload DeepSpeed's host figure is the cold model load, not a training state
        assert ours.host == pytest.approx(cpu, rel=1e-6)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("gpus, nodes", [(1, 1), (8, 1), (16, 2)])
@pytest.mark.parametrize("offload", ["none", "optimizer", "all"])
def test_zero3_model_states_against_deepspeeds_estimator(name, gpus, nodes, offload):
    """Equal, but for the 16-bit gradient partition the engine keeps without offload (2 bytes per parameter / N,
    measured: test_the_engine_holds_what_the_estimate_says), which the estimator leaves out."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    spec = resolve_model(name)
    total, largest = deepspeed_counts(name)
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        total, largest, num_gpus_per_node=gpus // nodes, num_nodes=nodes, cpu_offload=offload != "none",
        cpu_offload_params=offload == "all", zero_init=True)
    ours = zero_states(spec, strategy="zero3", offload=offload, gpus=gpus, trainable=total, frozen_bytes=0,
                       nodes=nodes)
    grad16 = -(-2 * total // gpus) if offload == "none" else 0
    assert ours.gpu - grad16 == pytest.approx(gpu, rel=1e-6, abs=8)
    if offload != "none":
        assert ours.host == pytest.approx(cpu, rel=1e-6)


SMALL = {"model_type": "llama", "vocab_size": 2048, "hidden_size": 256, "intermediate_size": 512,
         "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}


@pytest.mark.slow
@pytest.mark.parametrize("strategy, offload", [("zero2", "none"), ("zero3", "none"), ("zero2", "optimizer"),
                                               ("zero3", "optimizer")])
def test_the_engine_holds_what_the_estimate_says(strategy, offload):
    """The real DeepSpeed engine (deepspeed.initialize, 2 ranks on the CPU with gloo, bf16, the Trainer's bucket
    sizes), live tensor bytes per rank after its last optimizer step -- the states that stay: 16-bit parameters,
    fp32 master partition, Adam's moments (ZeRO-3: and its 16-bit gradient partition); the 32-bit gradients exist
    only during the step -- on the GPU side of the offload, against the estimate's."""
    from finetune_helper.measure.zero_states import measure
    from finetune_helper.recommender.model import ModelSpec
    from finetune_helper.recommender.zero import GRAD_16

    result = measure(SMALL, stage=int(strategy[-1]), offload=offload, processes=2)
    spec = ModelSpec.from_config(SMALL)
    for rank in result["ranks"]:
        assert rank["params"] == spec.num_parameters()
        assert rank["largest_layer_params"] == largest_module_parameters(spec)
        ours = zero_states(spec, strategy=strategy, offload=offload, gpus=2, trainable=spec.num_parameters(),
                           frozen_bytes=0)
        staying = ours.weights + ours.optimizer_states + (
            GRAD_16 * spec.num_parameters() // 2 if strategy == "zero3" and offload == "none" else 0)
        after = rank["moments"]["after_step"]
        measured = after["device"] if offload != "none" else after["live"]
        # ZeRO-3 adds a reduce bucket of hidden^2 16-bit values and whole norm weights: ~4% of this small model
        assert measured == pytest.approx(staying, rel=0.05), (rank["rank"] if "rank" in rank else None, after)
        if offload != "none":
            assert after["host"] <= ours.host / 2  # the estimator's host figure (per node, 1.5x) bounds each rank's


def test_the_estimate_carries_the_states_into_its_peak_and_host_memory():
    """The whole estimate: the states are what ZeRO leaves on the GPU (so ZeRO-3 + offload all holds only the
    gathered module of them), activations as a 16-bit module's, the host memory reported beside the total."""
    spec = resolve_model("meta-llama/Llama-3.1-8B")
    setup = TrainingSetup(method="full", micro_batch_size=1, seq_len=2048, gradient_checkpointing=True)
    ddp = estimate_memory(spec, setup, gpus=8, sharding="ddp")
    zero2 = estimate_memory(spec, setup, gpus=8, sharding="zero2")
    zero3 = estimate_memory(spec, setup, gpus=8, sharding="zero3")
    offloaded = estimate_memory(spec, setup, gpus=8, sharding="zero3", offload="all")
    assert offloaded.total_bytes < zero3.total_bytes < zero2.total_bytes < ddp.total_bytes
    assert offloaded.weights == offloaded.optimizer_states == 0 and offloaded.host_bytes > 0
    assert zero2.host_bytes == zero3.host_bytes == ddp.host_bytes == 0
    assert offloaded.details["zero_gathered_module"] == 4 * largest_module_parameters(spec)
