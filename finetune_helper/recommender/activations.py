"""Activation memory of one training micro-step of a decoder LLM, from its shapes (pure Python, no torch).

The method follows Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"
(arXiv:2205.05198, section 4.1): walk the forward pass op by op and add up the tensors each op saves for its
backward.  Their closed form (``sbh(34 + 5as/h)`` per layer for GPT-2-style fp16 layers) does not describe the
models people fine-tune today, so every term below was read off the transformers 5 modeling code (``models/llama/
modeling_llama.py``, ``integrations/sdpa_attention.py``, ``loss/loss_utils.py``, PEFT ``tuners/lora/layer.py``,
bitsandbytes ``MatMul4Bit``) and checked by measuring what ``torch.autograd.graph.saved_tensors_hooks`` sees
(``finetune_helper.measure.tools``; ``tests/recommender/test_activations.py``).

Notation: ``b`` micro batch, ``s`` sequence length, ``N = b*s`` tokens, ``h`` hidden, ``I`` intermediate, ``qd``
= heads*head_dim, ``kvd`` = kv_heads*head_dim, ``nh`` heads, ``V`` vocabulary, ``r`` LoRA rank.  Byte widths:
``c`` the compute dtype of activations (2 for bf16/fp16, 4 for fp32) and ``res`` the residual stream dtype (equal
to ``c`` except mixed-precision full fine-tuning, where fp32 weights under autocast keep the residual stream fp32).

Precision is what the HF Trainer runs (``training_setup``): with ``bf16=True`` / ``fp16=True`` accelerate wraps
the model's forward -- the loss included, since the model computes it from ``labels`` -- in ``torch.autocast(dtype)``
(and converts the outputs to fp32 afterwards, after the loss: a logits-sized fp32 copy no backward keeps, freed
with the outputs before ``backward``).  Autocast casts the inputs of its lower-precision ops (``linear``,
``matmul``, ``scaled_dot_product_attention``) to ``dtype``: each op makes its own copy of an input of another
dtype and saves that copy, and the first cast of a trainable leaf weight is cached until the autocast region ends
(the linear saves the cached copy).  Casting a tensor that already has ``dtype`` is a no-op.  Per case (all
measured, see the tests):

* full fine-tuning, fp32 master weights under bf16 or fp16 autocast (the default; ``autocast_full`` below):
  embeddings, residual stream, RMSNorms and rotary cos/sin are fp32 (``res`` = 4); every trainable linear saves
  its own c-byte cast of its input (q, k and v each cast the same fp32 norm output) and the cached c-byte copy of
  its weight, lm_head included; q/k come out of RoPE in fp32 (c-byte projection times fp32 cos) and SDPA saves
  its own c-byte casts, so the attention and MLP terms keep width ``c``.  bf16 and fp16 measure byte-identical.
* full fine-tuning with pure bf16 weights under bf16 autocast: every cast is a no-op and autocast changes nothing
  (measured byte-identical to the same model without autocast, every architecture).  The ops autocast runs in
  fp32 (CUDA's list: softmax, log_softmax, pow, rsqrt, nll_loss, cross_entropy...) already get fp32 inputs from
  the modeling code (RMSNorm's ``.to(float32)``, eager softmax's ``dtype=float32``, the loss' ``logits.float()``).
* LoRA / QLoRA with a bf16 / fp16 base under autocast: the frozen base and everything outside the adapters are as
  without autocast (already in ``dtype``); each adapter gets PEFT's fp32 cast of its input, then autocast's c-byte
  cast of that for lora_A (saved) and c-byte copies of A and B (saved): see ``lora_bytes``.  (Without autocast,
  lora_A would save the fp32 cast instead: ~25% more than the Trainer really holds on a tiny Llama.)
* fp32: no autocast.

Rules autograd follows that decide most terms:

* An op saves an operand only for the gradient of *another* input that requires grad: ``weight * x`` saves ``x``
  only when ``weight`` is trainable; a frozen ``nn.Linear`` (LoRA base) saves its weight (a parameter, free) but
  not its input.  Ops on tensors that do not require grad save nothing (LoRA: the first layer's input norm).
* Elementwise ops with a Python scalar (``* scaling``, ``/ softcap``) and additions (residuals, masks) save nothing.
* ``x.to(dtype)`` saves nothing, but the op after it saves the new copy: a separate storage.

transformers 5 facts this depends on: the Trainer trains with ``use_cache=False`` (``TrainingArguments.use_cache``
defaults to False); gradient checkpointing is non-reentrant by default (``activation_checkpointing_enable`` passes
``use_reentrant=False``) and checkpoints each ``GradientCheckpointingLayer`` (decoder layer), so only each layer's
input stays held; ``ForCausalLMLoss`` upcasts the logits to fp32 before ``cross_entropy``; SDPA gets no mask (it
uses ``is_causal``) unless the layer is a sliding-window layer shorter than the sequence (or the batch is padded).

Device: the estimate is for CUDA kernels.  ``device="cpu"`` gives the CPU kernels' bytes where they differ
(only the dropout mask: CUDA's fused dropout keeps a 1-byte bool mask, CPU keeps a mask in the input dtype), which
is what the tests measure against.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .model import ModelSpec
from .training_setup import DTYPE_BYTES, TrainingSetup

#: int64 token ids / labels.
_ID_BYTES = 8
#: fp32: RMSNorm upcasts, rsqrt, logsumexp, softmax, the loss' log-softmax.
_F32 = 4


@dataclass(frozen=True)
class ActivationEstimate:
    """Bytes of activations for one micro-step; see the module docstring for the derivation."""

    #: bytes saved for backward by all decoder layers, held from forward to backward (with gradient checkpointing:
    #: only what stays held, i.e. the checkpointed layer inputs).
    layers: int
    #: extra bytes LoRA layers save (under autocast: lora_A's c-byte input casts and copies of A and B, dropout
    #: masks, A outputs; fp32: fp32 inputs); 0 for full. Held like ``layers`` (with checkpointing: 0, recomputed).
    lora: int
    #: held saved tensors outside the layers: token ids (embedding), rotary cos/sin, final norm.
    outside_layers: int
    #: held saved tensors of the logits/loss path: lm_head input (mixed precision: its c-byte cast, and the cached
    #: c-byte copy of the lm_head weight), the fp32 log-softmax of cross-entropy, labels, Gemma-2 soft-capping
    #: tanh output.
    logits: int
    #: with gradient checkpointing: the bytes one layer's recompute re-creates during backward (0 without).
    recompute: int
    #: short-lived peak on the logits path not held for backward: max(forward: logits + their fp32 copy,
    #: backward: the fp32 logits gradient coming out of nll_loss + the one log_softmax backward makes).
    logits_transient: int
    #: with checkpointing under autocast: autocast's cache of c-byte copies of the trainable layer weights (mixed-
    #: precision full: every decoder linear; LoRA: the adapters' A and B) lives until the forward (loss included)
    #: ends although no saved tensor outside the checkpoints holds it; 0 otherwise.
    autocast_cache: int = 0
    #: the final norm's part of ``outside_layers``: freed by its backward, before the decoder layers' backward.
    final_norm: int = 0

    def saved(self) -> int:
        """What saved_tensors_hooks counts (unique storages, parameters excluded), held into the backward."""
        return self.layers + self.lora + self.outside_layers + self.logits

    def as_dict(self) -> dict[str, int]:
        d = asdict(self)
        d["saved"] = self.saved()
        return d


# --------------------------------------------------------------------- helpers
def _attn_impl(spec: ModelSpec, setup: TrainingSetup) -> str:
    """The attention implementation that really runs (Gemma 2 has no SDPA path: eager)."""
    impl = setup.attn_implementation
    traits = spec.traits
    if traits and impl not in traits.attn_implementations:
        impl = traits.attn_implementations[0]
    return impl


def _layer_types(spec: ModelSpec) -> list[str]:
    """``sliding_attention`` / ``full_attention`` per layer, as the config classes default them."""
    cfg, n = spec.config, spec.num_hidden_layers
    types = cfg.get("layer_types")
    if types and len(types) >= n:
        return list(types[:n])
    mt = spec.model_type
    if mt == "mistral":
        return ["sliding_attention" if cfg.get("sliding_window", 4096) else "full_attention"] * n
    if mt == "gemma2":
        return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    if mt == "gemma3_text":
        pattern = cfg.get("sliding_window_pattern", 6) or 6
        return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    if mt in ("qwen2", "qwen3") and cfg.get("use_sliding_window"):
        start = cfg.get("max_window_layers", n)
        return ["sliding_attention" if i >= start else "full_attention" for i in range(n)]
    return ["full_attention"] * n


def _sliding_window(spec: ModelSpec) -> int | None:
    default = 4096 if spec.model_type in ("mistral", "gemma2", "gemma3_text") else None
    return spec.config.get("sliding_window", default)


def _norm(rows: int, width: int, *, input_grad: bool, trainable: bool, gemma: bool, in_bytes: int) -> int:
    """One RMSNorm over ``rows`` vectors of ``width``.

    Llama: ``x.to(fp32)``; ``pow(2)`` saves the fp32 x (4*rows*width; a copy, or x itself when it is fp32 already);
    ``x * rsqrt(var+eps)`` saves x (same storage) and the rsqrt (4*rows); ``weight * normalized.to(in_dtype)``
    saves the normalized tensor in the input dtype only when the weight is trainable.
    Gemma: ``x.float()`` then ``normalized * (1 + weight.float())`` in fp32: saves the fp32 ``1 + w`` (4*width)
    and, when the weight is trainable, the fp32 normalized tensor (4*rows*width); the output is cast back after.
    Nothing is saved when the input does not require grad (LoRA, first layer, no checkpointing).
    """
    if not input_grad:
        return 0
    n = _F32 * rows * width + _F32 * rows
    if gemma:
        n += _F32 * width + (_F32 * rows * width if trainable else 0)
    elif trainable:
        n += in_bytes * rows * width
    return n


# --------------------------------------------------------------------- the step's shape
@dataclass(frozen=True)
class _Step:
    """The sizes and switches every part of the estimate reads, derived once from the spec and the setup."""

    spec: ModelSpec
    setup: TrainingSetup
    device: str
    b: int
    s: int
    impl: str
    #: bytes of an activation element in the compute dtype
    c: int
    #: mixed-precision full fine-tuning: fp32 master weights under bf16/fp16 autocast.  Embeddings, norms and
    #: residual adds run in fp32; every autocast op (linear, SDPA) casts its fp32 inputs to c bytes -- a new copy
    #: per op -- and autocast caches one c-byte copy of each trainable weight, which the linear saves.  Pure-bf16
    #: weights under bf16 autocast: all casts are no-ops (the plain bf16 model).  LoRA/QLoRA store the frozen base
    #: in the compute dtype, so there only the (fp32) adapters go through autocast casts (:func:`_lora_bytes`).
    autocast_full: bool
    layer_types: tuple[str, ...]
    window: int | None

    @classmethod
    def of(cls, spec: ModelSpec, setup: TrainingSetup, device: str) -> _Step:
        c = DTYPE_BYTES[setup.dtype]
        return cls(spec=spec, setup=setup, device=device, b=setup.micro_batch_size, s=setup.seq_len,
                   impl=_attn_impl(spec, setup), c=c,
                   autocast_full=setup.autocast and not setup.is_peft and not setup.pure_bf16,
                   layer_types=tuple(_layer_types(spec)), window=_sliding_window(spec))

    @property
    def N(self) -> int:  # noqa: N802 - tokens per micro-step, the formulas' N
        return self.b * self.s

    @property
    def res(self) -> int:
        """Bytes of the residual stream (fp32 under mixed-precision full fine-tuning)."""
        return _F32 if self.autocast_full else self.c

    @property
    def full(self) -> bool:
        return not self.setup.is_peft

    @property
    def gemma(self) -> bool:
        return bool(self.spec.traits and self.spec.traits.gemma_norm)

    @property
    def fused(self) -> bool:
        return bool(self.spec.traits and self.spec.traits.fused_projections)

    @property
    def mask_bytes(self) -> int:
        """A dropout mask element: a bool on CUDA, the input dtype (fp32 here) on the CPU."""
        return 1 if self.device == "cuda" else _F32

    @property
    def saves_base_inputs(self) -> bool:
        """Full fine-tuning's linears save their inputs; so does QLoRA's MatMul4Bit on CUDA (in ctx.tensors).
        bitsandbytes' CPU path keeps nothing for the frozen 4-bit base (measured: benchmarks/estimate_vs_runner.py)."""
        return self.full or (self.setup.method == "qlora" and self.device == "cuda")


# --------------------------------------------------------------------- one decoder layer
def _norms_and_linear_inputs(st: _Step, input_grad: bool) -> int:
    """Norms: input_layernorm, post_attention_layernorm (+ Gemma 2/3 pre/post_feedforward_layernorm); the first
    norm's input is the layer input, every other norm's input already requires grad.  Linear inputs (full: each
    trainable Linear saves its input for the weight gradient; q/k/v, and gate/up, read the same norm output, one
    storage.  Mixed precision: each Linear saves its own c-byte cast of the fp32 norm output, plus the cached c-byte
    weight copy).  QLoRA: bitsandbytes MatMul4Bit keeps its input in ctx.tensors whenever the input requires grad --
    held like full FT's, though saved_tensors_hooks cannot see it.  LoRA: the frozen base linears save no input.
    q/k RMSNorm per head (Qwen3, Gemma 3) on the projections' outputs (dtype c)."""
    spec, N, h, c = st.spec, st.N, st.spec.hidden_size, st.c
    norms_per_layer = spec.traits.norms_per_layer if spec.traits else 2
    n = _norm(N, h, input_grad=input_grad, trainable=st.full, gemma=st.gemma, in_bytes=st.res)
    n += (norms_per_layer - 1) * _norm(N, h, input_grad=True, trainable=st.full, gemma=st.gemma, in_bytes=st.res)
    n_attn_in, n_mlp_in = (1, 1) if st.fused else (3, 2)
    if st.saves_base_inputs:
        if st.autocast_full:
            n += (n_attn_in + n_mlp_in) * c * N * h
            n += c * sum(lin.weight_numel for lin in spec.layer_linears())  # autocast's weight copies
        else:
            if input_grad:  # (QLoRA, first layer, no checkpointing: MatMul4Bit keeps nothing)
                n += c * N * h  # attention input (the input_layernorm output)
            n += c * N * h  # MLP input (the post_attention / pre_feedforward norm output)
    if spec.traits and spec.traits.qk_norm:
        nh, kvh, hd = spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim
        n += _norm(N * nh, hd, input_grad=True, trainable=st.full, gemma=st.gemma, in_bytes=c)
        n += _norm(N * kvh, hd, input_grad=True, trainable=st.full, gemma=st.gemma, in_bytes=c)
    # (RoPE: q*cos + rotate_half(q)*sin saves only cos/sin, constants counted once outside the layers.)
    return n


def _eager_attention(st: _Step) -> int:
    """repeat_kv copies k and v to nh heads (expand+reshape); matmul(q, k^T) saves q and k_rep, softmax(fp32) saves
    its fp32 output (b*nh*s*s*4), .to(c) makes the probs that matmul(probs, v_rep) saves (b*nh*s*s*c) with v_rep;
    the output (b,nh,s,hd) is transposed and made contiguous for o_proj (counted by the caller)."""
    spec, N, c, b, s = st.spec, st.N, st.c, st.b, st.s
    nh, qd, kvd = spec.num_attention_heads, spec.q_dim, spec.kv_dim
    v_bytes = c * N * qd
    if st.fused and spec.num_attention_heads == spec.num_key_value_heads:
        v_bytes = c * N * (qd + 2 * kvd)  # v is a slice of the fused qkv output: its whole storage
    n = c * N * qd + c * N * qd + v_bytes  # q, k_rep, v_rep
    n += _F32 * b * nh * s * s
    if c != _F32:  # in fp32, .to(query.dtype) is a no-op: the probs are the softmax output itself
        n += c * b * nh * s * s
    softcap = spec.config.get("attn_logit_softcapping", 50.0 if spec.model_type == "gemma2" else None)
    if softcap:
        n += c * b * nh * s * s  # Gemma 2: tanh(scores / cap) saves its output
    return n


def _sdpa_attention(st: _Step, layer_type: str) -> int:
    """SDPA flash / memory-efficient kernels (and flash_attention_2) keep no s x s matrix: they save q, k, v, the
    output and the fp32 logsumexp (b*nh*s).  Without a mask transformers passes enable_gqa=True (no repeat_kv
    copies).  A padded batch, packed rows and a sliding-window layer shorter than the sequence get an explicit
    mask: repeat_kv copies k and v, and SDPA converts the bool mask to an additive mask in the compute dtype
    (b*1*s*s*c per layer) that its backward keeps.  flash_attention_2 handles the window in-kernel (no mask)."""
    spec, N, c, b, s = st.spec, st.N, st.c, st.b, st.s
    nh, qd, kvd = spec.num_attention_heads, spec.q_dim, spec.kv_dim
    n_rep = nh // spec.num_key_value_heads
    # an explicit mask: a padded batch (transformers' create_causal_mask keeps the padding), packed rows (the
    # position_ids restart per example: masking_utils.find_packed_sequence_indices makes the mask block-diagonal;
    # only a varlen kernel such as flash_attention_2 goes without), or a sliding-window layer shorter than the sequence
    window = layer_type == "sliding_attention" and st.window is not None and s > st.window
    masked = st.impl == "sdpa" and (st.setup.padded or st.setup.packing or window)
    n = c * N * qd  # q after RoPE
    if masked:
        n += 2 * c * N * (qd if n_rep > 1 else kvd) + c * b * s * s
    else:
        n += c * N * kvd  # k after RoPE
        # v is a view of v_proj's output; Phi-3's v is a slice of the fused qkv output: its whole storage.
        n += c * N * (qd + 2 * kvd) if st.fused else c * N * kvd
    n += c * N * qd  # attention output (saved by SDPA; o_proj's input is the same storage, see _layer_bytes)
    lse_s = s if (st.device == "cpu" or st.impl == "flash_attention_2" or not masked) else -(-s // 32) * 32
    return n + _F32 * b * nh * lse_s


def _mlp(st: _Step) -> int:
    """Gated MLP: act(gate(x)) * up(x).  SiLU / GELU-tanh save their input (gate output, N*I); the product saves
    both factors (act output and up output); down_proj saves its input (full).  Phi-3: gate and up are chunks of
    the fused gate_up output, so the activation's saved input is the whole 2*N*I storage and the saved up shares
    it."""
    NI = st.c * st.N * st.spec.intermediate_size
    n = NI * (2 if st.fused else 1)  # act input (Phi-3: whole gate_up)
    n += NI  # act output
    if not st.fused:
        n += NI  # up output
    if st.saves_base_inputs:
        n += NI  # down_proj input (the product)
    return n


def _layer_bytes(st: _Step, first_layer: bool, layer_type: str) -> int:
    """What one decoder layer's base ops save for backward."""
    # the layer's input requires grad unless it is the frozen embedding's output (LoRA without checkpointing;
    # with checkpointing transformers calls enable_input_require_grads()).
    input_grad = st.full or st.setup.gradient_checkpointing or not first_layer
    n = _norms_and_linear_inputs(st, input_grad)
    if st.impl == "eager":
        n += _eager_attention(st)
        o_copy = True
    else:
        n += _sdpa_attention(st, layer_type)
        # The output follows q's memory layout.  RoPE applied elementwise to the (b,s,nh,hd)-major projection
        # keeps q token-major, so transpose(1,2).contiguous() is a no-op view and o_proj saves the same storage;
        # Phi-3's partial-RoPE torch.cat makes q head-major, so o_proj gets (and saves) a copy.
        o_copy = st.fused
    if o_copy and st.saves_base_inputs:
        n += st.c * st.N * st.spec.q_dim  # o_proj input (a LoRA base o_proj does not save it; its lora_A may)
    return n + _mlp(st)


#: where each adapted linear reads its input (adapters at one site share it)
_LORA_SITE = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "qkv_proj": "attn", "o_proj": "o",
              "gate_proj": "mlp", "up_proj": "mlp", "gate_up_proj": "mlp", "down_proj": "down"}


def _lora_bytes(st: _Step, first_layer: bool) -> int:
    """What one layer's LoRA adapters save; 0 for full fine-tuning."""
    setup, N, c = st.setup, st.N, st.c
    if st.full:
        return 0
    # the first layer's q/k/v adapters read the normed embeddings, which do not require grad without
    # checkpointing: dropout on them saves no mask, and lora_A saves no weight copy for an input gradient
    # (it still saves its input for A's gradient).
    frozen_attn_input = first_layer and not setup.gradient_checkpointing
    r = setup.lora_r
    # PEFT keeps adapters in fp32; TRL's SFTTrainer casts a quantized model's trainable parameters to bf16
    adapter = 2 if setup.method == "qlora" else _F32
    o_input_is_a_copy = st.impl == "eager" or st.fused  # o_proj's input is its own contiguous copy
    n = 0
    shared_sites: set[str] = set()
    for lin in st.spec.lora_linears(setup.lora_target_modules):
        fin, fout = lin.in_features, lin.out_features
        input_grad = not (frozen_attn_input and _LORA_SITE.get(lin.name) == "attn")
        if setup.autocast and adapter != c:
            # bf16 / fp16 base under the Trainer's autocast: PEFT casts x to fp32 (the adapters' dtype,
            # autocast_adapter_dtype=True) -- a copy per adapter -- and autocast casts it back to the compute
            # dtype for lora_A (another copy per adapter), which saves that copy (c*N*fin, for A's gradient)
            # and, when its input requires grad, autocast's cached c-byte copy of A (c*r*fin).  lora_B saves
            # the c-byte A output (c*N*r) and the cached copy of B (c*r*fout; A's output requires grad).  The
            # fp32 cast itself is saved by nothing: freed after lora_A.  Dropout acts on the fp32 cast and
            # saves its mask (CUDA bool, CPU fp32); lora_A then saves the c-byte cast of dropout's output.
            n += c * N * fin + c * N * r + c * r * fout
            if input_grad:
                n += c * r * fin
                if setup.lora_dropout > 0:
                    n += st.mask_bytes * N * fin
            continue
        # The adapters' dtype is the compute dtype (fp32 runs; QLoRA's bf16 adapters under bf16 autocast), or there
        # is no autocast (QLoRA's bf16 adapters in an fp32 run: PEFT casts x to bf16, a copy per adapter).
        mask = 1 if st.device == "cuda" else adapter
        if setup.lora_dropout > 0:
            # lora_dropout(x): saves its mask (CUDA bool, CPU input dtype) and its output is what lora_A saves
            # (a new tensor per adapter).
            n += adapter * N * fin
            if input_grad:
                n += mask * N * fin
        elif adapter != c:
            n += adapter * N * fin  # lora_A saves PEFT's cast of x: one per adapter
        else:
            # lora_A saves its input itself, shared by adapters reading the same tensor (q/k/v, gate/up);
            # o_proj's input is SDPA's saved output (already counted) unless it is a copy.
            site = _LORA_SITE.get(lin.name, lin.name)
            if site not in shared_sites:
                shared_sites.add(site)
                if site != "o" or o_input_is_a_copy:
                    n += adapter * N * fin
        n += adapter * N * r  # lora_B saves lora_A's output (N*r)
    return n


# --------------------------------------------------------------------- outside the layers
def _outside_bytes(st: _Step) -> int:
    """Held saved tensors outside the decoder layers: token ids, Gemma's embedding scale, rotary cos/sin, final
    norm."""
    spec, N = st.spec, st.N
    n = 0
    if st.full:
        n += _ID_BYTES * N  # nn.Embedding saves the token ids for its weight gradient
    if spec.model_type.startswith("gemma") and st.full:
        # Gemma scales the embeddings inside the embedding module (0-dim normalizer saved for the weight gradient);
        # LoRA + checkpointing makes only the scaled output require grad (enable_input_require_grads): no save.
        n += st.res
    if not st.setup.gradient_checkpointing:
        # rotary cos/sin, (1, s, rotary_dim) in the embeddings' dtype, saved by RoPE's q*cos / rotate_half(q)*sin;
        # shared by all layers.  Gemma 3 has a local and a global rotary embedding.  With checkpointing no op
        # outside the checkpointed layers saves them (the checkpoint closures keep them; a few MB at most).
        rot = int(spec.head_dim * (spec.config.get("partial_rotary_factor") or 1.0))
        pairs = len(set(st.layer_types)) if spec.model_type == "gemma3_text" else 1
        n += pairs * 2 * st.s * rot * st.res
    return n + _final_norm_bytes(st)


def _final_norm_bytes(st: _Step) -> int:
    """The final norm's saved tensors (its input always requires grad)."""
    return _norm(st.N, st.spec.hidden_size, input_grad=True, trainable=st.full, gemma=st.gemma, in_bytes=st.res)


def _logits_bytes(st: _Step) -> tuple[int, int]:
    """(held, transient) bytes of the lm_head and loss path."""
    spec, N, c, h, V = st.spec, st.N, st.c, st.spec.hidden_size, st.spec.vocab_size
    held = 0
    if st.full:
        if st.autocast_full:
            held += c * N * h + c * V * h  # c-byte cast of the final norm output + cached copy of lm_head weight
        else:
            held += c * N * h  # lm_head saves its input (the final norm output) for its weight gradient
    # (LoRA/QLoRA: lm_head is frozen and not quantized: saves no input.)
    if spec.final_logit_softcapping:
        held += c * N * V  # Gemma 2: tanh(logits / cap) saves its output
    # ForCausalLMLoss: logits.float() (no save) -> cross_entropy = log_softmax (saves its fp32 output, N*V*4)
    # + nll_loss (saves the same output, the shifted int64 labels and a 0-dim fp32 total_weight).  The labels are
    # ``pad(labels, (0, 1))[..., 1:].contiguous()``: with one sequence the slice is contiguous already, a view of
    # the padded b*(s+1) storage.
    held += _F32 * N * V + _ID_BYTES * (N + (1 if st.b == 1 else 0)) + _F32
    # Transient: forward holds the logits (c) and their fp32 copy (4, none when already fp32) while log_softmax
    # writes its output; backward holds nll_loss's fp32 gradient (4) and log_softmax's fp32 input gradient (4).
    transient = max((c + (_F32 if c != _F32 else 0)), 2 * _F32) * N * V
    return held, transient


def _autocast_cache(st: _Step) -> int:
    """With checkpointing under autocast: the cached c-byte copies of the trainable weights (see the dataclass)."""
    spec, setup = st.spec, st.setup
    if st.autocast_full:
        return st.c * spec.linear_weight_parameters()
    if setup.is_peft and setup.autocast:
        return spec.num_hidden_layers * st.c * setup.lora_r * sum(
            lin.in_features + lin.out_features for lin in spec.lora_linears(setup.lora_target_modules))
    return 0


# --------------------------------------------------------------------- the estimate
def estimate_activations(spec: ModelSpec, setup: TrainingSetup) -> ActivationEstimate:
    """Activation bytes of one micro-step (``setup.micro_batch_size`` x ``setup.seq_len``) on ``setup.device``;
    see the module doc."""
    st = _Step.of(spec, setup, setup.device)
    # the model's own loss (full logits); TRL's fused head is step.fused_head's
    logits, logits_transient = _logits_bytes(st) if setup.loss == "logits" else (0, 0)
    if setup.gradient_checkpointing:
        # Non-reentrant torch.utils.checkpoint around each decoder layer's forward: tensors saved inside the layer
        # are dropped (recomputed in backward); only the positional inputs -- the hidden states entering each
        # layer (N*h in the residual dtype) -- stay held.  Backward recomputes one layer at a time.
        layers_held = spec.num_hidden_layers * st.res * st.N * spec.hidden_size
        lora_held = 0
        recompute = max(_layer_bytes(st, False, t) for t in st.layer_types) + _lora_bytes(st, False)
        autocast_cache = _autocast_cache(st)
    else:
        layers_held = sum(_layer_bytes(st, i == 0, t) for i, t in enumerate(st.layer_types))
        lora_held = sum(_lora_bytes(st, i == 0) for i in range(spec.num_hidden_layers))
        recompute = autocast_cache = 0
    return ActivationEstimate(
        layers=int(layers_held),
        lora=int(lora_held),
        outside_layers=int(_outside_bytes(st)),
        logits=int(logits),
        recompute=int(recompute),
        logits_transient=int(logits_transient),
        autocast_cache=int(autocast_cache),
        final_norm=int(_final_norm_bytes(st)),
    )
