"""How one training step is set up: the inputs of the memory estimate.

Precision semantics (``dtype``), as the Hugging Face stack behaves:
- ``bf16``: weights loaded in bfloat16 (``from_pretrained(dtype=torch.bfloat16)``), Trainer ``bf16=True``; gradients
  and torch-optimizer states follow the parameter dtype.
- ``fp16``: fp32 master weights with fp16 autocast (Trainer ``fp16=True``; the GradScaler refuses fp16 gradients),
  so weights, gradients and states are fp32 and activations fp16.
- ``fp32``: everything fp32.
For LoRA / QLoRA the frozen base is stored in ``dtype`` (QLoRA: NF4 linears) while PEFT keeps adapters in fp32
(``autocast_adapter_dtype=True``, its default).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import FinetuneHelperError
from .optimizers import OPTIMIZERS, optimizer_names

METHODS = ("full", "lora", "qlora")
#: bytes of one element for the precisions we train in.
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


@dataclass(frozen=True)
class TrainingSetup:
    #: ``full`` fine-tuning, ``lora`` (frozen base in ``dtype``) or ``qlora`` (frozen base in NF4).
    method: str = "full"
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
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: str | tuple[str, ...] = "all-linear"
    #: attention kernel: ``sdpa`` and ``flash_attention_2`` keep no seq x seq matrix, ``eager`` does.
    attn_implementation: str = "sdpa"
    #: QLoRA nested quantization of the NF4 block scales (bitsandbytes ``bnb_4bit_use_double_quant``).
    double_quant: bool = True

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
    def master_bytes(self) -> int:
        """Bytes per trainable weight element as stored: fp16 training keeps fp32 master weights."""
        return 4 if self.dtype in ("fp16", "fp32") else 2

    @property
    def tokens(self) -> int:
        return self.micro_batch_size * self.seq_len
