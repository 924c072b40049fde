"""Count the FLOPs a training step executes: ``torch.utils.flop_counter.FlopCounterMode``, with the CPU's SDPA kernels.

``FlopCounterMode`` counts every matmul-class op it has a formula for (``mm``, ``addmm``, ``bmm``, the CUDA SDPA
kernels).  torch 2.13 has no formula for the CPU's fused attention (``_scaled_dot_product_flash_attention_for_cpu``
and its backward), so on the CPU SDPA would count as zero: :func:`flop_counter` adds them with torch's own SDPA
formulas (``sdpa_flop_count`` / ``sdpa_backward_flop_count``: the full ``s x s`` square, as for the CUDA kernels);
nor for the in-place ``addmm_`` that TRL's fused LM head accumulates its two gradients with on the CPU
(``trl/kernels/chunked_logprob.py``, ``_addmm_fp32``): added with torch's ``mm`` formula; nor for bitsandbytes'
4-bit matmul (QLoRA's frozen base, ``bitsandbytes::gemm_4bit``): ``2 * tokens * N * K`` for its ``shapeB = [N, K]``.
Elementwise ops (norms, activations, the optimizer's update) are not counted, by FlopCounterMode's design.

The estimator (``recommender.flops``) is checked against these counts: over the runner's own steps
(:func:`.runner_step.measure_recipe` with ``flops=True``) and over real-size replicas under fake tensors
(:func:`count_replica_step`).
"""

from __future__ import annotations

import importlib.util
from typing import Any


def _sdpa_cpu(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _addmm_inplace(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import mm_flop

    return mm_flop(a_shape, b_shape)


def _gemm_4bit(a_shape, b_shape, shape_b, *args, out_shape=None, **kwargs) -> int:
    import math

    return 2 * math.prod(a_shape[:-1]) * shape_b[0] * shape_b[1]


def flop_counter():
    """A ``FlopCounterMode`` (no display) that also counts the CPU's SDPA kernels."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu,
               aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward,
               aten.addmm_: _addmm_inplace}
    if importlib.util.find_spec("bitsandbytes") is not None:
        import bitsandbytes  # noqa: F401 - defines torch.ops.bitsandbytes

        mapping[torch.ops.bitsandbytes.gemm_4bit] = _gemm_4bit
    return FlopCounterMode(display=False, custom_mapping=mapping)


def count_replica_step(config: dict[str, Any], setup, *, accumulation: int = 1, fake: bool = True) -> int:
    """FLOPs counted over one optimizer step of the runner's replica (``.replica``) of ``setup``: a catalog-size
    model under fake tensors when ``fake`` (no weights in memory)."""
    from contextlib import nullcontext

    from torch._subclasses.fake_tensor import FakeTensorMode

    from .replica import _as_real_masking, build_model, create_optimizer, label_tokens, make_batch, train_step

    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
    model = build_model(config, setup, fake=fake, mode=mode)
    with mode if fake else nullcontext():
        optimizer = create_optimizer(model, setup)
    batches = [make_batch(setup, config["vocab_size"], seed=i) for i in range(accumulation)]
    tokens = label_tokens(batches)
    counter = flop_counter()
    with mode if fake else nullcontext(), _as_real_masking(fake), counter:
        train_step(model, optimizer, batches, setup, tokens=tokens)
    return counter.get_total_flops()
