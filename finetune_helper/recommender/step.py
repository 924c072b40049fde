"""The peak of one training step, moment by moment: what is live when, from the forward to the optimizer.

:mod:`.activations` gives what the forward saves for backward; this module puts it on the step's timeline with the
other bytes that come and go, and takes the highest moment.  For a steady step (the second on: the optimizer
states exist) of the runner's program (TRL ``SFTTrainer``, transformers ``Trainer``):

1. **head forward**: weights + states (+ gradients accumulated by earlier micro-steps) + the body's saved
   activations + the LM head's forward working set;
2. **head backward**: the same + the head's saved tensors + its backward working set;
3. **layers backward**: from the top layer down, each layer's saved activations are freed as its parameters'
   gradients appear, with the layer's own backward working set (and, with checkpointing, its recompute);
4. **optimizer**: weights + gradients + states + the step's temporaries.

The LM head is what TRL 1.x runs (``trl.trainer.utils.add_fused_lm_head``, ``trl.kernels.chunked_logprob``):
``ChunkedLogProbFunction`` projects ``TOKEN_CHUNK_SIZE``-token x ``chunk_size``-vocabulary tiles into one buffer
(``mm_buf``, always ``chunk_size`` = 32768 columns wide), folds each tile into running fp32 statistics and never
builds the vocabulary-wide logits.  On CUDA the fold is a Triton kernel working in place; elsewhere it is a torch
fallback whose temporaries are tile-sized fp32 tensors (counted op by op below).  Its backward accumulates the
hidden-state and (for full fine-tuning) the lm_head-weight gradients in fp32.  With ``loss="logits"`` the model's
own loss runs instead (full logits, fp32 upcast): :class:`.activations.ActivationEstimate`'s logits terms.

Every constant below names the library code it comes from; the whole is checked against the tracked peak of the
runner's own steps (``benchmarks/estimate_vs_runner.py``) and of its replica under fake tensors for real sizes
(``benchmarks/estimate_vs_fake.py``), never against these formulas.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .activations import ActivationEstimate
from .model import ModelSpec
from .optimizers import OPTIMIZERS
from .training_setup import DTYPE_BYTES, TrainingSetup

#: trl/kernels/chunked_logprob.py: tokens per projection tile, and SFTTrainer's vocabulary chunk
#: (trl/trainer/utils.py ``_CHUNKED_LOGPROB_CHUNK_SIZE``)
TOKEN_CHUNK, VOCAB_CHUNK = 4096, 32768
#: fp32 running statistics per scored token in the fused head's forward: max, sum_exp, x_sum_exp, sq_sum_exp,
#: z_sum, max_before_target, target_logit (``ChunkedLogProbFunction.forward``)
_HEAD_STATS = 7
#: bytes per tile element held at once by the torch fallback (no Triton), counted op by op in
#: ``_forward_tile`` (z, the masked top-1 copy and ``exp(z - m)``: three fp32 tiles and two bool masks, or the
#: entropy product) and ``_backward_tile`` (y, z, log_p, p, grad, is_target.float(), its difference: seven fp32
#: tiles and a bool mask).  Final-logit soft-capping (Gemma 2) adds ``tanh(z / cap)``: in the forward, while a 16-bit
#: tile's fp32 copy is still referenced, four fp32 tiles; in the backward, ``t`` is kept too.
_FALLBACK_FORWARD_BYTES, _FALLBACK_BACKWARD_BYTES = 12, 29
_SOFTCAP_FORWARD_BYTES, _SOFTCAP_BACKWARD_BYTES = 16, 33
_F32, _ID = 4, 8


@dataclass(frozen=True)
class Phase:
    """One moment of the step and what is live at it, by part."""

    name: str
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())


@dataclass(frozen=True)
class _Widths:
    """Byte widths the LM head works with."""

    hidden: int   # the final norm's output (the residual stream's dtype)
    weight: int   # the lm_head weight as stored
    compute: int  # the projection's dtype: autocast's, else the hidden states'


def _widths(spec: ModelSpec, setup: TrainingSetup) -> _Widths:
    c = DTYPE_BYTES[setup.dtype]
    mixed_full = setup.autocast and setup.method == "full" and not setup.pure_bf16
    hidden = _F32 if (mixed_full or setup.dtype == "fp32") else c
    weight = setup.master_bytes if setup.method == "full" else (2 if setup.method == "qlora" and c == 4 else c)
    if setup.method == "qlora":
        weight = DTYPE_BYTES[setup.dtype]  # lm_head is not quantized: it stays in the compute dtype
    return _Widths(hidden=hidden, weight=weight, compute=c if setup.autocast else hidden)


def scored_tokens(setup: TrainingSetup) -> int:
    """Positions the head scores: every shifted position (``labels[:, 1:]``; the CUDA path keeps only labelled ones,
    the worst case being all of them)."""
    return setup.micro_batch_size * (setup.seq_len - 1)


def fused_head(spec: ModelSpec, setup: TrainingSetup) -> dict[str, int]:
    """The fused LM head's bytes: ``held`` (saved for backward and kept by the loss), ``forward`` and ``backward``
    (working sets on top of what is held at those moments)."""
    w = _widths(spec, setup)
    n, h, v = scored_tokens(setup), spec.hidden_size, spec.vocab_size
    rows, cols = min(n, TOKEN_CHUNK), min(v, VOCAB_CHUNK)
    tile = rows * cols
    cuda = setup.device == "cuda"
    mm_buf = rows * VOCAB_CHUNK * w.compute
    hidden_chunk = rows * h * w.compute if w.hidden != w.compute else 0
    weight_chunk = cols * h * w.compute if w.weight != w.compute else 0
    # the scored hidden states: a boolean-index copy on CUDA, a reshape of the [:, :-1] slice elsewhere (a copy
    # unless the batch has one row)
    hidden_copy = n * h * w.hidden if (cuda or setup.micro_batch_size > 1) else 0
    final_norm_out = setup.micro_batch_size * setup.seq_len * h * w.hidden
    # saved: hidden (the copy), targets (int64), log_z and entropy (fp32); kept by SFTTrainer.compute_loss: the
    # masked log-probs, entropy and top-1 flags, the label mask and the negated per-token loss
    held = hidden_copy + n * (_ID + 2 * _F32) + n * (3 * _F32 + 2)
    softcap = bool(spec.final_logit_softcapping)
    fold_fwd = 0 if cuda else tile * (_SOFTCAP_FORWARD_BYTES if softcap and w.compute != _F32
                                      else _FALLBACK_FORWARD_BYTES)
    forward = final_norm_out + _HEAD_STATS * n * _F32 + mm_buf + hidden_chunk + max(weight_chunk, fold_fwd)
    trainable_head = setup.method == "full"
    grad_hidden = n * h * _F32
    grad_weight = v * h * _F32 if trainable_head else 0
    fold_bwd = 0 if cuda else tile * (_SOFTCAP_BACKWARD_BYTES if softcap else _FALLBACK_BACKWARD_BYTES)
    # _addmm_fp32 on the CPU upcasts both operands of each gradient GEMM (CUDA: addmm with out_dtype=float32)
    upcast = 0 if (cuda or w.compute == _F32) else _F32 * tile + _F32 * max(cols * h, rows * h if trainable_head else 0)
    end_casts = (n * h * w.hidden if w.hidden != _F32 else 0) + (v * h * w.weight if trainable_head and w.weight != _F32
                                                                  else 0)
    backward = grad_hidden + grad_weight + mm_buf + hidden_chunk + weight_chunk + max(fold_bwd, upcast, end_casts)
    return {"held": held, "forward": forward, "backward": backward}


def optimizer_temporaries(spec: ModelSpec, setup: TrainingSetup, trainable_bytes: int, largest_tensor: int) -> int:
    """Bytes an optimizer step allocates on top of weights, gradients and states.

    torch's fused AdamW (``adamw_torch_fused``) updates in place; the for-each implementation (``adamw_torch``
    on CUDA: ``torch._foreach_sqrt`` of all second moments, divided in place) makes one gradient-sized list; the
    for-loop one (the CPU default for non-fused: ``(exp_avg_sq.sqrt() / bias_correction2_sqrt)``) holds two
    temporaries of one tensor at a time; bitsandbytes' 8-bit optimizers dequantize block-wise in the kernel.
    """
    info = OPTIMIZERS[setup.optim]
    if "fused" in setup.optim or info.needs_bnb or info.factored or info.family == "sgd":
        return 0
    if setup.device == "cuda":
        return trainable_bytes
    return 2 * largest_tensor


def layer_backward_work(spec: ModelSpec, setup: TrainingSetup, *, with_mlp: bool = True) -> int:
    """Bytes a decoder layer's backward allocates on top of what it holds: the larger of its MLP's and its
    attention's gradient temporaries, plus the residual-stream gradients flowing in and out.

    MLP, ``down(act(gate(x)) * up(x))``: the gradient of the product, then of both factors (three N x I tensors in
    the compute dtype), for full fine-tuning with the largest weight gradient in the compute dtype and its cast to
    the master dtype.  A LoRA-adapted ``down_proj`` also runs its adapter's path back: the gradient of lora_A's
    input in the compute dtype, of PEFT's fp32 cast (N x I x 4), and of dropout (another N x I x 4).
    Attention: the gradients of q, k and v (with CPU's GQA, of the repeated k and v), and for eager attention the
    fp32 gradient of the probabilities (b x heads x s x s x 4; the recompute already holds the probabilities).
    """
    c = DTYPE_BYTES[setup.dtype]
    res = _F32 if (setup.autocast and setup.method == "full" and not setup.pure_bf16) else c
    N, h, I = setup.tokens, spec.hidden_size, spec.intermediate_size
    qd, kvd = spec.q_dim, spec.kv_dim
    mlp = 3 * N * I * c
    if setup.method == "full":
        largest = max(lin.weight_numel for lin in spec.layer_linears())
        mlp += largest * (c + setup.master_bytes if setup.autocast else setup.master_bytes)
    else:
        adapted = {lin.name for lin in spec.lora_linears(setup.lora_target_modules)}
        if "down_proj" in adapted:
            mlp += N * I * (c + _F32 + (_F32 if setup.lora_dropout > 0 else 0))
    attention = N * (qd + 2 * kvd) * c
    if setup.device == "cpu" and spec.num_attention_heads > spec.num_key_value_heads:
        attention += 2 * N * qd * c
    if setup.attn_implementation == "eager":
        attention += setup.micro_batch_size * spec.num_attention_heads * setup.seq_len ** 2 * _F32
    if not with_mlp:
        return attention + N * h * res
    return max(mlp, attention) + 2 * N * h * res


def recompute_work(spec: ModelSpec, setup: TrainingSetup) -> int:
    """With checkpointing: bytes a decoder layer's backward needs on top of the tensors its recompute saves again
    (:attr:`.activations.ActivationEstimate.recompute`), the larger of three moments, each with the gradient
    flowing into the layer (N x h) alive.  Read off op-by-op traces of the runner's step
    (``benchmarks/estimate_vs_fake.py``; torch ``utils/checkpoint.py``, non-reentrant, stops recomputing once the
    last saved tensor is back):

    * **recompute forward, at down_proj**: the attention block's residual output (N x h, held for the layer's last
      add) and the base projection's output (N x h); a LoRA-adapted down_proj whose base does not save its input
      also holds the product ``act(gate) * up`` (N x I) and the MLP's input (N x h), and runs PEFT's path: the
      fp32 cast of the product and dropout's output (N x I x 4 each, when the adapters are fp32 under autocast;
      lora_A saves the cast of that), and the gradient of the adapter's scaled output (N x h), made before the
      recompute starts.
    * **MLP backward**: the gradient of the product and of its two factors (three N x I); a base that saved the
      product (full fine-tuning, QLoRA on CUDA) has freed it by then, and a LoRA down_proj has freed its mask and
      lora_A's input.  Before that, the LoRA path back: the fp32 gradient of lora_A's input cast and of dropout
      (N x I x 4 each), lora_A's input freed.
    * **attention backward**: :func:`layer_backward_work`'s attention term (the MLP's saved tensors are gone).
    """
    c = DTYPE_BYTES[setup.dtype]
    res = _F32 if (setup.autocast and setup.method == "full" and not setup.pure_bf16) else c
    N, h, I = setup.tokens, spec.hidden_size, spec.intermediate_size
    saves_product = setup.method == "full" or (setup.method == "qlora" and setup.device == "cuda")
    forward = N * h * res + N * h * c
    backward = N * I * (2 * c if saves_product else 3 * c)
    adapted = setup.is_peft and "down_proj" in {lin.name for lin in spec.lora_linears(setup.lora_target_modules)}
    if adapted:
        fp32_adapters = setup.method == "lora" and setup.autocast and c != _F32
        drop = setup.lora_dropout > 0
        adapter = _F32 if fp32_adapters or setup.method == "lora" else 2
        mask = 1 if setup.device == "cuda" else adapter
        # saved by the down adapter: dropout's mask and lora_A's input (its own cast, or dropout's output)
        saved = N * I * ((mask if drop else 0) + (c if fp32_adapters or not drop else adapter))
        # the gradient of the adapter's scaled output: ``* scaling`` needs no saved tensor, so its backward runs
        # before the recompute starts
        forward += N * h * c
        if fp32_adapters:
            forward += N * I * (_F32 + (_F32 if drop else 0))
            backward = max(backward - saved, N * I * (_F32 + (_F32 if drop else 0)) - N * I * c)
        else:
            backward -= saved
        if not saves_product:
            forward += N * I * c + N * h * c  # the product, and the MLP's input its forward still references
    attention = layer_backward_work(spec, setup, with_mlp=False)
    return N * h * res + max(forward, backward, attention)


def embedding_backward(spec: ModelSpec, setup: TrainingSetup, grad_bytes: int, *, accumulating: bool) -> int:
    """The input embedding's gradient, made at the very end of the backward (full fine-tuning); with tied
    embeddings it is added to the lm_head's, a sum of the two (one more matrix) before both are freed.  Without
    accumulation the lm_head's part is the tied weight's gradient (counted with the gradients); while accumulating
    that gradient exists already, and the lm_head's part is a third matrix waiting for the sum."""
    if setup.method != "full":
        return 0
    matrix = spec.vocab_size * spec.hidden_size * grad_bytes
    if not spec.tie_word_embeddings:
        return matrix
    return (3 if accumulating else 2) * matrix


@dataclass(frozen=True)
class StepInputs:
    """What the phases are made of (bytes)."""

    weights: int
    gradients: int
    optimizer_states: int
    activations: ActivationEstimate
    #: gradients of one decoder layer's trainable parameters, and of everything outside the layers
    layer_gradients: int
    outside_gradients: int
    largest_trainable_tensor: int
    #: :func:`fused_head`'s bytes when the loss path is the fused head, else None
    head: dict[str, int] | None = None


def phases(spec: ModelSpec, setup: TrainingSetup, x: StepInputs, *, accumulation: int = 1) -> list[Phase]:
    """The step's candidate peak moments (see the module docstring)."""
    acts = x.activations
    base = {"weights": x.weights, "optimizer_states": x.optimizer_states,
            "gradients": x.gradients if accumulation > 1 else 0}
    body = acts.layers + acts.lora + acts.outside_layers
    out: list[Phase] = []
    if x.head is not None:
        head = x.head
        # the head runs inside the model's forward, so under autocast the weight cache is still alive
        out.append(Phase("head forward", {**base, "activations": body,
                                          "transient": head["forward"] + acts.autocast_cache}))
        out.append(Phase("head backward", {**base, "activations": body + head["held"],
                                           "transient": head["backward"]}))
    else:
        out.append(Phase("loss forward", {**base, "activations": acts.saved(),
                                          "transient": acts.logits_transient * 6 // 8 + acts.autocast_cache}))
        out.append(Phase("loss backward", {**base, "activations": acts.saved(), "transient": acts.logits_transient}))
    # layers backward, top down: layer l's activations go as its gradients come; its backward works on top
    L = spec.num_hidden_layers
    gc = setup.gradient_checkpointing
    per_layer = (acts.layers // L) if gc else (acts.layers + acts.lora) // L
    work = acts.recompute + recompute_work(spec, setup) if gc else layer_backward_work(spec, setup)
    grads_above = x.outside_gradients - _embedding_grad(spec, setup, x)
    held = body - acts.final_norm
    for done in range(L):
        grads = base["gradients"] or grads_above + (done + 1) * x.layer_gradients
        out.append(Phase(f"layer {L - done - 1} backward", {**base, "gradients": grads, "activations": held,
                                                             "transient": work}))
        held -= per_layer
    if setup.method == "full":
        grads = base["gradients"] or grads_above + L * x.layer_gradients
        out.append(Phase("embedding backward", {**base, "gradients": grads, "activations": acts.outside_layers,
                                                "transient": embedding_backward(
                                                    spec, setup, _elem(setup, x), accumulating=accumulation > 1)}))
    out.append(Phase("optimizer step", {"weights": x.weights, "optimizer_states": x.optimizer_states,
                                        "gradients": x.gradients,
                                        "transient": optimizer_temporaries(spec, setup, x.gradients,
                                                                           x.largest_trainable_tensor)}))
    return out


def _elem(setup: TrainingSetup, x: StepInputs) -> int:
    """Bytes per gradient element."""
    return setup.master_bytes if setup.method == "full" else 4


def _embedding_grad(spec: ModelSpec, setup: TrainingSetup, x: StepInputs) -> int:
    """The part of the outside gradients that only appears at the end: the input embedding's (untied)."""
    if setup.method != "full" or spec.tie_word_embeddings:
        return 0
    return min(x.outside_gradients, spec.vocab_size * spec.hidden_size * _elem(setup, x))
