"""DeepSpeed ZeRO's model states per GPU, and on the host when they are offloaded.

Taken from DeepSpeed's own estimator (``deepspeed/runtime/zero/stage_1_and_2.py``
``estimate_zero2_model_states_mem_needs`` and ``stage3.py`` ``estimate_zero3_model_states_mem_needs``, DeepSpeed
0.19) where the real engine agrees with it, and from a measurement of the engine where it does not
(:mod:`finetune_helper.measure.zero_states`: live tensor bytes per rank of ``deepspeed.initialize`` + steps, two
ranks on the CPU; ``benchmarks/sharded_vs_engine.py``).  Per trainable parameter: the fp32 master partition (4
bytes) and Adam's two fp32 moments (8), 1/N each, the module's 16-bit parameters (2) and the gradient partitions:

* ZeRO-2: 16-bit parameters whole on every GPU; a 16-bit and a 32-bit gradient partition (2 + 4): 2 + 18 / N, as
  the estimator says.
* ZeRO-3: the 16-bit parameters split too; the estimator counts 18 / N (no 16-bit gradients), but the engine keeps
  a 16-bit gradient partition for the whole run next to the 32-bit one of the step: 20 / N here.  One module at a
  time is gathered: the largest module's 16-bit parameters and gradients (4 bytes per parameter, the estimator's).
* Offloading the optimizer moves the master partition, the moments and the 32-bit gradients to the host (ZeRO-3:
  the 16-bit gradient partition too); ZeRO-2 keeps a device staging buffer the size of the largest parameter in 16
  bits, which the estimator leaves out.  Offloading the parameters (ZeRO-3) moves the 16-bit partition as well.
  Host memory per node is the estimator's, with its 1.5 buffer factor (the engine measured 9-10 bytes per parameter
  per rank against its 12).

The estimator counts every parameter as trainable; here frozen parameters (LoRA's base, QLoRA's NF4 weights) are
their own bytes, replicated (ZeRO-2) or split (ZeRO-3), with no gradients or states, and the per-parameter bytes
apply to the trainable ones.  ``tests/recommender/test_zero.py`` checks the full fine-tuning case against the
installed DeepSpeed's functions and against the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import defaults
from ..errors import FinetuneHelperError
from .model import ModelSpec

#: ZeRO strategies and what offloading each accepts (``offload_param`` exists in ZeRO-3 only)
ZERO_STAGES = {"zero2": 2, "zero3": 3}
OFFLOAD = defaults.OFFLOADS
#: the optimizers whose states the estimator's 8 bytes describe (Adam's two fp32 moments); with offload DeepSpeed
#: runs its own CPU Adam (the config's ``optimizer`` section)
ZERO_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused")
#: bytes per trainable parameter, DeepSpeed's estimator: 16-bit parameters, 16-bit + 32-bit gradients,
#: fp32 master weights, Adam's momentum and variance
PARAM_16, GRAD_16, GRAD_32, MASTER_32, ADAM_STATES = 2, 2, 4, 4, 8
#: the largest module gathered by ZeRO-3: its 16-bit parameters and their gradients
GATHERED_BYTES = 4
#: DeepSpeed's ``additional_buffer_factor`` for host memory
HOST_BUFFER = 1.5


@dataclass(frozen=True)
class ZeroStates:
    """Model-state bytes of one GPU under ZeRO, by the estimate's categories, and the host's per node."""

    #: the module's 16-bit parameters on this GPU (whole for ZeRO-2, 1/N for ZeRO-3, none when offloaded) and the
    #: fp32 master partition (when the optimizer is not offloaded) or ZeRO-2's offload staging buffer; frozen
    #: parameters in their own bytes
    weights: int
    #: the 16-bit and 32-bit gradient partitions (none when the optimizer is offloaded)
    gradients: int
    #: Adam's fp32 moments, 1/N (none when offloaded)
    optimizer_states: int
    #: ZeRO-3: the largest module gathered for its forward / backward
    gathered: int
    #: host memory per node for what is offloaded (0 without offload)
    host: int

    @property
    def gpu(self) -> int:
        return self.weights + self.gradients + self.optimizer_states + self.gathered


def largest_module_parameters(spec: ModelSpec) -> int:
    """The most parameters one module holds directly (deepspeed's ``model_to_params``): the embedding (or an untied
    lm_head) or the widest linear layer."""
    linears = [lin.weight_numel + (lin.out_features if lin.bias else 0) for lin in spec.layer_linears()]
    return max([spec.vocab_size * spec.hidden_size, *linears])


def zero_states(spec: ModelSpec, *, strategy: str, offload: str, gpus: int, trainable: int, frozen_bytes: int,
                nodes: int = 1) -> ZeroStates:
    """Model states of one GPU for ``trainable`` parameters and ``frozen_bytes`` of frozen weights, on ``gpus`` GPUs
    in all over ``nodes`` nodes."""
    if strategy not in ZERO_STAGES:
        raise FinetuneHelperError("strategy", f"{strategy!r} is not a ZeRO strategy ({', '.join(ZERO_STAGES)})")
    check_offload(strategy, offload)
    n = trainable
    params16 = n * PARAM_16 + frozen_bytes
    # what the optimizer offload moves to the host: the 32-bit gradients, master weights and moments (16 bytes)
    host_optimizer = n * (GRAD_32 + MASTER_32 + ADAM_STATES)
    if ZERO_STAGES[strategy] == 2:
        if offload == "optimizer":
            # the 16-bit parameters stay on the GPU, with a staging buffer for the largest parameter (measured); the
            # estimator's max(4 x GPUs, 16) bytes per parameter on the host
            staging = largest_module_parameters(spec) * PARAM_16 if n else 0
            return ZeroStates(params16 + staging, 0, 0, 0, int(n * max(4 * gpus, 16) * HOST_BUFFER))
        return ZeroStates(params16 + _split(n * MASTER_32, gpus), _split(n * (GRAD_16 + GRAD_32), gpus),
                          _split(n * ADAM_STATES, gpus), 0, 0)
    # the largest module's 16-bit parameters, and their gradients when it trains (full fine-tuning)
    gathered = largest_module_parameters(spec) * (GATHERED_BYTES if not frozen_bytes else PARAM_16)
    if offload == "all":
        return ZeroStates(0, 0, 0, gathered, int((host_optimizer + params16) / nodes * HOST_BUFFER))
    if offload == "optimizer":
        return ZeroStates(_split(params16, gpus), 0, 0, gathered, int(host_optimizer / nodes * HOST_BUFFER))
    # the 16-bit gradient partition lives through the run, the 32-bit one is made for the step (measured)
    return ZeroStates(_split(params16 + n * MASTER_32, gpus), _split(n * (GRAD_16 + GRAD_32), gpus),
                      _split(n * ADAM_STATES, gpus), gathered, 0)


def check_offload(strategy: str, offload: str) -> None:
    """``offload`` is one DeepSpeed does under ``strategy`` (a sharding or a --strategy): ZeRO-2 the optimizer,
    ZeRO-3 the optimizer or all; nothing else offloads."""
    if offload not in OFFLOAD:
        raise FinetuneHelperError("offload", f"{offload!r} is not one of {', '.join(OFFLOAD)}")
    if offload != "none" and strategy not in ZERO_STAGES:
        raise FinetuneHelperError("offload", "offloading to host memory is DeepSpeed's: use --strategy zero2 "
                                  "(optimizer) or zero3 (optimizer or all)")
    if offload == "all" and strategy != "zero3":
        raise FinetuneHelperError("offload", "'all' moves the parameters too, which only zero3 does; ZeRO-2 "
                                  "offloads the optimizer")


def _split(total: int, parts: int) -> int:
    return -(-total // parts)


def deepspeed_config(strategy: str, offload: str = "none") -> dict:
    """The DeepSpeed config a ``TrainingArguments(deepspeed=...)`` run uses: the ZeRO stage and offload, and "auto"
    for everything the Trainer fills in from its own arguments and the model (batch sizes, accumulation, clipping,
    precision, bucket sizes), as the Hugging Face DeepSpeed integration documents.  With offload, DeepSpeed's own
    CPU Adam does the step (the ``optimizer`` section; DeepSpeed refuses a client optimizer under ZeRO-Offload)."""
    stage = ZERO_STAGES[strategy]
    zero: dict = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": "auto"}
    if stage == 3:
        zero.update(stage3_prefetch_bucket_size="auto", stage3_param_persistence_threshold="auto",
                    stage3_gather_16bit_weights_on_model_save=True)
    if offload in ("optimizer", "all"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload == "all":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config: dict = {
        "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}, "zero_optimization": zero,
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
    }
    if offload != "none":
        config["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                           "weight_decay": "auto"}}
    return config


def strategy_of(config: dict) -> tuple[str, str] | None:
    """(``zero2`` | ``zero3``, offload) of a DeepSpeed config; None for a stage this module does not model."""
    zero = config.get("zero_optimization") or {}
    strategy = {2: "zero2", 3: "zero3"}.get(int(zero.get("stage", 0) or 0))
    if strategy is None:
        return None
    on_host = {key: str((zero.get(key) or {}).get("device", "none")) == "cpu"
               for key in ("offload_optimizer", "offload_param")}
    offload = "all" if on_host["offload_param"] else "optimizer" if on_host["offload_optimizer"] else "none"
    return strategy, offload
