"""Optimizer facts by ``TrainingArguments.optim`` name: state tensors, their precision, and the LR-scaling rule.

Sources: ``torch.optim.AdamW`` keeps ``exp_avg`` and ``exp_avg_sq`` shaped and typed like the parameter plus a
fp32 ``step`` scalar per parameter tensor; bitsandbytes 8-bit optimizers keep uint8 states with one fp32 absmax
per block of 256 values (``bitsandbytes/optim/optimizer.py``, ``blocksize=256``) and fp32 states for tensors under
4096 elements (``min_8bit_size``); 32-bit bnb optimizers keep fp32 states; transformers' ``Adafactor`` without
``beta1`` keeps factored row and column second moments; ``torch.optim.SGD`` without momentum keeps nothing.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OptimizerInfo:
    name: str
    #: full-size state tensors per parameter (Adam: 2).
    states: int
    #: bytes per state element: ``None`` means the parameter's own dtype (torch optimizers).
    state_bytes: float | None
    #: ``adam`` family scales LR with the square root of the batch, ``sgd`` linearly.
    family: str
    #: bitsandbytes is needed (CUDA builds; the runner reports a clear error elsewhere).
    needs_bnb: bool = False
    #: states live in CUDA unified memory and can page out to CPU under pressure.
    paged: bool = False
    #: second moment stored factored (Adafactor): (rows + cols) elements per matrix.
    factored: bool = False
    #: one fp32 ``step`` scalar per parameter tensor (torch AdamW and friends).
    step_tensor: bool = False


#: Blockwise 8-bit states: 1 byte per value + one fp32 absmax per 256-value block (bitsandbytes blocksize=256).
BNB_8BIT_BYTES = 1 + 4 / 256

OPTIMIZERS: dict[str, OptimizerInfo] = {
    o.name: o
    for o in (
        OptimizerInfo("adamw_torch", 2, None, "adam", step_tensor=True),
        OptimizerInfo("adamw_torch_fused", 2, None, "adam", step_tensor=True),
        OptimizerInfo("adamw_bnb_8bit", 2, BNB_8BIT_BYTES, "adam", needs_bnb=True),
        OptimizerInfo("adamw_8bit", 2, BNB_8BIT_BYTES, "adam", needs_bnb=True),
        OptimizerInfo("paged_adamw_8bit", 2, BNB_8BIT_BYTES, "adam", needs_bnb=True, paged=True),
        OptimizerInfo("paged_adamw_32bit", 2, 4, "adam", needs_bnb=True, paged=True),
        OptimizerInfo("adamw_torch_8bit", 2, BNB_8BIT_BYTES, "adam"),  # torchao AdamW8bit, blockwise like bnb
        OptimizerInfo("ademamix", 3, None, "adam", step_tensor=True),
        OptimizerInfo("ademamix_8bit", 3, BNB_8BIT_BYTES, "adam", needs_bnb=True),
        OptimizerInfo("lion_8bit", 1, BNB_8BIT_BYTES, "adam", needs_bnb=True),
        OptimizerInfo("lion_32bit", 1, 4, "adam", needs_bnb=True),
        OptimizerInfo("paged_lion_8bit", 1, BNB_8BIT_BYTES, "adam", needs_bnb=True, paged=True),
        OptimizerInfo("paged_lion_32bit", 1, 4, "adam", needs_bnb=True, paged=True),
        OptimizerInfo("adafactor", 1, None, "adam", factored=True),
        OptimizerInfo("adagrad", 1, None, "adam", step_tensor=True),
        OptimizerInfo("rmsprop", 1, None, "adam", step_tensor=True),
        OptimizerInfo("sgd", 0, None, "sgd"),
    )
}

#: what the planner reaches for when full-precision states do not fit (QLoRA paper, Dettmers et al. 2023).
EIGHT_BIT_FALLBACK = "paged_adamw_8bit"


def optimizer_names() -> list[str]:
    return list(OPTIMIZERS)


def is_eight_bit(name: str) -> bool:
    info = OPTIMIZERS[name]
    return info.state_bytes is not None and info.state_bytes < 2
