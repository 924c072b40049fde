"""FLOPs of the training step that runs: forward, backward, recompute, attention, the LM head, the optimizer.

Counted per micro-step of ``setup`` (``micro_batch_size`` rows of ``seq_len`` positions, the step's shape), as the
matmuls the step executes, each ``2 * m * n * k`` (a multiply and an add):

* every decoder linear: forward ``2 T in out`` for ``T`` token positions; backward the input's gradient (the same
  again) when the input requires grad, and the weight's gradient when the weight is trainable (full fine-tuning).
  LoRA's frozen base gets the input gradient only; each adapter runs ``A`` (``r x in``) and ``B`` (``out x r``):
  ``2 T r (in + out)`` forward, twice that backward (both weight gradients and the gradient of ``A``'s output),
  plus ``2 T r in`` for its input's gradient.
* which inputs require grad follows autograd: full fine-tuning, all (the embedding is trainable); LoRA without
  gradient checkpointing, none before the first adapter (the first layer's q/k/v read a norm of the frozen
  embedding: no input gradient there); LoRA with checkpointing, all (TRL and PEFT call
  ``enable_input_require_grads``, ``trl/trainer/sft_trainer.py``).
* attention's score and value products: ``2 * 2 * b * heads * s^2 * head_dim`` forward; backward twice that
  (eager) or 2.5 times (SDPA, FlashAttention: their backward recomputes the scores); counted over the full
  ``s x s`` square as ``torch.utils.flop_counter`` counts SDPA (``sdpa_flop_count``: "we aren't accounting for
  causal attention") and as eager attention's matmuls really run.  :attr:`FlopEstimate.executed`
  halves it where the kernel skips the masked half: SDPA with ``is_causal`` (no explicit mask: an unpadded,
  unpacked batch; transformers passes a mask otherwise) and FlashAttention-2; eager computes the whole square.
* gradient checkpointing recomputes every decoder layer's forward in backward (transformers checkpoints each
  ``GradientCheckpointingLayer``), not the LM head, and not the layer's last matmul (:func:`_not_recomputed`).
* the LM head.  ``transformers.Trainer`` (the model's own loss): the logits of all ``s`` positions, ``2 T h V``
  forward, backward the hidden states' gradient and, when the head is trainable, the weight's.  TRL's fused head
  (``trl/kernels/chunked_logprob.py``, ``ChunkedLogProbFunction``) projects the ``s - 1`` shifted positions of each
  row (on CUDA only those with a label; every position elsewhere), and its backward recomputes each tile before
  the two gradients: 3 or 4 products of ``2 N h V`` in all.
* the optimizer: elementwise, per trainable parameter and optimizer step (:data:`OPTIMIZER_FLOPS`); no matmul.

:func:`model_flops_per_token` is the model-FLOPs convention MFU is quoted in: ``6 N + 12 L H Q T`` per token
(PaLM, Chowdhery et al. 2022, app. B, as nanoGPT's ``estimate_mfu`` and TRL's ``compute_flops_per_token`` compute
it): ``N`` the parameters every token multiplies (decoder linears and the LM head, not the embedding lookup), the
attention term non-causal, the same for full fine-tuning and LoRA.

Checked against ``torch.utils.flop_counter.FlopCounterMode`` over the runner's real steps on tiny models
(``tests/measure/test_flops.py``) and over real-size replicas under fake tensors (``benchmarks/flops_vs_counter.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .activations import _attn_impl
from .model import Linear, ModelSpec
from .training_setup import TrainingSetup

#: elementwise FLOPs per trainable parameter and optimizer step by optimizer family, read off torch's single-tensor
#: loops (``torch/optim/adam.py`` ``_single_tensor_adam``: decoupled weight decay ``param.mul_`` 1, ``exp_avg.lerp_``
#: 3, ``exp_avg_sq.mul_().addcmul_`` 4, ``sqrt`` / divide / ``add_(eps)`` 3, ``addcdiv_`` 3; ``torch/optim/sgd.py``
#: without momentum: ``param.add_(grad, alpha=-lr)`` 2); the other Adam-family members (8-bit, Lion, Adafactor) are
#: taken as AdamW.  No matmul: no tensor core; the step is bound by memory bandwidth, not FLOPs.
OPTIMIZER_FLOPS = {"adam": 14, "sgd": 2}
#: ``clip_grad_norm_`` per gradient element: the norm's square and sum (2), the scaling multiply (1)
CLIP_FLOPS = 3


@dataclass(frozen=True)
class FlopEstimate:
    """Matmul FLOPs of one micro-step, by part; optimizer FLOPs per optimizer step."""

    #: token positions of the micro-step (rows x row length)
    tokens: int
    #: FLOPs by part (``forward.linears``, ``forward.lora``, ``forward.attention``, ``forward.lm_head``,
    #: ``backward.*``, ``recompute.*``), in the counted convention (full attention square)
    parts: dict[str, int] = field(default_factory=dict)
    #: fraction of the attention square the kernel computes (0.5: causal skipping; 1: the whole square)
    attention_fraction: float = 1.0
    #: elementwise FLOPs of one optimizer step
    optimizer: int = 0
    #: the 6N + 12LHQT model FLOPs of the micro-step (MFU's numerator)
    model: int = 0

    @property
    def counted(self) -> int:
        """What ``FlopCounterMode`` counts for the micro-step: every matmul, attention's full square."""
        return sum(self.parts.values())

    @property
    def attention(self) -> int:
        return sum(v for k, v in self.parts.items() if k.endswith(".attention"))

    @property
    def executed(self) -> float:
        """The micro-step's matmul FLOPs as the kernels run them (attention's skipped half left out)."""
        return self.counted - (1.0 - self.attention_fraction) * self.attention

    def flops_per_token(self, tokens_per_optimizer_step: int | None = None) -> float:
        """Executed FLOPs per token position, the optimizer's amortised over the optimizer step's tokens
        (default: one micro-step)."""
        return (self.executed + self.optimizer * self.tokens / (tokens_per_optimizer_step or self.tokens)) \
            / self.tokens

    @property
    def model_flops_per_token(self) -> float:
        return self.model / self.tokens

    def to_dict(self) -> dict[str, object]:
        return {"tokens": self.tokens, "counted": self.counted, "executed": self.executed,
                "attention_fraction": self.attention_fraction, "optimizer_per_step": self.optimizer,
                "flops_per_token": self.flops_per_token(), "model_flops_per_token": self.model_flops_per_token,
                "parts": dict(self.parts)}


def model_flops_per_token(spec: ModelSpec, seq_len: int) -> int:
    """PaLM's ``6 N + 12 L H Q T`` (see the module docstring)."""
    n = spec.num_hidden_layers * sum(lin.weight_numel for lin in spec.layer_linears()) \
        + spec.vocab_size * spec.hidden_size
    return 6 * n + 12 * spec.num_hidden_layers * spec.num_attention_heads * spec.head_dim * seq_len


def _linear(lin: Linear, t: int) -> int:
    return 2 * t * lin.in_features * lin.out_features


def _lora(lin: Linear, t: int, r: int) -> tuple[int, int]:
    """(forward, backward without the input's gradient) of one adapter; the input's gradient is ``2 t r in``."""
    return 2 * t * r * (lin.in_features + lin.out_features), 2 * t * r * (lin.in_features + 2 * lin.out_features)


#: attention's backward against its forward (eager, fused kernels): eager's two products each give two gradients;
#: the fused kernels (SDPA, FlashAttention) recompute the scores first, a fifth product (``torch.utils.flop_counter``
#: ``sdpa_backward_flop_count``, the FlashAttention-2 backward pass, Dao 2023 alg. 2)
_ATTENTION_BACKWARD = {True: 2.0, False: 2.5}
#: the linears that read the first norm of a decoder layer (the attention's input projections)
_ATTENTION_INPUTS = ("q_proj", "k_proj", "v_proj", "qkv_proj")


def _layer(spec: ModelSpec, setup: TrainingSetup, t: int, *, input_grad: bool) -> tuple[dict[str, int], bool]:
    """One decoder layer's forward and backward matmuls, and whether its output requires grad; ``input_grad``:
    its input does."""
    full = setup.method == "full"
    targeted = {lin.name for lin in spec.lora_linears(setup.lora_target_modules)} if setup.is_peft else set()
    b, s = setup.micro_batch_size, setup.seq_len
    square = 2 * 2 * b * spec.num_attention_heads * s * s * spec.head_dim
    out = {"forward.linears": 0, "forward.lora": 0, "forward.attention": square,
           "backward.linears": 0, "backward.lora": 0, "backward.attention": 0}
    # autograd's requires-grad along the layer: the attention's input, its output (after q/k/v), the MLP's input
    # (the residual after o_proj), the down projection's input
    attn_in = input_grad or full
    attn_out = attn_in or bool(targeted & set(_ATTENTION_INPUTS))
    mlp_in = attn_in or attn_out or "o_proj" in targeted
    down_in = mlp_in or bool(targeted & {"gate_proj", "up_proj", "gate_up_proj"})
    reads = {"o_proj": attn_out, "down_proj": down_in}
    for lin in spec.layer_linears():
        x_grad = attn_in if lin.name in _ATTENTION_INPUTS else reads.get(lin.name, mlp_in)
        out["forward.linears"] += _linear(lin, t)
        out["backward.linears"] += _linear(lin, t) * (int(x_grad) + int(full))
        if lin.name in targeted:
            fwd, bwd = _lora(lin, t, setup.lora_r)
            out["forward.lora"] += fwd
            out["backward.lora"] += bwd + (2 * t * setup.lora_r * lin.in_features if x_grad else 0)
    if attn_out:
        out["backward.attention"] = int(_ATTENTION_BACKWARD[_attn_impl(spec, setup) == "eager"] * square)
    return out, down_in or "down_proj" in targeted


def _not_recomputed(spec: ModelSpec, setup: TrainingSetup, t: int) -> tuple[str, int]:
    """(part, FLOPs) of the one matmul a checkpointed layer's recompute skips: the layer's last, after its last saved
    tensor (torch.utils.checkpoint's non-reentrant early stop: the recompute ends once every tensor the backward
    unpacks is packed again, and an op packs its inputs before it runs).  The down projection, or under LoRA its
    adapter's ``B`` when it is targeted; none where a norm follows the MLP (Gemma 2/3's post-feedforward norm saves
    the down projection's output)."""
    if spec.traits and spec.traits.norms_per_layer > 2:
        return "linears", 0
    down = next(lin for lin in spec.layer_linears() if lin.name == "down_proj")
    if setup.is_peft and down in spec.lora_linears(setup.lora_target_modules):
        return "lora", 2 * t * setup.lora_r * down.out_features
    return "linears", _linear(down, t)


def _lm_head(spec: ModelSpec, setup: TrainingSetup) -> dict[str, int]:
    b, s, h, v = setup.micro_batch_size, setup.seq_len, spec.hidden_size, spec.vocab_size
    trainable = setup.method == "full"
    if setup.loss == "logits":
        one = 2 * b * s * h * v
        return {"forward.lm_head": one, "backward.lm_head": one * (1 + int(trainable))}
    one = 2 * b * (s - 1) * h * v  # the shifted positions (all labelled: the estimate's worst case)
    return {"forward.lm_head": one, "backward.lm_head": one * (2 + int(trainable))}


def attention_fraction(spec: ModelSpec, setup: TrainingSetup) -> float:
    """The share of the ``s x s`` square the attention kernel computes: 0.5 where it skips the causal mask's upper
    half (SDPA's ``is_causal``, FlashAttention-2), 1 where it gets an explicit mask or is eager."""
    impl = _attn_impl(spec, setup)
    if impl == "flash_attention_2":
        return 0.5
    if impl == "sdpa" and not setup.padded and not setup.packing:
        return 0.5
    return 1.0


def estimate_flops(spec: ModelSpec, setup: TrainingSetup) -> FlopEstimate:
    """The matmul FLOPs of one micro-step of ``setup`` (see the module docstring)."""
    from .optimizers import OPTIMIZERS
    from .memory import trainable

    t = setup.tokens
    parts: dict[str, int] = {}
    # the first layer's input requires grad only for full fine-tuning or LoRA under checkpointing
    # the first layer's input requires grad for full fine-tuning or under checkpointing; from its output on every
    # layer sees the same (a layer whose input requires grad passes that on), so two layers give all of them
    first, grad = _layer(spec, setup, t, input_grad=setup.method == "full" or setup.gradient_checkpointing)
    rest = _layer(spec, setup, t, input_grad=grad)[0]
    skipped, not_recomputed = _not_recomputed(spec, setup, t) if setup.gradient_checkpointing else ("", 0)
    for layer, count in ((first, 1), (rest, spec.num_hidden_layers - 1)):
        for key, value in layer.items():
            parts[key] = parts.get(key, 0) + count * value
        if setup.gradient_checkpointing:
            for key in ("linears", "lora", "attention"):
                parts[f"recompute.{key}"] = (parts.get(f"recompute.{key}", 0) + count * (
                    layer[f"forward.{key}"] - (not_recomputed if key == skipped else 0)))
    parts.update(_lm_head(spec, setup))
    optimizer = (OPTIMIZER_FLOPS[OPTIMIZERS[setup.optim].family] + CLIP_FLOPS) * trainable(spec, setup)[0]
    return FlopEstimate(tokens=t, parts={k: v for k, v in parts.items() if v}, optimizer=optimizer,
                        attention_fraction=attention_fraction(spec, setup),
                        model=model_flops_per_token(spec, setup.seq_len) * t)
