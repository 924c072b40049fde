"""How one training step is set up: the inputs of the memory estimate.

Precision semantics, as the Hugging Face stack behaves:
- ``dtype`` is the compute precision: ``bf16`` / ``fp16`` mean Trainer ``bf16=True`` / ``fp16=True``, under which
  accelerate runs every forward pass in ``torch.autocast(dtype)`` (mixed precision); ``fp32`` means no autocast.
- ``weights_dtype`` is how the weights are stored. Full fine-tuning defaults to fp32 master weights (mixed
  precision: fp32 weights, gradients and AdamW states, 16 bytes per parameter before activations; pure-bf16 AdamW
  loses updates smaller than bf16's 2^-8 relative precision, e.g. most of a 2e-5 step). ``weights_dtype="bf16"``
  is the memory-saving alternative (load with ``dtype=torch.bfloat16``): gradients and torch-optimizer states then
  follow the parameters' bf16. fp16 full fine-tuning always needs fp32 masters (the GradScaler refuses fp16
  gradients).
- LoRA / QLoRA: the frozen base is stored in ``dtype`` (QLoRA: NF4 linears), PEFT keeps adapters in fp32
  (``autocast_adapter_dtype=True``, its default).
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import defaults
from ..errors import FinetuneHelperError
from .optimizers import OPTIMIZERS, optimizer_names

METHODS = defaults.METHODS
#: bytes of one element for the precisions we train in.
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
#: the torch dtype (``getattr(torch, name)``) of each precision name
TORCH_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
DEVICES = ("cuda", "cpu")
LOSS_PATHS = ("fused", "logits")
#: the loss path of each trainer a plan can be made for (``defaults.TRAINERS``): TRL 1.16's ``SFTTrainer.compute_loss``
#: calls the model with ``fused_lm_head=True``; ``transformers.Trainer`` takes the model's own loss
#: (``loss/loss_utils.py``: ``logits.float()``)
TRAINER_LOSS = {"trl": "fused", "transformers": "logits"}


def step_shape(batch: int, seq_len: int, *, packing: bool) -> tuple[int, int, bool]:
    """(rows, row length, padded) of what the collator builds from ``batch`` examples of up to ``seq_len`` tokens.

    Packing (TRL ``packing=True``, padding-free): the examples are concatenated into one row, ``position_ids``
    restarting at each (no padding; without a varlen kernel transformers builds a block-diagonal mask over the row).
    Otherwise ``batch`` rows padded to the longest, the worst case: padded whenever there are several rows."""
    if packing:
        return 1, batch * seq_len, False
    return batch, seq_len, batch > 1


@dataclass(frozen=True)
class TrainingSetup:
    #: ``full`` fine-tuning, ``lora`` (frozen base in ``dtype``) or ``qlora`` (frozen base in NF4).
    method: str = defaults.METHOD
    #: sequences per GPU per forward pass (``per_device_train_batch_size``).
    micro_batch_size: int = 1
    #: tokens per sequence (padded or packed length).
    seq_len: int = 2048
    #: training precision, see the module docstring.
    dtype: str = "bf16"
    #: a ``TrainingArguments.optim`` name (``adamw_torch``, ``adamw_bnb_8bit``, ``paged_adamw_8bit``, ``adafactor``, ``sgd``...).
    optim: str = "adamw_torch"
    #: recompute each decoder layer in backward (transformers ``gradient_checkpointing_enable``).
    gradient_checkpointing: bool = False
    #: LoRA rank, scaling numerator, dropout and targeted linears (PEFT ``LoraConfig``).
    lora_r: int = defaults.LORA_R
    lora_alpha: int = defaults.LORA_ALPHA
    lora_dropout: float = defaults.LORA_DROPOUT
    lora_target_modules: str | tuple[str, ...] = defaults.TARGET_MODULES
    #: attention kernel: ``sdpa`` and ``flash_attention_2`` keep no seq x seq matrix, ``eager`` does.
    attn_implementation: str = "sdpa"
    #: QLoRA nested quantization of the NF4 block scales (bitsandbytes ``bnb_4bit_use_double_quant``).
    double_quant: bool = True
    #: storage of the weights: None is the default (full: fp32 masters unless dtype is fp32 anyway; LoRA: the base in
    #: ``dtype``); ``bf16`` with full fine-tuning is pure-bf16 training.
    weights_dtype: str | None = None
    #: where the step runs: ``cuda`` or ``cpu``.  Kernels differ: TRL's fused LM head runs Triton on CUDA and torch
    #: tiles elsewhere, a dropout mask is a bool on CUDA and the input dtype on the CPU.
    device: str = "cuda"
    #: the loss path: ``fused`` (TRL ``SFTTrainer``: the chunked LM head never builds the vocabulary-wide logits) or
    #: ``logits`` (the model's own loss: full logits and their fp32 upcast; label smoothing, custom loss functions).
    loss: str = "fused"
    #: batches padded to their longest row (TRL's collator): transformers then builds an explicit attention mask and
    #: SDPA repeats K/V for grouped-query attention.  False: every row is as long as the batch (or one row).
    padded: bool = True
    #: padding-free packed rows (TRL ``packing=True``): one row of ``seq_len`` tokens holds several examples.
    packing: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise FinetuneHelperError("method", f"{self.method!r} is not one of {', '.join(METHODS)}")
        for name in ("micro_batch_size", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise FinetuneHelperError(name.replace("micro_batch_size", "batch").replace("_", "-"),
                                          f"must be a positive integer, got {value!r}")
        if self.dtype not in DTYPE_BYTES:
            raise FinetuneHelperError("dtype", f"{self.dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
        if self.optim not in OPTIMIZERS:
            raise FinetuneHelperError("optim", f"{self.optim!r} is not supported; choose from {', '.join(optimizer_names())}")
        if self.method != "full" and (not isinstance(self.lora_r, int) or self.lora_r <= 0):
            raise FinetuneHelperError("lora-r", f"must be a positive integer, got {self.lora_r!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise FinetuneHelperError("lora-dropout", f"must be in [0, 1), got {self.lora_dropout!r}")
        if self.weights_dtype not in (None, "bf16", "fp32"):
            raise FinetuneHelperError("weights-dtype", f"{self.weights_dtype!r} is not one of bf16, fp32")
        if self.weights_dtype == "bf16" and (self.dtype != "bf16" or self.method != "full"):
            raise FinetuneHelperError("weights-dtype", "bf16 weights are an option of full fine-tuning with --dtype bf16")
        if self.device not in DEVICES:
            raise FinetuneHelperError("device", f"{self.device!r} is not one of {', '.join(DEVICES)}")
        if self.loss not in LOSS_PATHS:
            raise FinetuneHelperError("loss", f"{self.loss!r} is not one of {', '.join(LOSS_PATHS)}")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise FinetuneHelperError("attn-implementation", f"{self.attn_implementation!r} is not one of "
                                      f"{', '.join(ATTN_IMPLEMENTATIONS)}")

    @property
    def is_peft(self) -> bool:
        return self.method in ("lora", "qlora")

    @property
    def act_bytes(self) -> int:
        """Bytes per activation element (fp16 autocast runs activations in 2 bytes)."""
        return DTYPE_BYTES[self.dtype]

    @property
    def autocast(self) -> bool:
        """The forward runs under ``torch.autocast`` (Trainer ``bf16=True`` / ``fp16=True``)."""
        return self.dtype != "fp32"

    @property
    def pure_bf16(self) -> bool:
        """Full fine-tuning with bf16 weights, gradients and optimizer states (no fp32 masters)."""
        return self.method == "full" and self.weights_dtype == "bf16"

    @property
    def master_bytes(self) -> int:
        """Bytes per element of full fine-tuning's weights: fp32 masters unless pure bf16."""
        return 2 if self.pure_bf16 else 4

    @property
    def load_dtype(self) -> str:
        """The dtype the model's weights are loaded in: fp32 masters (mixed-precision full fine-tuning, fp32 runs),
        bf16 for pure-bf16 full fine-tuning, the compute dtype for a LoRA / QLoRA base."""
        if self.method == "full":
            return "fp32" if self.master_bytes == 4 else "bf16"
        return self.dtype

    @property
    def tokens(self) -> int:
        return self.micro_batch_size * self.seq_len
