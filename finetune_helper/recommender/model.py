"""The model, as the shapes that decide its parameter count and its training memory.

``ModelSpec.from_config`` reads a transformers ``config.json`` dict; ``resolve_model`` turns the ``--model`` argument
(catalog id or alias, local directory, Hub id, bare size such as ``7B``) into a spec.  No torch import here except in
``meta_count``, the fallback for architectures not described in ``architectures.py``.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import catalog
from .architectures import ARCHITECTURES, DEFAULT_SOFTCAP, ArchTraits
from ..errors import FinetuneHelperError, first_line
from ..names import is_hub_id, model_size


#: bounds that keep every answer immediate (the step timeline walks the layers): the largest open models are about
#: 1T parameters (Kimi K2, 2025: 1.04T, 61 layers) and the deepest about 126 layers (Llama 3.1 405B): 2T and
#: 1024 layers are outside anything real, not close limits
MAX_PARAMETERS = 2e12
MAX_LAYERS = 1024


@dataclass(frozen=True)
class Linear:
    """One ``nn.Linear`` inside a decoder layer (the modules LoRA targets and QLoRA quantizes)."""

    name: str
    in_features: int
    out_features: int
    bias: bool

    @property
    def weight_numel(self) -> int:
        return self.in_features * self.out_features


#: tokens per sequence when none is given (capped by the model's max_position_embeddings)
DEFAULT_SEQ_LEN = 2048


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only causal LM, as its config describes it."""

    #: how the user named it (Hub id, path, ``generic-7B``).
    name: str
    #: transformers ``model_type`` (``llama``, ``qwen2``, ...).
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    #: longest sequence the model was trained for (``max_position_embeddings``).
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    #: Gemma 2 final-logit soft-capping (adds logits-sized tensors to the loss path); None when absent.
    final_logit_softcapping: float | None = None
    #: where the spec came from: ``catalog``, ``local``, ``hub`` or ``size``.
    origin: str = "catalog"
    #: exact count from meta-device instantiation, for architectures not in ``ARCHITECTURES``.
    counted_parameters: int | None = None
    counted_tensors: int | None = None
    #: the config dict it was built from.
    config: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise FinetuneHelperError("model", f"{self.name}: config {name} must be a positive integer, got {value!r}")
        if self.num_hidden_layers > MAX_LAYERS:
            raise FinetuneHelperError("model", f"{self.name}: config num_hidden_layers {self.num_hidden_layers} is "
                                      f"beyond any real model; at most {MAX_LAYERS} are accepted")
        if self.num_attention_heads % self.num_key_value_heads:
            raise FinetuneHelperError("model", f"{self.name}: num_attention_heads ({self.num_attention_heads}) is not "
                                      f"a multiple of num_key_value_heads ({self.num_key_value_heads})")

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, config: dict[str, Any], name: str | None = None, origin: str = "catalog") -> ModelSpec:
        """Read a transformers ``config.json`` dict, with the config class's defaults for missing keys."""
        if not isinstance(config, dict):
            raise FinetuneHelperError("model", f"{name or 'config.json'}: config must be a JSON object, got "
                                      f"{type(config).__name__}")
        if "text_config" in config and "hidden_size" not in config:  # multimodal wrapper: train its text model
            config = {**config["text_config"], "tie_word_embeddings": config.get("tie_word_embeddings", True)}
        model_type = config.get("model_type")
        name = name or config.get("_name_or_path") or str(model_type)
        if not model_type:
            raise FinetuneHelperError("model", f"{name}: config.json has no model_type")
        traits = ARCHITECTURES.get(model_type)
        counted: tuple[int, int] | None = None
        if traits is None:  # count exactly by instantiation; read shapes through the config class's attribute map
            params, tensors, shapes = meta_count(config)
            counted = (params, tensors)
            config = {**shapes, **config}
            warnings.warn(f"{name}: model_type {model_type!r} is not described in finetune_helper/architectures.py; "
                          "parameters counted exactly on the meta device, activations estimated as a Llama-like "
                          "decoder", UserWarning, stacklevel=2)

        def need(key: str, required: bool = True) -> Any:
            value = config.get(key)
            if value is None:
                if required:
                    raise FinetuneHelperError("model", f"{name}: config.json ({model_type}) has no {key}")
                return None
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise FinetuneHelperError("model", f"{name}: config {key} must be a positive integer, got {value!r}")
            return value

        hidden, heads = need("hidden_size"), need("num_attention_heads")
        kv = need("num_key_value_heads", required=False) or heads
        need("head_dim", required=False)
        head_dim = config.get("head_dim") or (traits.default_head_dim if traits else None) or hidden // heads

        def flag(rule: bool | str) -> bool:
            return bool(config.get(rule, False)) if isinstance(rule, str) else rule

        default_tie = traits.default_tie if traits else False
        softcap = None
        if traits and traits.final_softcap_key:
            softcap = config.get(traits.final_softcap_key, DEFAULT_SOFTCAP.get(model_type))
        spec = cls(
            name=name,
            model_type=model_type,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv,
            head_dim=head_dim,
            max_position_embeddings=config.get("max_position_embeddings") or 2048,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", default_tie)),
            qkv_bias=flag(traits.qkv_bias) if traits else False,
            o_bias=flag(traits.o_bias) if traits else False,
            mlp_bias=flag(traits.mlp_bias) if traits else False,
            hidden_act=config.get(traits.act_key if traits else "hidden_act") or (traits.default_act if traits else "silu"),
            final_logit_softcapping=softcap,
            origin=origin,
            config=dict(config),
        )
        if counted is not None:
            spec = replace(spec, counted_parameters=counted[0], counted_tensors=counted[1])
        return spec

    # ----------------------------------------------------------------- shapes
    @property
    def traits(self) -> ArchTraits | None:
        return ARCHITECTURES.get(self.model_type)

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def default_attn_implementation(self) -> str:
        """The attention kernel transformers 5 trains this architecture with by default (Gemma 2: eager)."""
        return self.traits.attn_implementations[0] if self.traits else "sdpa"

    def sequence_length(self, seq_len: int | None = None) -> int:
        """``seq_len`` checked against the model's maximum, or the default: min(2048, max_position_embeddings)
        (2048: Llama 2's context, which most SFT examples fit)."""
        if seq_len is None:
            return min(DEFAULT_SEQ_LEN, self.max_position_embeddings)
        if seq_len > self.max_position_embeddings:
            raise FinetuneHelperError("seq-len", f"{seq_len} exceeds the model's maximum of "
                                      f"{self.max_position_embeddings} (max_position_embeddings)")
        return seq_len

    def layer_linears(self) -> list[Linear]:
        """The ``nn.Linear`` modules of one decoder layer, named as in transformers."""
        h, i = self.hidden_size, self.intermediate_size
        fused = bool(self.traits and self.traits.fused_projections)
        attn = (
            [Linear("qkv_proj", h, self.q_dim + 2 * self.kv_dim, self.qkv_bias)]
            if fused
            else [Linear("q_proj", h, self.q_dim, self.qkv_bias), Linear("k_proj", h, self.kv_dim, self.qkv_bias),
                  Linear("v_proj", h, self.kv_dim, self.qkv_bias)]
        )
        attn.append(Linear("o_proj", self.q_dim, h, self.o_bias))
        mlp = (
            [Linear("gate_up_proj", h, 2 * i, self.mlp_bias)]
            if fused
            else [Linear("gate_proj", h, i, self.mlp_bias), Linear("up_proj", h, i, self.mlp_bias)]
        )
        mlp.append(Linear("down_proj", i, h, self.mlp_bias))
        return attn + mlp

    def layer_norm_parameters(self) -> int:
        """RMSNorm weights in one decoder layer (pre-norms, Gemma's post-norms, Qwen3/Gemma3 q/k norms)."""
        traits = self.traits
        n = (traits.norms_per_layer if traits else 2) * self.hidden_size
        if traits and traits.qk_norm:
            n += 2 * self.head_dim
        return n

    def layer_norm_tensors(self) -> int:
        traits = self.traits
        return (traits.norms_per_layer if traits else 2) + (2 if traits and traits.qk_norm else 0)

    # ----------------------------------------------------------------- counts
    def embedding_parameters(self) -> int:
        return self.vocab_size * self.hidden_size

    def lm_head_parameters(self) -> int:
        """0 when the output projection shares the embedding matrix."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    def layer_linear_parameters(self) -> int:
        """Weights and biases of the linears of one layer (what QLoRA stores in 4 bit, biases aside)."""
        return sum(lin.weight_numel + (lin.out_features if lin.bias else 0) for lin in self.layer_linears())

    def linear_weight_parameters(self) -> int:
        """Linear weight matrices of all decoder layers (quantizable to NF4 / int8)."""
        return self.num_hidden_layers * sum(lin.weight_numel for lin in self.layer_linears())

    def num_parameters(self) -> int:
        """Exact parameter count, equal to ``sum(p.numel() for p in model.parameters())`` in transformers."""
        if self.counted_parameters is not None:
            return self.counted_parameters
        per_layer = self.layer_linear_parameters() + self.layer_norm_parameters()
        return (self.embedding_parameters() + self.lm_head_parameters() + self.num_hidden_layers * per_layer
                + self.hidden_size)  # final norm

    def num_parameter_tensors(self) -> int:
        """Number of parameter tensors (``len(list(model.parameters()))``): optimizers keep one step counter each."""
        if self.counted_tensors is not None:
            return self.counted_tensors
        per_layer = sum(1 + lin.bias for lin in self.layer_linears()) + self.layer_norm_tensors()
        return 1 + (0 if self.tie_word_embeddings else 1) + self.num_hidden_layers * per_layer + 1

    def decoder_layer_class(self) -> str | None:
        """The transformers class of one decoder layer (``LlamaForCausalLM`` -> ``LlamaDecoderLayer``): what FSDP
        wraps as one unit; None when the config names no causal-LM architecture."""
        for arch in self.config.get("architectures") or []:
            if isinstance(arch, str) and arch.endswith("ForCausalLM"):
                return arch[: -len("ForCausalLM")] + "DecoderLayer"
        return None

    def lora_linears(self, target_modules: str | tuple[str, ...] = "all-linear") -> list[Linear]:
        """The layer linears a LoRA config targets; ``all-linear`` is PEFT's every linear but the output layer."""
        linears = self.layer_linears()
        if target_modules == "all-linear":
            return linears
        wanted = {target_modules} if isinstance(target_modules, str) else set(target_modules)
        chosen = [lin for lin in linears if lin.name in wanted]
        unknown = wanted - {lin.name for lin in linears}
        if unknown:
            raise FinetuneHelperError("lora_target_modules", f"{sorted(unknown)} are not linears of {self.model_type}; "
                                      f"choose from {[lin.name for lin in linears]} or all-linear")
        return chosen

    def lora_parameters(self, r: int, target_modules: str | tuple[str, ...] = "all-linear") -> int:
        """LoRA A (r x in) plus B (out x r) for every targeted linear of every layer."""
        return self.num_hidden_layers * sum(r * (lin.in_features + lin.out_features)
                                            for lin in self.lora_linears(target_modules))

    def lora_tensors(self, target_modules: str | tuple[str, ...] = "all-linear") -> int:
        return self.num_hidden_layers * 2 * len(self.lora_linears(target_modules))


# --------------------------------------------------------------------- meta-device fallback
def meta_count(config: dict[str, Any]) -> tuple[int, int, dict[str, Any]]:
    """Count parameters by building the transformers model on the meta device (no memory, no weights).

    Used only for architectures ``architectures.py`` does not describe, so torch is imported only then.
    """
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as exc:  # pragma: no cover - torch and transformers are dependencies
        raise FinetuneHelperError("model", f"counting a {config.get('model_type')} model needs torch and "
                                  f"transformers: {exc}") from exc
    kwargs = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version", "architectures")}
    try:
        tf_config = AutoConfig.for_model(config["model_type"], **kwargs)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(tf_config)
    except Exception as exc:
        raise FinetuneHelperError("model", f"transformers cannot build model_type {config.get('model_type')!r}: "
                                  f"{first_line(exc)}") from exc
    params = list(model.parameters())
    # standard names through the config's attribute_map (GPT-2's n_embd is hidden_size, ...)
    shapes: dict[str, Any] = {}
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "intermediate_size", "max_position_embeddings", "tie_word_embeddings"):
        value = getattr(tf_config, key, None)
        if value is not None:
            shapes[key] = value
    if "intermediate_size" not in shapes:  # GPT-2 style: n_inner, or 4 x hidden
        shapes["intermediate_size"] = getattr(tf_config, "n_inner", None) or 4 * shapes.get("hidden_size", 0)
    if "max_position_embeddings" not in shapes and getattr(tf_config, "n_positions", None):
        shapes["max_position_embeddings"] = tf_config.n_positions
    return sum(p.numel() for p in params), len(params), shapes


# --------------------------------------------------------------------- resolving --model

#: Llama-style shapes (hidden, heads, kv heads, intermediate, layers, vocab, tied) copied from these config.json
#: files, used to give a bare size such as ``7B`` a plausible architecture.
_GENERIC_SHAPES = (
    (576, 9, 3, 1536, 30, 49152, True),          # HuggingFaceTB/SmolLM2-135M
    (960, 15, 5, 2560, 32, 49152, True),         # HuggingFaceTB/SmolLM2-360M
    (2048, 32, 8, 8192, 16, 128256, True),       # meta-llama/Llama-3.2-1B
    (3072, 24, 8, 8192, 28, 128256, True),       # meta-llama/Llama-3.2-3B
    (4096, 32, 8, 14336, 32, 128256, False),     # meta-llama/Llama-3.1-8B
    (8192, 64, 8, 28672, 80, 128256, False),     # meta-llama/Llama-3.1-70B
    (16384, 128, 8, 53248, 126, 128256, False),  # meta-llama/Llama-3.1-405B
)


def generic_size_config(n_params: float) -> dict[str, Any]:
    """A Llama-shaped config with about ``n_params`` parameters: nearest shape, layer count scaled to the size."""
    def size(shape: tuple[Any, ...], layers: int) -> int:
        h, heads, kv, i, _, vocab, tied = shape
        hd = h // heads
        embed = vocab * h * (1 if tied else 2)
        return embed + layers * (2 * h * heads * hd + 2 * h * kv * hd + 3 * h * i + 2 * h) + h

    shape = min(_GENERIC_SHAPES, key=lambda s: abs(math.log(size(s, s[4]) / n_params)))
    h, heads, kv, i, _, vocab, tied = shape
    per_layer = size(shape, 1) - size(shape, 0)
    layers = max(1, round((n_params - size(shape, 0)) / per_layer))
    return {
        "model_type": "llama", "vocab_size": vocab, "hidden_size": h, "intermediate_size": i,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
        "max_position_embeddings": 131072 if vocab == 128256 else 8192, "tie_word_embeddings": tied,
    }


def resolve_model(name: str) -> ModelSpec:
    """``--model``: catalog id or alias, local directory with config.json, bare size (``7B``), or other Hub id."""
    if not name or not str(name).strip():
        raise FinetuneHelperError("model", "empty; give a catalog name (see `finetune-helper models`), a local "
                                  "directory with config.json, a Hub id or a size such as 7B")
    name = str(name).strip()
    entry = catalog.find_model(name)
    if entry is not None:
        return ModelSpec.from_config(entry["config"], name=entry["id"], origin="catalog")
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FinetuneHelperError("model", f"directory {name} has no config.json")
        return ModelSpec.from_config(_read_config(cfg_file), name=name, origin="local")
    if path.suffix == ".json" and path.is_file():
        return ModelSpec.from_config(_read_config(path), name=name, origin="local")
    n = model_size(name)
    if n is not None:
        if n <= 0:
            raise FinetuneHelperError("model", f"size must be > 0, got {name!r}")
        if n > MAX_PARAMETERS:
            raise FinetuneHelperError("model", f"{name!r} is beyond any model this planner describes; sizes up to "
                                      f"{MAX_PARAMETERS / 1e12:g}T parameters are accepted")
        warnings.warn(f"--model {name}: no config given, assuming a generic Llama-shaped model of about {name}; "
                      "name a catalog model or a config for exact numbers", UserWarning, stacklevel=2)
        return ModelSpec.from_config(generic_size_config(n), name=f"generic-{name}", origin="size")
    if is_hub_id(name):
        return ModelSpec.from_config(_fetch_hub_config(name), name=name, origin="hub")
    hint = catalog.suggest(name, "models")
    raise FinetuneHelperError("model", f"unknown model {name!r}" + (f"; did you mean {', '.join(hint)}?" if hint else "")
                              + " (catalog names: `finetune-helper models`; or a local directory with config.json, "
                              "a Hub id owner/name, or a size such as 7B)")


def _read_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FinetuneHelperError("model", f"cannot read {path}: {exc}") from exc


def _fetch_hub_config(repo_id: str) -> dict[str, Any]:
    """Download only ``config.json`` of a Hub model (no weights)."""
    alternatives = ("use a catalog model (`finetune-helper models`) or a local directory holding config.json")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:  # pragma: no cover - a dependency of transformers
        raise FinetuneHelperError("model", f"{repo_id} is not in the catalog and huggingface_hub is missing; "
                                  + alternatives) from exc
    try:
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity_error()  # one line from us, not the hub client's retry warnings
        path = hf_hub_download(repo_id, "config.json", etag_timeout=5)
    except Exception as exc:  # offline, gated, missing: all end the same way for the user
        hint = catalog.suggest(repo_id, "models")
        reason = type(exc).__name__
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
            reason = "HF_HUB_OFFLINE is set"
        raise FinetuneHelperError(
            "model", f"could not fetch config.json of {repo_id!r} from the Hub ({reason}); {alternatives}"
            + (f"; close catalog names: {', '.join(hint)}" if hint else "")
        ) from exc
    return _read_config(Path(path))
