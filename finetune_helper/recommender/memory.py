"""Peak training memory per GPU, as a breakdown in bytes.

    peak = weights + gradients + optimizer states + activations held for backward
           + the largest transient (logits gradient, a checkpointed layer's recompute)
           + overhead (CUDA context + caching-allocator fragmentation)

Gradients and optimizer states are counted as present at the peak: with gradient accumulation the gradients live
across micro-steps, and from the second optimizer step on the states exist during every forward/backward.
``allocated_peak`` (the total less the CUDA context) is what ``torch.cuda.max_memory_allocated`` measures.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from .activations import ActivationEstimate, estimate_activations
from .step import StepInputs, fused_head, phases
from ..errors import FinetuneHelperError
from .model import ModelSpec
from .optimizers import OPTIMIZERS
from .training_setup import DTYPE_BYTES, TrainingSetup
from .zero import ZERO_STAGES, check_offload, zero_states
from ..units import MiB

#: CUDA context + cuBLAS/cuDNN handles that the driver holds outside the caching allocator. PyTorch's CUDA notes
#: put the context at "a few hundred MiB" depending on the device and CUDA version (lazy module loading, CUDA >=
#: 11.7); 512 MiB is the usual figure for a torch 2.x process on A100/H100 class GPUs.
CUDA_CONTEXT_BYTES = 512 * MiB
#: Caching-allocator fragmentation: memory reserved but not allocated, as a fraction of the allocated peak. The
#: PyTorch memory-management docs (torch.cuda memory FAQ) explain reserved > allocated; 5% is typical of steady
#: transformer training loops with fixed shapes (expandable_segments lowers it further).
FRAGMENTATION = 0.05

#: NF4 stores 4 bits per weight plus one absmax per 64-value block (QLoRA, Dettmers et al. 2023, section 3):
#: fp32 absmax without double quantization, an 8-bit absmax plus one fp32 scale per 256 blocks with it.
NF4_BLOCK = 64
NF4_DQ_BLOCK = 256
#: Per quantized tensor, bitsandbytes' QuantState also holds the 16-entry fp32 NF4 code table, and with double
#: quantization the 256-entry fp32 code of the 8-bit scales and an fp32 offset (measured with
#: bitsandbytes.functional.quantize_4bit, tests/recommender/test_memory.py).
NF4_CODE_BYTES = 16 * 4
NF4_DQ_CONST_BYTES = 256 * 4 + 4

SHARDING = ("none", "ddp", "fsdp", "zero2", "zero3")


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-GPU bytes; every field documented with what it holds."""

    #: total and trainable parameter counts (LoRA: adapters only are trainable).
    parameters: int
    trainable_parameters: int
    #: model weights on this GPU: base (16/32-bit, NF4 with its block scales for QLoRA) plus LoRA adapters.
    weights: int
    #: gradients of trainable parameters (plus DDP's bucket copy when sharding is ``ddp``).
    gradients: int
    #: optimizer states of trainable parameters.
    optimizer_states: int
    #: activations saved for backward during the forward pass, held until backward (logits path included).
    activations: int
    #: short-lived peak on top of that: logits gradient / fp32 logits copy, one layer's recompute, FSDP gathers.
    transient: int
    #: CUDA context plus allocator fragmentation.
    overhead: int
    #: the moment of the step the peak is at (``step.phases``: head forward / backward, a layer's backward, the
    #: optimizer step); the parts above are what is live at that moment.
    peak_phase: str = ""
    #: finer parts of the above (activation components, adapter bytes, NF4 constants, every phase's total ...).
    details: dict[str, int] = field(default_factory=dict)
    #: host (CPU) memory per node for the states DeepSpeed offloads (0 without offload); not part of the total
    host_bytes: int = 0

    @property
    def breakdown(self) -> dict[str, int]:
        return {
            "weights": self.weights,
            "gradients": self.gradients,
            "optimizer_states": self.optimizer_states,
            "activations": self.activations,
            "transient": self.transient,
            "overhead": self.overhead,
        }

    @property
    def total_bytes(self) -> int:
        return sum(self.breakdown.values())

    @property
    def paged_bytes(self) -> int:
        """Optimizer states of a paged optimizer (bitsandbytes ``paged_*``): CUDA unified memory, outside PyTorch's
        caching allocator (not in ``max_memory_allocated``), resident on the GPU unless the driver pages it out."""
        return self.details.get("paged_optimizer_states", 0)

    @property
    def allocated_peak(self) -> int:
        """Predicted ``torch.cuda.max_memory_allocated`` (no CUDA context, no fragmentation, no paged states)."""
        return self.total_bytes - self.overhead - self.paged_bytes

    def calibrated(self, ratio: float) -> MemoryEstimate:
        """This estimate with its allocated bytes scaled by a probe's measured / estimated ``ratio``
        (:mod:`.calibration`); the difference shows as ``transient`` and in ``details["calibration"]``."""
        delta = int(round((ratio - 1) * self.allocated_peak))
        return replace(self, transient=self.transient + delta, details={**self.details, "calibration": delta})

    def to_dict(self) -> dict[str, Any]:
        return {
            "parameters": self.parameters,
            "trainable_parameters": self.trainable_parameters,
            "breakdown": self.breakdown,
            "details": dict(self.details),
            "allocated_peak_bytes": self.allocated_peak,
            "paged_bytes": self.paged_bytes,
            "total_bytes": self.total_bytes,
            "host_bytes": self.host_bytes,
            "peak_phase": self.peak_phase,
        }


def weight_bytes(spec: ModelSpec, setup: TrainingSetup) -> dict[str, int]:
    """Bytes of the base weights (and LoRA adapters), split into parts."""
    n = spec.num_parameters()
    if setup.method == "full":
        return {"base_weights": n * setup.master_bytes}
    base_dtype = DTYPE_BYTES[setup.dtype]  # the frozen base is loaded in the compute dtype
    parts: dict[str, int] = {}
    if setup.method == "qlora":
        quantized = spec.linear_weight_parameters()
        scales = 0
        for lin in spec.layer_linears():  # blocks never span two tensors
            blocks = -(-lin.weight_numel // NF4_BLOCK)
            per_tensor = (blocks + -(-blocks // NF4_DQ_BLOCK) * 4 + NF4_DQ_CONST_BYTES if setup.double_quant
                          else blocks * 4)
            scales += spec.num_hidden_layers * (per_tensor + NF4_CODE_BYTES)
        parts["nf4_weights"] = quantized // 2
        parts["nf4_block_scales"] = scales
        # embeddings, lm_head, norms and biases stay in 16 bit (bitsandbytes quantizes only nn.Linear weights)
        parts["base_weights"] = (n - quantized) * 2
    else:
        parts["base_weights"] = n * base_dtype
    parts["adapter_weights"] = spec.lora_parameters(setup.lora_r, setup.lora_target_modules) * 4
    return parts


def trainable(spec: ModelSpec, setup: TrainingSetup) -> tuple[int, int, int]:
    """(trainable parameters, their tensor count, bytes per trainable element)."""
    if setup.method == "full":
        return spec.num_parameters(), spec.num_parameter_tensors(), setup.master_bytes
    # PEFT keeps adapters in fp32 (autocast_adapter_dtype=True); TRL's SFTTrainer casts a quantized (QLoRA) model's
    # trainable parameters to bf16 (trl/trainer/sft_trainer.py, "the PEFT adapter weights are converted to bf16")
    return (spec.lora_parameters(setup.lora_r, setup.lora_target_modules), spec.lora_tensors(setup.lora_target_modules),
            2 if setup.method == "qlora" else 4)


def _layer_and_outside_trainable(spec: ModelSpec, setup: TrainingSetup) -> tuple[int, int, int]:
    """(trainable elements of one decoder layer, of everything outside the layers, of the largest tensor)."""
    if setup.method == "full":
        layer = spec.layer_linear_parameters() + spec.layer_norm_parameters()
        outside = spec.num_parameters() - spec.num_hidden_layers * layer
        largest = max([spec.vocab_size * spec.hidden_size] + [lin.weight_numel for lin in spec.layer_linears()])
        return layer, outside, largest
    r = setup.lora_r
    linears = spec.lora_linears(setup.lora_target_modules)
    layer = sum(r * (lin.in_features + lin.out_features) for lin in linears)
    return layer, 0, max(r * max(lin.in_features, lin.out_features) for lin in linears)


def optimizer_state_bytes(spec: ModelSpec, setup: TrainingSetup) -> int:
    info = OPTIMIZERS[setup.optim]
    n, tensors, elem = trainable(spec, setup)
    state_elem = info.state_bytes if info.state_bytes is not None else elem
    if info.factored:  # Adafactor: rows + cols per matrix, full size for vectors, always fp32 (it upcasts grads)
        state_elem = 4
        if setup.method == "full":
            per_layer = sum(lin.in_features + lin.out_features + (lin.out_features if lin.bias else 0)
                            for lin in spec.layer_linears()) + spec.layer_norm_parameters()
            matrices = (spec.vocab_size + spec.hidden_size) * (1 if spec.tie_word_embeddings else 2)
            elements = spec.num_hidden_layers * per_layer + matrices + spec.hidden_size
        else:
            elements = spec.num_hidden_layers * sum(setup.lora_r + lin.in_features + setup.lora_r + lin.out_features
                                                    for lin in spec.lora_linears(setup.lora_target_modules))
        # plus the fp32 0-dim "RMS" tensor transformers' Adafactor keeps per parameter tensor
        return int(elements * state_elem) + 4 * tensors
    states = int(round(info.states * n * state_elem))
    if info.step_tensor:
        states += 4 * tensors  # one fp32 `step` scalar per parameter tensor (torch.optim defaults)
    return states


def estimate_memory(spec: ModelSpec, setup: TrainingSetup, *, gpus: int = 1, sharding: str = "none",
                    accumulation: int = 1, offload: str = "none", nodes: int = 1) -> MemoryEstimate:
    """Peak memory on one GPU for one micro-step of ``setup``.

    ``sharding``: ``none`` (one GPU, or data parallel without DDP buckets), ``ddp`` (replicated, plus DDP's gradient
    buckets), ``fsdp`` (FULL_SHARD: weights, gradients and states split over ``gpus``, two layers gathered),
    ``zero2`` / ``zero3`` (DeepSpeed: :mod:`.zero`), the latter with ``offload`` ``optimizer`` or ``all`` to the
    host of each of ``nodes`` nodes (:attr:`MemoryEstimate.host_bytes`).
    """
    if not isinstance(gpus, int) or gpus < 1:
        raise FinetuneHelperError("gpus", f"must be an integer >= 1, got {gpus!r}")
    if sharding not in SHARDING:
        raise FinetuneHelperError("sharding", f"{sharding!r} is not one of {', '.join(SHARDING)}")
    check_offload(sharding, offload)
    if setup.attn_implementation not in (spec.traits.attn_implementations if spec.traits else ("sdpa", "eager")):
        raise FinetuneHelperError("attn-implementation", f"{spec.model_type} does not support "
                                  f"{setup.attn_implementation} in transformers 5")
    weight_parts = weight_bytes(spec, setup)
    weights = sum(weight_parts.values())
    n_train, _, elem = trainable(spec, setup)
    gradients = n_train * elem
    optim = optimizer_state_bytes(spec, setup)
    act_setup = setup
    zero = sharding in ZERO_STAGES
    if ((sharding == "fsdp" and gpus > 1) or zero) and setup.method == "full" and setup.autocast:
        # FSDP mixed precision (accelerate's FSDP path, no torch.autocast): each layer's parameters are gathered in
        # the 16-bit compute dtype and freed after use, so activations are those of 16-bit weights -- no autocast
        # cache of whole-model weight copies.  DeepSpeed casts the module itself to the 16-bit dtype.
        act_setup = replace(setup, dtype="bf16", weights_dtype="bf16")
    acts: ActivationEstimate = estimate_activations(spec, act_setup)
    details: dict[str, int] = {**weight_parts, **{f"activations.{k}": v for k, v in acts.as_dict().items()}}
    layer_train, outside_train, largest = _layer_and_outside_trainable(spec, setup)
    layer_grads, outside_grads = layer_train * elem, outside_train * elem

    shards = gpus if sharding == "fsdp" else 1
    gathered = 0
    if sharding == "fsdp" and gpus > 1:
        # FULL_SHARD keeps 1/N of everything; a layer's full weights are all-gathered for its forward/backward, and
        # the next one is prefetched (torch FSDP backward_prefetch=BACKWARD_PRE), so two layers are unsharded at once,
        # gathered in the compute dtype under mixed precision (FSDP MixedPrecision param_dtype).
        layer_weights = (spec.layer_linear_parameters() + spec.layer_norm_parameters()) * (
            2 if setup.autocast else 4)
        gathered = 2 * layer_weights
        details["fsdp_gathered_layers"] = gathered
        weights, gradients, optim = -(-weights // shards), -(-gradients // shards), -(-optim // shards)
        layer_grads, outside_grads = -(-layer_grads // shards), -(-outside_grads // shards)
    host = 0
    if zero:
        # DeepSpeed's partitions replace the replicated weights, gradients and states (layer gradients in proportion)
        frozen = weights - weight_parts.get("adapter_weights", 0) if setup.method != "full" else 0
        states = zero_states(spec, strategy=sharding, offload=offload, gpus=gpus, trainable=n_train,
                             frozen_bytes=frozen, nodes=nodes)
        share = states.gradients / gradients if gradients else 0.0
        weights, gradients, optim, gathered, host = (states.weights, states.gradients, states.optimizer_states,
                                                     states.gathered, states.host)
        layer_grads, outside_grads = int(layer_grads * share), int(outside_grads * share)
        details.update({"zero_gathered_module": gathered, "zero_host_per_node": host})
    if sharding == "ddp" and gpus > 1:
        # DDP copies gradients into communication buckets (gradient_as_bucket_view=False, the default): a second
        # gradient-sized buffer (torch.nn.parallel.DistributedDataParallel docs).
        details["ddp_buckets"] = gradients
        gradients *= 2

    # the whole gradient (the breakdown's ``gradients`` is what is live at the peak moment)
    details["gradients.all"] = gradients
    head = fused_head(spec, setup) if setup.loss == "fused" else None
    if head is not None:
        details.update({f"fused_head.{k}": v for k, v in head.items()})
    if OPTIMIZERS[setup.optim].paged:
        details["paged_optimizer_states"] = optim
    inputs = StepInputs(weights=weights, gradients=gradients, optimizer_states=optim, activations=acts,
                        layer_gradients=layer_grads, outside_gradients=outside_grads,
                        largest_trainable_tensor=largest * elem, head=head)
    moments = phases(spec, setup, inputs, accumulation=accumulation)
    peak = max(moments, key=lambda p: p.total)
    for moment in moments:
        details[f"phase.{moment.name}"] = moment.total
    parts = dict(peak.parts)
    transient = parts.get("transient", 0) + gathered
    allocated = peak.total + gathered
    overhead = CUDA_CONTEXT_BYTES + int(FRAGMENTATION * allocated) if setup.device == "cuda" else 0
    details["cuda_context"] = CUDA_CONTEXT_BYTES if setup.device == "cuda" else 0
    details["fragmentation"] = overhead - details["cuda_context"]
    return MemoryEstimate(
        parameters=spec.num_parameters(),
        trainable_parameters=n_train,
        weights=parts.get("weights", 0),
        gradients=parts.get("gradients", 0),
        optimizer_states=parts.get("optimizer_states", 0),
        activations=parts.get("activations", 0),
        transient=transient,
        overhead=overhead,
        peak_phase=peak.name,
        details=details,
        host_bytes=host,
    )
