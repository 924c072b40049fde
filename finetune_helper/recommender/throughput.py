"""How long a step takes on a GPU: tokens per second per GPU, seconds per step, MFU.

For the runner's stack (HF Trainer / TRL, eager PyTorch, SDPA or FlashAttention-2), one micro-step on one GPU:

    compute   = executed matmul FLOPs (recommender.flops) / (peak dense bf16 FLOP/s x efficiency of the GPU class)
    memory    = weight bytes read by the micro-step's passes / memory bandwidth (forward, backward, recompute)
    host      = operators the micro-step issues (forward, loss, backward) x the host's time per operator: eager
                PyTorch issues every operator from Python, so the GPU cannot finish sooner
    micro     = max(compute, memory, host)           (a roofline: small micro-batches of large models are bound by
                                                      weight reads or by the host)
    gathers   = FSDP / ZeRO-3: each micro-step all-gathers the 16-bit weights twice and reduce-scatters the
                gradients over the GPU interconnect; overlapped with compute (prefetch): max(micro, gathers)

and per optimizer step:

    optimizer = bytes the update touches (weights, gradients, states, clipping) / memory bandwidth
    reduce    = DDP: the gradients' all-reduce, overlapped with the last backward (only what exceeds it counts);
                ZeRO-2: the gradients reduce-scattered each micro-step, the weights all-gathered after the step
    offload   = DeepSpeed's optimizer offload: gradients to the host and weights back over PCIe, and the host's
                Adam step (synchronous): each rank's partition at one thread per rank (torchrun's default with
                several processes), never faster than the node's memory bandwidth allows

    step = accumulation x micro + optimizer + reduce + offload;  tokens/s per GPU = tokens per GPU per step / step

The efficiency and every other constant are in ``data/throughput.yaml`` with their sources; ``benchmarks/
time_vs_published.py`` derives the efficiency from published non-HF rows and tests the model on held-out
HF-Trainer / TRL rows.  Not modelled: the optimizer step's host time (one foreach update per optimizer step), data
loading, evaluation and checkpoint saves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..units import fmt_run_length
from . import catalog
from .flops import estimate_flops
from .gpu import GPUSpec
from .memory import trainable
from .model import ModelSpec
from .optimizers import OPTIMIZERS
from .training_setup import DTYPE_BYTES, TrainingSetup

#: bytes one optimizer step reads and writes per trainable parameter beyond its states: the weight (read, write),
#: its gradient (read by the update, read and scaled by clip_grad_norm_)
_UPDATE_TOUCHES = {"weight": 2, "gradient": 3}


def constants() -> dict[str, Any]:
    return catalog._load("throughput.yaml")


@dataclass(frozen=True)
class StepTime:
    """Predicted time of one optimizer step on one GPU, by part (seconds)."""

    tokens_per_micro_step: int
    accumulation: int
    micro_step: float
    optimizer: float
    communication: float
    offload: float
    #: which bound the micro-step: ``compute``, ``memory`` (weight reads), ``host`` (eager PyTorch issuing its
    #: operators) or ``communication`` (FSDP / ZeRO-3 gathers)
    bound: str
    flops_per_token: float
    model_flops_per_token: float
    peak_flops: float
    efficiency: float
    parts: dict[str, float] = field(default_factory=dict)

    @property
    def seconds_per_step(self) -> float:
        return self.accumulation * self.micro_step + self.optimizer + self.communication + self.offload

    @property
    def tokens_per_second_per_gpu(self) -> float:
        return self.accumulation * self.tokens_per_micro_step / self.seconds_per_step

    @property
    def mfu(self) -> float:
        """Model FLOPs utilisation: 6N + 12LHQT per token (``flops.model_flops_per_token``) at this rate."""
        return self.model_flops_per_token * self.tokens_per_second_per_gpu / self.peak_flops

    def to_dict(self) -> dict[str, Any]:
        return {"flops_per_token": self.flops_per_token, "model_flops_per_token": self.model_flops_per_token,
                "tokens_per_second_per_gpu": self.tokens_per_second_per_gpu,
                "seconds_per_micro_step": self.micro_step, "seconds_per_step": self.seconds_per_step,
                "mfu": self.mfu, "bound": self.bound, "efficiency": self.efficiency,
                "parts": {k: v for k, v in self.parts.items()}}


def interconnect_bytes_per_second(gpu: GPUSpec) -> float:
    """One-way GPU-to-GPU bandwidth (half the datasheet's bidirectional figure)."""
    links = constants()["interconnect_gbps"]
    return links.get(gpu.name, links["default_pcie4"]) * 1e9 / 2


def _weight_bytes(spec: ModelSpec, setup: TrainingSetup) -> float:
    """Bytes of the decoder weights one pass reads: the 16-bit copies the matmuls use (full fine-tuning under
    autocast reads its fp32 masters and writes the 16-bit copy as well), NF4 for QLoRA."""
    n = spec.num_parameters()
    if setup.method == "qlora":
        return n * 0.5
    if setup.method == "full" and setup.master_bytes == 4 and setup.autocast:
        return n * (4 + 2 + 2)
    return n * (setup.master_bytes if setup.method == "full" else DTYPE_BYTES[setup.dtype])


def _optimizer_bytes(spec: ModelSpec, setup: TrainingSetup) -> float:
    n, _, elem = trainable(spec, setup)
    info = OPTIMIZERS[setup.optim]
    state = info.state_bytes if info.state_bytes is not None else elem
    return n * (elem * (_UPDATE_TOUCHES["weight"] + _UPDATE_TOUCHES["gradient"]) + 2 * info.states * state)


def host_ops_per_micro_step(spec: ModelSpec, setup: TrainingSetup) -> float:
    """Operators one micro-step (forward, loss, backward) issues from the host in eager PyTorch
    (``data/throughput.yaml``, ``host_ops``: counted on the runner's own step by ``benchmarks/host_ops.py``):
    the fixed ones plus, per decoder layer, the layer's own and those of each LoRA-wrapped linear.  An architecture
    the table does not list is counted as Llama."""
    table = constants()["host_ops"]
    arch = spec.model_type if spec.model_type in table["per_layer"] else "llama"
    gc = setup.gradient_checkpointing
    key = setup.method + ("+gc" if gc else "")
    per_layer = table["per_layer"][arch][key]
    if setup.is_peft:
        adapters = len(spec.lora_linears(setup.lora_target_modules))
        per_layer += adapters * table["per_lora_linear"]["gc" if gc else "plain"]
    return table["fixed"][arch][key] + spec.num_hidden_layers * per_layer


def host_adam_seconds(n_train: int, gpus: int) -> float:
    """The host's Adam step under DeepSpeed's optimizer offload, per optimizer step (``data/throughput.yaml``,
    ``host_adam``): each rank's partition at one thread when several ranks share a node (torchrun's
    OMP_NUM_THREADS=1), and never faster than the node's memory bandwidth moves the whole node's partitions."""
    const = constants()
    host = const["host_adam"]
    per_node = min(gpus, const["gpus_per_node"])
    partition = n_train / gpus
    threads = partition * host["ns_per_parameter_per_thread"] * 1e-9 if per_node > 1 else 0.0
    bandwidth = partition * per_node * host["bytes_per_parameter"] / (host["host_memory_gbps"] * 1e9)
    return max(threads, bandwidth)


def step_time(spec: ModelSpec, setup: TrainingSetup, gpu: GPUSpec, *, gpus: int = 1, sharding: str = "none",
              accumulation: int = 1, offload: str = "none", efficiency: float | None = None,
              speedup: float = 1.0, host_seconds_per_op: float | None = None) -> StepTime | None:
    """The predicted step on ``gpu`` (see the module docstring); None when the catalog lacks the GPU's peak or
    bandwidth.  ``efficiency``: the stack's share of the peak (default: the calibrated one of the GPU's class);
    ``speedup``: a faster stack's gain over the runner's (``compile_speedup``), for published rows;
    ``host_seconds_per_op``: the host's time per operator (default: the calibrated ``host_seconds_per_op``)."""
    if not gpu.peak_tflops or not gpu.memory_bandwidth_gbps:
        return None
    const = constants()
    eff = efficiency if efficiency is not None else const["efficiency"].get(gpu.kind or "datacenter",
                                                                             const["efficiency"]["datacenter"])
    peak = gpu.peak_tflops * 1e12
    bandwidth = gpu.memory_bandwidth_gbps * 1e9
    flops = estimate_flops(spec, setup)
    compute = flops.executed / (peak * eff * speedup)
    passes = 2 + int(setup.gradient_checkpointing)
    memory = passes * _weight_bytes(spec, setup) / bandwidth  # sharded or not, each GPU's matmuls read whole layers
    host = host_ops_per_micro_step(spec, setup) * (host_seconds_per_op if host_seconds_per_op is not None
                                                   else const["host_seconds_per_op"])
    micro, bound = max((compute, "compute"), (memory, "memory"), (host, "host"))
    parts = {"compute": compute, "weight_reads": memory, "host": host}
    link = interconnect_bytes_per_second(gpu) if gpus > 1 else 0.0
    share = (gpus - 1) / gpus
    n_train, _, elem = trainable(spec, setup)
    half = DTYPE_BYTES[setup.dtype] if setup.autocast else 4
    communication = 0.0
    if gpus > 1 and sharding in ("fsdp", "zero3"):
        gathers = share * (2 * spec.num_parameters() * half + n_train * half) / link
        parts["gathers"] = gathers
        if gathers > micro:
            micro, bound = gathers, "communication"
    elif gpus > 1 and sharding == "ddp":
        reduce = 2 * share * n_train * elem / link
        communication = max(0.0, reduce - compute * 2 / 3)  # overlapped with the last micro-step's backward
        parts["all_reduce"] = reduce
    elif gpus > 1 and sharding == "zero2":
        communication = accumulation * share * n_train * half / link + share * n_train * half / link
        parts["reduce_scatter_and_gather"] = communication
    optimizer = _optimizer_bytes(spec, setup) / (gpus if sharding in ("fsdp", "zero2", "zero3") else 1) / bandwidth
    offload_seconds = 0.0
    if offload != "none":
        pcie = n_train / gpus * (elem + half) / (const["offload_pcie_gbps"] * 1e9)
        optimizer = 0.0  # the host runs the update
        parts["offload_pcie"] = pcie
        parts["host_adam"] = host_adam_seconds(n_train, gpus)
        offload_seconds = pcie + parts["host_adam"]
    parts["optimizer"] = optimizer
    return StepTime(tokens_per_micro_step=setup.tokens, accumulation=accumulation, micro_step=micro,
                    optimizer=optimizer, communication=communication, offload=offload_seconds, bound=bound,
                    flops_per_token=flops.flops_per_token(setup.tokens * accumulation),
                    model_flops_per_token=flops.model_flops_per_token, peak_flops=peak, efficiency=eff * speedup,
                    parts=parts)


def describe(time: dict[str, Any], gpu: str, steps: int | None = None) -> str | None:
    """One line on a plan's predicted speed (``Plan.time``'s dict), or None without a GPU rate."""
    if "tokens_per_second_per_gpu" not in time:
        return None
    line = (f"predicted on {gpu} (HF Trainer / TRL, eager): {time['tokens_per_second_per_gpu']:,.0f} tokens/s per "
            f"GPU, {time['seconds_per_step']:.3g} s per optimizer step")
    if steps and "total_seconds" in time:
        line += f", about {fmt_run_length(time['total_seconds'])} for {steps} steps"
    line += f" (MFU {time['mfu']:.0%}, {time['bound']}-bound)"
    if "calibration" in time:
        line += f"; {time['calibration']}"
    if "cost" in time:
        line += f"; about {time['cost']['total']:,.2f} at {time['cost']['price_per_gpu_hour']:g} per GPU-hour"
    return line
