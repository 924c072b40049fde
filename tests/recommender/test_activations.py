"""The activation estimate (pure Python) against what torch really saves for backward on tiny random models.

Measurement: ``finetune_helper.measure.tools.saved_tensor_report`` (saved_tensors_hooks, unique storages, parameters
excluded) on CPU, on the model the HF Trainer trains (``measure.model_for_setup``: bf16 / fp16 run forward and loss
under ``torch.autocast``; full fine-tuning keeps fp32 masters unless ``weights_dtype="bf16"``; LoRA bases in the
compute dtype, adapters fp32); the estimate is asked for ``device="cpu"`` (the only CPU/CUDA difference it models
is the dropout mask width).  Never compared against the formula itself.
"""

from __future__ import annotations

import warnings

import pytest

from finetune_helper.recommender.activations import estimate_activations
from finetune_helper.recommender.model import ModelSpec
from finetune_helper.recommender.training_setup import TrainingSetup

#: integration tier (make test-integration): real torch / transformers / trainer / server work
pytestmark = pytest.mark.integration

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
measure = pytest.importorskip("finetune_helper.measure.tools")

TOL = 0.10


def _Setup(**kw) -> TrainingSetup:  # noqa: N802 - a TrainingSetup of the program measured here
    """What ``measure.saved_tensor_report`` runs: the model's own loss (full logits), an unpadded batch, CPU kernels
    (dropout masks in the input dtype) unless a test asks for CUDA's."""
    return TrainingSetup(**{"loss": "logits", "padded": False, "device": "cpu", **kw})

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


def _measure_and_estimate(config: dict, *, dtype="bf16", weights_dtype=None, attn="sdpa", method="full",
                          dropout=0.0, gc=False, batch=2, seq=64, r=8):
    """Measure what the HF Trainer would run for this ``TrainingSetup`` (weights stored and forward + loss run
    under autocast as ``measure.model_for_setup`` builds them) and estimate it."""
    setup = _Setup(method=method, micro_batch_size=batch, seq_len=seq, dtype=dtype, gradient_checkpointing=gc,
                          lora_r=r, lora_dropout=dropout, attn_implementation=attn, weights_dtype=weights_dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = measure.model_for_setup(config, setup)
        # no backward: what is saved is known once the forward ends (and it halves the test time)
        measured = measure.saved_tensor_report(model, batch, seq, gradient_checkpointing=gc, backward=False).total
    est = estimate_activations(ModelSpec.from_config(config), setup)
    return measured, est


def _close(measured: int, estimated: int, tol: float = TOL) -> None:
    err = (estimated - measured) / measured
    assert abs(err) <= tol, f"estimate {estimated} vs measured {measured}: {100 * err:+.1f}%"


#: Trainer configurations: (dtype, weights_dtype, method, dropout, checkpointing).
VARIANTS = {
    "full": ("bf16", None, "full", 0.0, False),          # bf16=True, fp32 masters under bf16 autocast (default)
    "full-gc": ("bf16", None, "full", 0.0, True),
    "pure-bf16": ("bf16", "bf16", "full", 0.0, False),   # bf16 weights (under autocast: a no-op)
    "lora": ("bf16", None, "lora", 0.0, False),          # bf16 base, fp32 adapters, bf16 autocast
    "lora-dropout": ("bf16", None, "lora", 0.1, False),
}


# --------------------------------------------------------------------- per architecture
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_saved_bytes_match_measurement(arch, variant):
    dtype, weights, method, dropout, gc = VARIANTS[variant]
    measured, est = _measure_and_estimate(
        _config(arch), dtype=dtype, weights_dtype=weights, attn=ATTN.get(arch, "sdpa"), method=method, gc=gc,
        dropout=dropout, seq=96 if arch == "mistral" else 64)
    _close(measured, est.saved())


@pytest.mark.parametrize("batch,seq,variant", [(1, 64, "full"), (2, 128, "pure-bf16"), (3, 256, "lora"),
                                               (4, 32, "full-gc")])
def test_batch_and_sequence_scaling_llama(batch, seq, variant):
    dtype, weights, method, dropout, gc = VARIANTS[variant]
    measured, est = _measure_and_estimate(_config("llama"), dtype=dtype, weights_dtype=weights, method=method,
                                          dropout=dropout, gc=gc, batch=batch, seq=seq)
    _close(measured, est.saved())


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("variant", ["full", "pure-bf16", "lora"])
def test_llama_attention_implementations(attn, variant):
    dtype, weights, method, dropout, gc = VARIANTS[variant]
    measured, est = _measure_and_estimate(_config("llama"), dtype=dtype, weights_dtype=weights, method=method,
                                          attn=attn, seq=128)
    _close(measured, est.saved())


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_llama_other_precisions(dtype, attn):
    """fp16: fp32 masters under fp16 autocast; fp32: no autocast."""
    measured, est = _measure_and_estimate(_config("llama"), dtype=dtype, attn=attn)
    _close(measured, est.saved())


@pytest.mark.parametrize("method,dropout,gc", [("full", 0.0, True), ("lora", 0.0, False), ("lora", 0.1, False),
                                               ("lora", 0.1, True)])
def test_fp16_autocast(method, dropout, gc):
    """fp16 full (fp32 masters) and LoRA on an fp16 base, both under fp16 autocast."""
    measured, est = _measure_and_estimate(_config("qwen2"), dtype="fp16", method=method, dropout=dropout, gc=gc)
    _close(measured, est.saved())


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lora_fp32_shares_inputs(dropout):
    """fp32: no cast, so q/k/v adapters save the same input (one storage) unless dropout gives each its own."""
    measured, est = _measure_and_estimate(_config("llama"), dtype="fp32", method="lora", dropout=dropout)
    _close(measured, est.saved())


@pytest.mark.parametrize("variant", ["full", "pure-bf16", "lora"])
@pytest.mark.parametrize("arch,extra", [("mistral", {"sliding_window": 48}),
                                        ("gemma3_text", {"sliding_window": 48})])
def test_sliding_window_shorter_than_sequence(arch, extra, variant):
    """SDPA then gets an explicit mask: repeat_kv copies and the converted s x s mask are saved."""
    dtype, weights, method, dropout, gc = VARIANTS[variant]
    config = {**_COMMON, **CONFIGS["gemma" if arch == "gemma3_text" else arch], "model_type": arch, **extra}
    measured, est = _measure_and_estimate(config, dtype=dtype, weights_dtype=weights, method=method, seq=96)
    _close(measured, est.saved())


def test_lora_with_checkpointing():
    for arch in ("qwen3", "phi3", "gemma2"):
        measured, est = _measure_and_estimate(_config(arch), method="lora", gc=True, dropout=0.1,
                                              attn=ATTN.get(arch, "sdpa"))
        _close(measured, est.saved())
        assert est.lora == 0 and est.recompute > 0 and est.autocast_cache > 0


def test_autocast_facts_the_model_rests_on():
    """Measured: autocast is a no-op for pure-bf16 full fine-tuning, changes what LoRA adapters save (c-byte casts
    instead of fp32), and mixed precision (fp32 masters) saves the same bytes under bf16 and fp16 autocast."""
    config = _config("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")

        def saved(dtype="bf16", weights=None, autocast=True, lora=False):
            model = measure.build_model(config, dtype=dtype, weights_dtype=weights, autocast=autocast)
            if lora:
                model = measure.apply_lora(model, r=8)
            return measure.saved_tensor_report(model, 2, 64, backward=False).total

        assert saved(weights="bf16") == saved(weights="bf16", autocast=False)
        assert saved(weights="fp32") == saved(dtype="fp16") > saved(weights="bf16")
        lora_autocast, lora_plain = saved(lora=True), saved(lora=True, autocast=False)
    assert lora_autocast < lora_plain
    spec = ModelSpec.from_config(config)
    est = estimate_activations(spec, _Setup(method="lora", micro_batch_size=2, seq_len=64, lora_r=8,
                                                   lora_dropout=0.0))
    assert est.saved() == lora_autocast  # the Trainer's case, not the no-autocast one


@pytest.mark.parametrize("method", ["full", "lora"])
def test_autocast_weight_cache_with_checkpointing(method):
    """With checkpointing nothing outside the layers saves the layers' c-byte weight copies, but autocast's cache
    keeps every one alive until the forward (loss included) leaves autocast: ``autocast_cache``."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    config = _config("llama")
    setup = _Setup(method=method, micro_batch_size=2, seq_len=32, gradient_checkpointing=True, lora_r=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = measure.model_for_setup(config, setup)
        measure.enable_checkpointing(model)
        params = {p.untyped_storage().data_ptr() for p in model.parameters() if p.requires_grad}
        casts = []

        class WeightCasts(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if func is torch.ops.aten._to_copy.default and args[0].untyped_storage().data_ptr() in params:
                    casts.append((out.untyped_storage().nbytes(), weakref.ref(out)))
                return out

        with torch.autocast("cpu", dtype=torch.bfloat16):
            with WeightCasts():
                out = model(**measure._make_batch(model, 2, 32, 0))
            alive_in_autocast = sum(n for n, ref in casts if ref() is not None)
        alive_after = sum(n for n, ref in casts if ref() is not None)  # full: lm_head's copy, saved by lm_head
        del out
    est = estimate_activations(ModelSpec.from_config(config), setup)
    assert est.autocast_cache == alive_in_autocast - alive_after > 0


# --------------------------------------------------------------------- structure
def test_doubling_batch_doubles_saved():
    for variant in ("pure-bf16", "full"):
        dtype, weights, method, dropout, gc = VARIANTS[variant]
        m1, e1 = _measure_and_estimate(_config("llama"), weights_dtype=weights, batch=2, seq=128)
        m2, e2 = _measure_and_estimate(_config("llama"), weights_dtype=weights, batch=4, seq=128)
        assert abs(e2.saved() / e1.saved() - m2 / m1) < 0.02


def test_eager_quadratic_term_shows_in_ratio():
    ratios = []
    for seq in (64, 256):
        ms, es = _measure_and_estimate(_config("llama"), attn="sdpa", seq=seq)
        me, ee = _measure_and_estimate(_config("llama"), attn="eager", seq=seq)
        measured_ratio, estimated_ratio = me / ms, ee.saved() / es.saved()
        assert abs(estimated_ratio - measured_ratio) / measured_ratio < 0.05
        ratios.append(measured_ratio)
    assert ratios[1] > ratios[0] > 1.0  # the s x s probabilities grow faster than everything else


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
