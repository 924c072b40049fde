"""What differs between the decoder architectures we count exactly, as data.

Each entry mirrors the transformers 5 modeling file of that ``model_type`` (``models/<type>/modeling_<type>.py``) and
the defaults of its config class, so a ``config.json`` that omits a key still counts like transformers builds it.
A ``model_type`` missing here is counted by instantiating the model on the meta device (``model_spec.meta_count``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchTraits:
    model_type: str
    #: q/k/v projections have a bias: True, False, or the name of the config key that decides (``attention_bias``).
    qkv_bias: bool | str = "attention_bias"
    #: output projection has a bias: True, False, or a config key.
    o_bias: bool | str = "attention_bias"
    #: MLP projections have a bias: False or a config key (``mlp_bias``).
    mlp_bias: bool | str = False
    #: per-head RMSNorm on queries and keys (Qwen3, Gemma 3).
    qk_norm: bool = False
    #: RMSNorms per decoder layer: 2 (pre-attention, pre-MLP) or 4 (Gemma 2/3 add post-attention, post-MLP).
    norms_per_layer: int = 2
    #: q, k, v in one Linear (Phi-3 ``qkv_proj``) and gate/up in one (``gate_up_proj``).
    fused_projections: bool = False
    #: head_dim when config.json has none; None means hidden_size // num_attention_heads.
    default_head_dim: int | None = None
    #: tie_word_embeddings when config.json has none.
    default_tie: bool = False
    #: config key holding the MLP activation.
    act_key: str = "hidden_act"
    default_act: str = "silu"
    #: Gemma RMSNorm computes ``x * (1 + weight)`` in fp32 (an extra fp32 temporary).
    gemma_norm: bool = False
    #: attention implementations transformers 5 accepts for training (first is the default we assume).
    attn_implementations: tuple[str, ...] = ("sdpa", "eager", "flash_attention_2")
    #: config key of the final-logit soft-capping (Gemma 2: tanh(logits / cap) * cap), if any.
    final_softcap_key: str | None = None


ARCHITECTURES: dict[str, ArchTraits] = {
    t.model_type: t
    for t in (
        ArchTraits("llama", mlp_bias="mlp_bias"),
        ArchTraits("mistral", qkv_bias=False, o_bias=False),
        ArchTraits("qwen2", qkv_bias=True, o_bias=False),
        ArchTraits("qwen3", qk_norm=True, default_head_dim=128),
        ArchTraits("gemma", default_head_dim=256, default_tie=True, default_act="gelu_pytorch_tanh", gemma_norm=True),
        ArchTraits(
            "gemma2", norms_per_layer=4, default_head_dim=256, default_tie=True, act_key="hidden_activation",
            default_act="gelu_pytorch_tanh", gemma_norm=True, attn_implementations=("eager", "flash_attention_2"),
            final_softcap_key="final_logit_softcapping",
        ),
        ArchTraits(
            "gemma3_text", qk_norm=True, norms_per_layer=4, default_head_dim=256, default_tie=True,
            act_key="hidden_activation", default_act="gelu_pytorch_tanh", gemma_norm=True,
            final_softcap_key="final_logit_softcapping",
        ),
        ArchTraits("phi3", qkv_bias=False, o_bias=False, fused_projections=True),
    )
}

#: Gemma 2's final-logit soft-capping default (Gemma2Config.final_logit_softcapping).
DEFAULT_SOFTCAP = {"gemma2": 30.0, "gemma3_text": None}
