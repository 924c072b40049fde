"""Measuring tools: build tiny random models and count what one training step really holds.

Used by ``tests/recommender/test_activations.py`` and the benchmarks to check the pure-Python estimates of ``activations.py``
(and the parameter / gradient / optimizer-state counts) against what torch actually allocates.  torch,
transformers and peft are imported inside the functions only, so importing this module stays free.

How activation memory is measured (``saved_tensor_bytes``): a forward pass with labels runs under
``torch.autograd.graph.saved_tensors_hooks``; every tensor autograd saves for backward goes through the pack hook.
We sum the bytes of the *unique storages* (views of one buffer count once), leaving out storages that belong to
parameters (an ``nn.Linear`` saves its weight, which costs nothing extra).  A backward pass then runs so gradients
exist for ``gradient_bytes``.  With non-reentrant gradient checkpointing (transformers 5's default) the tensors
saved inside a checkpointed layer are packed by torch's own, inner hook and never reach ours: what we count is
what stays held from forward to backward (the layer inputs), not the one-layer recompute peak.

Precision as the HF Trainer runs it (``model_for_setup``): with ``bf16=True`` / ``fp16=True`` accelerate wraps the
model's forward -- which computes the loss from ``labels`` -- in ``torch.autocast(device, dtype)`` (``Accelerator.
prepare_model``; its ``convert_outputs_to_fp32`` runs after the loss and saves nothing), so ``saved_tensor_report``
runs the forward and loss under ``torch.autocast("cpu", dtype)`` for a model built with a bf16 / fp16 ``dtype``.
CPU autocast casts the same lower-precision ops as CUDA (linear, matmul, SDPA); its fp32 op list is shorter than
CUDA's, but the modeling code already hands those ops (softmax, log_softmax, RMSNorm's pow/rsqrt) fp32 inputs.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from ..recommender.training_setup import TORCH_DTYPE_NAMES

_DTYPES = TORCH_DTYPE_NAMES


def torch_dtype(name: str):
    """The torch dtype of a precision name (``bf16``) or of a torch dtype name (``bfloat16``)."""
    import torch

    return getattr(torch, _DTYPES.get(name, name))


def hf_config(config: dict[str, Any]):
    """A transformers config object from a ``config.json`` dict (its ``model_type`` picks the class)."""
    from transformers import AutoConfig

    kwargs = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version", "architectures")}
    return AutoConfig.for_model(config["model_type"], **kwargs)


def build_model(config: dict[str, Any], dtype: str = "bf16", attn_implementation: str = "sdpa", seed: int = 0,
                weights_dtype: str | None = None, autocast: bool = True):
    """A randomly initialised ``AutoModelForCausalLM`` from a config dict, on CPU, in train mode.

    ``dtype`` is the compute precision, as Trainer ``bf16=True`` / ``fp16=True`` / neither: with ``autocast`` (the
    Trainer's behaviour: accelerate wraps the forward in ``torch.autocast(dtype)``) ``saved_tensor_report`` runs
    the forward, loss included, under ``torch.autocast("cpu", dtype)`` when ``dtype`` is bf16 / fp16.
    ``weights_dtype`` is the storage of the weights: None means ``dtype`` for bf16 / fp32 and fp32 for fp16
    (fp16 training always keeps fp32 masters).  Mixed-precision full fine-tuning (the default of
    ``TrainingSetup(method="full", dtype="bf16")``) is ``weights_dtype="fp32"``; LoRA / QLoRA bases are stored in
    ``dtype`` (``weights_dtype=dtype``; PEFT keeps the adapters fp32).  ``model_for_setup`` applies those rules.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if weights_dtype is None:
        weights_dtype = "fp32" if dtype == "fp16" else dtype
    if weights_dtype not in _DTYPES:
        raise ValueError(f"weights_dtype must be one of {sorted(_DTYPES)}, got {weights_dtype!r}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(config), attn_implementation=attn_implementation,
                                             dtype=torch_dtype(weights_dtype))
    model.train()
    # read by saved_tensor_report: the autocast dtype name, None for no autocast
    model._finetune_helper_autocast = _DTYPES[dtype] if autocast and dtype != "fp32" else None
    return model


def model_for_setup(config: dict[str, Any], setup, seed: int = 0):
    """The model the HF Trainer trains for a ``TrainingSetup`` (``method`` full / lora; QLoRA's NF4 base needs
    bitsandbytes on CUDA and is not built here): weights stored per ``setup`` (full: fp32 masters unless
    ``weights_dtype="bf16"``; LoRA: the base in ``dtype``, PEFT's fp32 adapters), forward under autocast when
    ``setup.autocast``."""
    if setup.method == "qlora":
        raise ValueError("QLoRA (bitsandbytes NF4) cannot be built on CPU")
    if setup.method == "full":
        weights = "fp32" if setup.master_bytes == 4 else "bf16"
    else:
        weights = setup.dtype
    model = build_model(config, dtype=setup.dtype, attn_implementation=setup.attn_implementation, seed=seed,
                        weights_dtype=weights, autocast=setup.autocast)
    if setup.method == "lora":
        model = apply_lora(model, r=setup.lora_r, dropout=setup.lora_dropout, alpha=setup.lora_alpha,
                           target_modules=setup.lora_target_modules if isinstance(setup.lora_target_modules, str)
                           else list(setup.lora_target_modules))
    return model


def apply_lora(model, r: int = 8, dropout: float = 0.0, target_modules: str | list[str] = "all-linear",
               alpha: int | None = None):
    """Wrap ``model`` with PEFT LoRA (``get_peft_model``, PEFT defaults: adapters in fp32 via
    ``autocast_adapter_dtype=True``).  Returns the ``PeftModel``, in train mode."""
    from peft import LoraConfig, get_peft_model

    autocast = getattr(model, "_finetune_helper_autocast", None)
    cfg = LoraConfig(r=r, lora_alpha=alpha if alpha is not None else 2 * r, lora_dropout=dropout,
                     target_modules=target_modules, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    peft_model.train()
    peft_model._finetune_helper_autocast = autocast
    return peft_model


def _base_model(model):
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def enable_checkpointing(model) -> None:
    """Turn on gradient (activation) checkpointing the way the Trainer does, with transformers' defaults.

    transformers >= 5.2x names it ``activation_checkpointing_enable`` (``gradient_checkpointing_enable`` is a
    deprecated alias); both default to ``use_reentrant=False``.
    """
    import warnings

    base = _base_model(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable()
        else:  # transformers 5.x before the rename
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def disable_checkpointing(model) -> None:
    import warnings

    base = _base_model(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if hasattr(base, "activation_checkpointing_disable"):
            base.activation_checkpointing_disable()
        else:
            base.gradient_checkpointing_disable()


def _param_storages(model) -> set[int]:
    ptrs = set()
    for p in model.parameters():
        ptrs.add(p.untyped_storage().data_ptr())
    return ptrs


@dataclass
class SavedRecord:
    """One unique storage saved for backward during the forward pass."""

    module: str       #: innermost module running when it was first saved ("" outside any module)
    shape: tuple      #: shape of the first tensor seen on that storage
    dtype: str
    nbytes: int       #: bytes of the whole storage


@dataclass
class SavedReport:
    records: list[SavedRecord] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(r.nbytes for r in self.records)

    def by_module(self, depth: int | None = None) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for r in self.records:
            name = r.module
            if depth is not None:
                name = ".".join(name.split(".")[:depth])
            out[name] += r.nbytes
        return dict(out)

    def table(self) -> str:
        lines = [f"{'module':60s} {'shape':28s} {'dtype':10s} {'bytes':>12s}"]
        for r in self.records:
            lines.append(f"{r.module[-60:]:60s} {str(tuple(r.shape)):28s} {r.dtype:10s} {r.nbytes:12d}")
        lines.append(f"{'total':100s} {self.total:12d}")
        return "\n".join(lines)


def _make_batch(model, batch_size: int, seq_len: int, seed: int):
    import torch

    vocab = _base_model(model).config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
    # use_cache=False as the transformers 5 Trainer does (TrainingArguments.use_cache defaults to False and the
    # Trainer writes it into model.config): with the config default (True) a training forward also builds a
    # DynamicCache whose torch.cat copies k and v, which changes what attention saves.
    return {"input_ids": input_ids, "labels": input_ids.clone(), "use_cache": False}


def saved_tensor_report(model, batch_size: int, seq_len: int, *, gradient_checkpointing: bool = False,
                        seed: int = 0, backward: bool = True) -> SavedReport:
    """Run one forward (with labels) and backward; return every unique non-parameter storage saved for backward,
    attributed to the innermost module that was running (for reading what each op keeps)."""
    import torch

    if gradient_checkpointing:
        enable_checkpointing(model)
    else:
        disable_checkpointing(model)
    model.train()
    params = _param_storages(model)
    batch = _make_batch(model, batch_size, seq_len, seed)

    stack: list[str] = []
    handles = []
    for name, module in model.named_modules():
        def pre(mod, args, _name=name):
            stack.append(_name)

        def post(mod, args, out, _name=name):
            if stack and stack[-1] == _name:
                stack.pop()

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))

    seen: dict[tuple, SavedRecord] = {}

    def pack(t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr in params or st.nbytes() == 0:
            return t
        key = (t.device.type, ptr)
        if key not in seen:
            seen[key] = SavedRecord(stack[-1] if stack else "", tuple(t.shape), str(t.dtype).replace("torch.", ""),
                                    st.nbytes())
        return t

    def unpack(t):
        return t

    autocast = getattr(model, "_finetune_helper_autocast", None)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            if autocast:  # the Trainer: accelerate's autocast around the whole forward, loss included
                with torch.autocast("cpu", dtype=torch_dtype(autocast)):
                    out = model(**batch)
            else:
                out = model(**batch)
        loss = out.loss
    finally:
        for h in handles:
            h.remove()
    del out
    if backward:
        loss.backward()
    return SavedReport(list(seen.values()))


def saved_tensor_bytes(model, batch_size: int, seq_len: int, *, gradient_checkpointing: bool = False,
                       seed: int = 0) -> int:
    """Bytes of the unique storages saved for backward by one forward pass with labels (parameters excluded).

    Runs the backward too, so afterwards ``gradient_bytes(model)`` is meaningful.  Clear grads between calls
    (``model.zero_grad(set_to_none=True)``) if that matters to you.
    """
    return saved_tensor_report(model, batch_size, seq_len, gradient_checkpointing=gradient_checkpointing,
                               seed=seed).total


def parameter_bytes(model) -> int:
    """Bytes of all parameters (unique storages: tied embeddings count once)."""
    seen: dict[int, int] = {}
    for p in model.parameters():
        st = p.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def trainable_parameter_bytes(model) -> int:
    seen: dict[int, int] = {}
    for p in model.parameters():
        if p.requires_grad:
            st = p.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def gradient_bytes(model) -> int:
    """Bytes of the ``.grad`` of trainable parameters after a backward (unique storages)."""
    seen: dict[int, int] = {}
    for p in model.parameters():
        if p.requires_grad and p.grad is not None:
            st = p.grad.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of every tensor held in ``optimizer.state`` (unique storages; step counters included)."""
    import torch

    seen: dict[tuple, int] = {}

    def visit(obj):
        if isinstance(obj, torch.Tensor):
            st = obj.untyped_storage()
            seen[(obj.device.type, st.data_ptr(), st.nbytes())] = st.nbytes()
        elif isinstance(obj, dict):
            for v in obj.values():
                visit(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                visit(v)

    for state in optimizer.state.values():
        visit(state)
    return sum(seen.values())
