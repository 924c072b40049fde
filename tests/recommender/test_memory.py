"""Weights, gradients and optimizer states against the bytes of real tensors of tiny models.

The activation part of the estimate is checked in test_activations.py.
"""

from __future__ import annotations

import pytest

from finetune_helper.measure import tools as measure
from finetune_helper.recommender.memory import estimate_memory, optimizer_state_bytes, weight_bytes
from finetune_helper.recommender.model import ModelSpec
from finetune_helper.recommender.training_setup import TrainingSetup

from ..conftest import tiny_config

#: integration tier (make test-integration): real torch / transformers / trainer / server work
pytestmark = pytest.mark.integration

torch = pytest.importorskip("torch")


def train_one_step(model, optimizer, batch=2, seq=16):
    ids = torch.randint(3, model.config.vocab_size, (batch, seq))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()


def make_optimizer(name: str, params):
    from transformers.optimization import Adafactor

    params = [p for p in params if p.requires_grad]
    if name == "adamw_torch":
        return torch.optim.AdamW(params, lr=1e-3)
    if name == "adamw_torch_fused":
        return torch.optim.AdamW(params, lr=1e-3, fused=True)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-3)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=1e-3)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=1e-3)
    if name == "adafactor":  # as the Trainer builds it for optim="adafactor"
        return Adafactor(params, scale_parameter=False, relative_step=False, lr=1e-3)
    raise AssertionError(name)


def assert_state_bytes_exact(model, spec, setup, optim="adamw_torch"):
    """Weights before, gradients and optimizer states after a real step, each equal to the estimate's bytes."""
    assert measure.parameter_bytes(model) == sum(weight_bytes(spec, setup).values())
    optimizer = make_optimizer(optim, model.parameters())
    train_one_step(model, optimizer)
    est = estimate_memory(spec, setup)
    assert measure.gradient_bytes(model) == est.details["gradients.all"]
    assert measure.optimizer_state_bytes(optimizer) == est.optimizer_states


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "gemma2", "phi3"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32", "fp16"])
def test_full_finetune_bytes_are_exact(model_type, dtype):
    config = tiny_config(model_type, tie_word_embeddings=model_type == "qwen2")
    spec = ModelSpec.from_config(config)
    attn = "eager" if model_type == "gemma2" else "sdpa"  # Gemma 2 has no SDPA path in transformers 5
    setup = TrainingSetup(method="full", dtype=dtype, optim="adamw_torch", attn_implementation=attn)
    # mixed precision keeps fp32 master weights (bf16/fp16 autocast), so the model is loaded in fp32
    model = measure.build_model(config, dtype="fp32", attn_implementation=attn)
    assert_state_bytes_exact(model, spec, setup)


def test_pure_bf16_full_finetune_bytes_are_exact():
    config = tiny_config("llama")
    spec = ModelSpec.from_config(config)
    setup = TrainingSetup(method="full", dtype="bf16", weights_dtype="bf16", optim="adamw_torch")
    model = measure.build_model(config, dtype="bf16", weights_dtype="bf16")
    assert sum(weight_bytes(spec, setup).values()) == 2 * spec.num_parameters()
    assert_state_bytes_exact(model, spec, setup)  # bf16 gradients, bf16 AdamW states: 4 B per parameter


@pytest.mark.parametrize("optim", ["adamw_torch_fused", "sgd", "adagrad", "rmsprop", "adafactor"])
def test_optimizer_states_are_exact(optim):
    config = tiny_config("llama")
    spec = ModelSpec.from_config(config)
    model = measure.build_model(config, dtype="fp32")
    optimizer = make_optimizer(optim, model.parameters())
    train_one_step(model, optimizer)
    assert measure.optimizer_state_bytes(optimizer) == optimizer_state_bytes(spec, TrainingSetup(dtype="fp32", optim=optim))


def test_adafactor_states_are_fp32_even_for_bf16_weights():
    config = tiny_config("llama")
    spec = ModelSpec.from_config(config)
    model = measure.build_model(config, dtype="bf16", weights_dtype="bf16")
    optimizer = make_optimizer("adafactor", model.parameters())
    train_one_step(model, optimizer)
    setup = TrainingSetup(dtype="bf16", weights_dtype="bf16", optim="adafactor")
    assert measure.optimizer_state_bytes(optimizer) == optimizer_state_bytes(spec, setup)


@pytest.mark.parametrize("targets", ["all-linear", ("q_proj", "v_proj")])
@pytest.mark.parametrize("model_type", ["llama", "qwen3", "phi3"])
def test_lora_bytes_are_exact(model_type, targets):
    from peft import LoraConfig, get_peft_model

    config = tiny_config(model_type)
    spec = ModelSpec.from_config(config)
    if model_type == "phi3" and targets != "all-linear":
        targets = ("qkv_proj", "o_proj")
    setup = TrainingSetup(method="lora", dtype="bf16", lora_r=8, lora_target_modules=targets)
    model = measure.build_model(config, dtype="bf16")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=list(targets) if targets !=
                                             "all-linear" else "all-linear", task_type="CAUSAL_LM"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == spec.lora_parameters(8, targets)
    assert {p.dtype for p in trainable} == {torch.float32}  # PEFT's autocast_adapter_dtype
    assert_state_bytes_exact(model, spec, setup)


def _quant_state_bytes(state) -> int:
    tensors = [state.absmax, state.code]
    if state.nested:
        tensors += [state.offset, state.state2.absmax, state.state2.code]
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "phi3"])
def test_qlora_weights_equal_bitsandbytes_nf4_storage(model_type, double_quant):
    """Quantize every linear of a real model with bitsandbytes (its CPU path) and count the bytes it stores."""
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    config = tiny_config(model_type, hidden_size=128, intermediate_size=352, head_dim=32)
    spec = ModelSpec.from_config(config)
    model = measure.build_model(config, dtype="bf16")
    packed = scales = quantized = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lm_head" not in name:  # bnb leaves lm_head unquantized
            q, state = bnb_functional.quantize_4bit(module.weight.data, blocksize=64, quant_type="nf4",
                                                    compress_statistics=double_quant)
            packed += q.numel() * q.element_size()
            scales += _quant_state_bytes(state)
            quantized += module.weight.numel()
    parts = weight_bytes(spec, TrainingSetup(method="qlora", lora_r=8, double_quant=double_quant))
    assert parts["nf4_weights"] == packed
    assert parts["nf4_block_scales"] == scales
    # embeddings, lm_head, norms and biases stay in 16 bit
    unquantized = sum(p.numel() for p in model.parameters()) - quantized
    assert parts["base_weights"] == 2 * unquantized
