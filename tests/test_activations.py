"""The activation estimate (pure Python) against what torch really saves for backward on tiny random models.

Measurement: ``finetune_helper.measure.saved_tensor_bytes`` (saved_tensors_hooks, unique storages, parameters
excluded) on CPU; the estimate is asked for ``device="cpu"`` (the only CPU/CUDA difference it models is the dropout
mask width).  Never compared against the formula itself.
"""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import pytest

from finetune_helper.activations import ActivationEstimate, estimate_activations
from finetune_helper.model_spec import ModelSpec
from finetune_helper.training_setup import TrainingSetup

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
measure = pytest.importorskip("finetune_helper.measure")

TOL = 0.10

_COMMON = dict(max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2)

#: tiny configs: GQA (kv heads 2), intermediate ~2.7x hidden, 2-3 layers.
CONFIGS = {
    "llama": dict(model_type="llama", vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2),
    "qwen2": dict(model_type="qwen2", vocab_size=768, hidden_size=192, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2),
    "qwen3": dict(model_type="qwen3", vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    "gemma": dict(model_type="gemma", vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    "gemma2": dict(model_type="gemma2", vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    "phi3": dict(model_type="phi3", vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
    "mistral": dict(model_type="mistral", vocab_size=1024, hidden_size=256, intermediate_size=704,
                    num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2),
}
ATTN = {"gemma2": "eager"}  # Gemma 2 has no SDPA path in transformers 5


def _config(name: str, **extra) -> dict:
    return {**_COMMON, **CONFIGS[name], **extra}


def _measure_and_estimate(config: dict, *, dtype="bf16", attn="sdpa", method="full", dropout=0.0, gc=False,
                          batch=2, seq=64, r=8):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = measure.build_model(config, dtype=dtype, attn_implementation=attn)
        if method != "full":
            model = measure.apply_lora(model, r=r, dropout=dropout)
        measured = measure.saved_tensor_bytes(model, batch, seq, gradient_checkpointing=gc)
    setup = TrainingSetup(method=method, micro_batch_size=batch, seq_len=seq, dtype=dtype, gradient_checkpointing=gc,
                          lora_r=r, lora_dropout=dropout, attn_implementation=attn)
    est = estimate_activations(ModelSpec.from_config(config), setup, device="cpu")
    return measured, est


def _close(measured: int, estimated: int, tol: float = TOL) -> None:
    err = (estimated - measured) / measured
    assert abs(err) <= tol, f"estimate {estimated} vs measured {measured}: {100 * err:+.1f}%"


# --------------------------------------------------------------------- per architecture
@pytest.mark.parametrize("variant", ["full", "full-gc", "lora", "lora-dropout"])
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_saved_bytes_match_measurement(arch, variant):
    method = "lora" if variant.startswith("lora") else "full"
    measured, est = _measure_and_estimate(
        _config(arch), attn=ATTN.get(arch, "sdpa"), method=method, gc=variant.endswith("gc"),
        dropout=0.1 if variant == "lora-dropout" else 0.0, seq=96 if arch == "mistral" else 64)
    _close(measured, est.saved())


@pytest.mark.parametrize("batch,seq", [(1, 64), (2, 128), (3, 256), (4, 32)])
def test_batch_and_sequence_scaling_llama(batch, seq):
    measured, est = _measure_and_estimate(_config("llama"), batch=batch, seq=seq)
    _close(measured, est.saved())


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_llama_attention_implementations(attn, method):
    measured, est = _measure_and_estimate(_config("llama"), attn=attn, method=method, seq=128)
    _close(measured, est.saved())


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_llama_other_precisions(dtype, attn):
    measured, est = _measure_and_estimate(_config("llama"), dtype=dtype, attn=attn)
    _close(measured, est.saved())


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lora_fp32_shares_inputs(dropout):
    """fp32: no cast, so q/k/v adapters save the same input (one storage) unless dropout gives each its own."""
    measured, est = _measure_and_estimate(_config("llama"), dtype="fp32", method="lora", dropout=dropout)
    _close(measured, est.saved())


@pytest.mark.parametrize("arch,extra", [("mistral", {"sliding_window": 48}),
                                        ("gemma3_text", {"sliding_window": 48})])
def test_sliding_window_shorter_than_sequence(arch, extra):
    """SDPA then gets an explicit mask: repeat_kv copies and the converted s x s mask are saved."""
    config = {**_COMMON, **CONFIGS["gemma" if arch == "gemma3_text" else arch], "model_type": arch, **extra}
    measured, est = _measure_and_estimate(config, seq=96)
    _close(measured, est.saved())


def test_qwen3_and_phi3_lora_with_checkpointing():
    for arch in ("qwen3", "phi3"):
        measured, est = _measure_and_estimate(_config(arch), method="lora", gc=True)
        _close(measured, est.saved())
        assert est.lora == 0 and est.recompute > 0


# --------------------------------------------------------------------- structure
def test_doubling_batch_doubles_saved():
    spec = ModelSpec.from_config(_config("llama"))
    for method, gc in (("full", False), ("lora", False), ("full", True)):
        one = estimate_activations(spec, TrainingSetup(method=method, micro_batch_size=2, seq_len=128,
                                                       gradient_checkpointing=gc)).saved()
        two = estimate_activations(spec, TrainingSetup(method=method, micro_batch_size=4, seq_len=128,
                                                       gradient_checkpointing=gc)).saved()
        assert abs(two / one - 2) < 0.02
    m1, e1 = _measure_and_estimate(_config("llama"), batch=2, seq=128)
    m2, e2 = _measure_and_estimate(_config("llama"), batch=4, seq=128)
    assert abs(m2 / m1 - 2) < 0.02 and abs(e2.saved() / e1.saved() - m2 / m1) < 0.02


def test_eager_quadratic_term_shows_in_ratio():
    ratios = []
    for seq in (64, 256):
        ms, es = _measure_and_estimate(_config("llama"), attn="sdpa", seq=seq)
        me, ee = _measure_and_estimate(_config("llama"), attn="eager", seq=seq)
        measured_ratio, estimated_ratio = me / ms, ee.saved() / es.saved()
        assert abs(estimated_ratio - measured_ratio) / measured_ratio < 0.05
        ratios.append(measured_ratio)
    assert ratios[1] > ratios[0] > 1.0  # the s x s probabilities grow faster than everything else


def test_real_size_terms():
    """Llama-3-8B shapes at seq 2048: the structural terms that tiny models barely show."""
    spec = ModelSpec.from_config({"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
                                  "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                                  "num_key_value_heads": 8, "max_position_embeddings": 131072})
    b, s = 1, 2048
    full = estimate_activations(spec, TrainingSetup(micro_batch_size=b, seq_len=s))
    # loss: fp32 log-softmax of b*s*V plus int64 labels and a scalar
    assert full.logits == 2 * b * s * 4096 + 4 * b * s * 128256 + 8 * b * s + 4
    assert full.logits_transient == 8 * b * s * 128256
    # per layer, bf16: norms 2*(6h+4) + linear inputs 4h + q,k,v,o 2*(2*4096+2*1024) + lse 4*32 + mlp 8*I, per token
    per_token = 2 * (6 * 4096 + 4) + 4 * 4096 + 2 * (2 * 4096 + 2 * 1024) + 4 * 32 + 8 * 14336
    assert full.layers == 32 * b * s * per_token
    eager = estimate_activations(spec, TrainingSetup(micro_batch_size=b, seq_len=s, attn_implementation="eager"))
    assert eager.layers - full.layers > 32 * 6 * b * 32 * s * s  # fp32 softmax + bf16 probs per head
    gc = estimate_activations(spec, TrainingSetup(micro_batch_size=b, seq_len=s, gradient_checkpointing=True))
    assert gc.layers == 32 * 2 * b * s * 4096 and gc.recompute == full.layers // 32
    assert gc.peak_extra() == max(gc.recompute, gc.logits_transient)
    lora = estimate_activations(spec, TrainingSetup(method="lora", micro_batch_size=b, seq_len=s, lora_r=16))
    assert 0 < lora.lora and lora.layers < full.layers
    qlora = estimate_activations(spec, TrainingSetup(method="qlora", micro_batch_size=b, seq_len=s, lora_r=16))
    assert qlora.layers > lora.layers and qlora.lora == lora.lora  # MatMul4Bit keeps the base inputs
    cuda = estimate_activations(spec, TrainingSetup(method="lora", micro_batch_size=b, seq_len=s, lora_dropout=0.1))
    cpu = estimate_activations(spec, TrainingSetup(method="lora", micro_batch_size=b, seq_len=s, lora_dropout=0.1),
                               device="cpu")
    assert cpu.lora > cuda.lora  # CUDA's fused dropout keeps a 1-byte mask
    d = full.as_dict()
    assert d["saved"] == full.saved() and set(ActivationEstimate.__dataclass_fields__) <= set(d)


def test_activations_module_imports_no_torch():
    tree = ast.parse(Path(__file__).resolve().parents[1].joinpath("finetune_helper", "activations.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    assert not names & {"torch", "transformers", "peft", "accelerate"}


def test_measure_helpers_count_grads_and_optimizer_state():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = measure.build_model(_config("llama"), dtype="fp32")
        measure.saved_tensor_bytes(model, 1, 16)
    n = sum(p.numel() for p in model.parameters())
    assert measure.parameter_bytes(model) == 4 * n
    assert measure.gradient_bytes(model) == 4 * n
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt.step()
    assert measure.optimizer_state_bytes(opt) >= 2 * 4 * n
