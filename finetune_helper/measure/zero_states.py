"""What DeepSpeed's ZeRO engine really holds per rank for the model states: a measurement on CPU with gloo.

The memory estimator's ZeRO-2 / ZeRO-3 model-state terms are checked against this: ``processes`` ranks are started
with ``torchrun`` (``torch.distributed.run``), each builds a real random model from a config dict (fp32, seed 0),
hands it to ``deepspeed.initialize`` with ``torch.optim.AdamW`` and the ZeRO config the Hugging Face Trainer would
write (:func:`ds_config`: bf16, ``reduce_bucket_size`` / ``stage3_prefetch_bucket_size`` /
``stage3_param_persistence_threshold`` filled from ``hidden_size`` as ``HfTrainerDeepSpeedConfig`` fills ``"auto"``),
and runs ``steps`` steps of forward / ``engine.backward`` / ``engine.step`` on random token ids.

What is counted (:func:`measure_last_step`): the live tensor bytes of the **last** step, with the project's own
tracker (:mod:`.tracker`, a ``TorchDispatchMode`` over untyped storages).  Everything that already exists when the
last step starts -- the bf16 parameters (or their ZeRO-3 partitions), the fp32 master partitions, Adam's m and v,
the gradient partitions, the reduce / prefetch buckets -- is registered from ``gc.get_objects()`` (every tensor
object, deduplicated by untyped storage) before the mode is entered, after the engine's owners have been walked
(:func:`.ranks.owned_storages`: a gradient held only by C++ has no Python object for gc to find until it is read once);
what the step allocates is seen by the mode.  Why not enter the mode before ``deepspeed.initialize`` and see
everything made: DeepSpeed keeps a ``meta`` copy of every parameter (ZeRO-1/2 shape bookkeeping), meta storages
report an ``nbytes()`` without holding data, and the tracker would count them (2 bytes/param too many); registering
from gc leaves them out, and so does the mode (:func:`_data_tracker` skips ops on meta tensors).

The step is cut in two phases, ``forward+backward`` (forward, ``engine.backward``: activations, ZeRO-3 gathered
parameters, reduce buckets) and ``step`` (``engine.step``: fp32 gradients, the optimizer's temporaries), each with
its peak, the op that reached it and the live bytes at that moment by label (``pre-existing``: what lived when the
step began; else the phase that allocated it).  At the three moments between them (before forward, right after
backward, after ``engine.step``) a :func:`snapshot` reconciles the tracker with gc (``unseen``: bytes gc finds that
the tracker did not know; 0 in every run checked) and gives a second, independent total from gc alone
(``gc_live``; no autograd graph is alive at these moments, so the two agree).

Where the bytes are (``by_owner``): at each moment the live storages are attributed, first owner wins, to the
module (parameters and their ``.grad`` / ``ds_tensor``, buffers), to the inner torch optimizer (its param groups --
DeepSpeed's fp32 master partitions -- with their ``.grad``, and its state: Adam's m, v), then to each attribute of
DeepSpeed's ZeRO optimizer by name (``zero.ipg_buckets``, ``zero.grad_partitions_flat_buffer``, ...) and of the
ZeRO-3 parameter coordinator.  Whatever is live but reachable from none of them is ``unattributed``.

Host vs device: on this machine DeepSpeed's accelerator is the CPU, so every tensor is on ``cpu`` and the device
cannot tell offloaded tensors apart.  For offload runs ``host`` is the sum of the owners DeepSpeed places on its
offload device (:data:`HOST_OWNERS`, read from ``stage_1_and_2.py`` / ``stage3.py``: the inner optimizer, the
fp32 partitions and their gradient buffers, the CPU-side staging buffers; with ``offload_param`` the bf16
partitions too); ``device`` is the rest (``live - host``).  The split is made at the three moments only; the
phase peaks are totals (host + device): a tensor allocated inside the step has no owner to read its side from.

Not modelled: ZeRO-3 under the Trainer builds the model inside ``deepspeed.zero.Init`` (here it is built whole and
partitioned by ``deepspeed.initialize``: the same per-rank states once the engine exists, a larger load peak before),
and the Trainer's offload runs name an ``optimizer`` in the config (see :func:`ds_config`).

Per rank the result also holds ``params`` and ``largest_layer_params`` as DeepSpeed's own ``model_to_params``
(``deepspeed/runtime/zero/stage3.py``) counts them on the model before ``deepspeed.initialize``, and DeepSpeed's
own estimate for the run (:func:`deepspeed_formula`: ``estimate_zero2/3_model_states_mem_needs``; its ``gpu`` is
per rank, its ``cpu`` per node).

Run a worker with ``python -m torch.distributed.run --nproc_per_node=2 -m finetune_helper.measure.zero_states
--stage 3 --offload optimizer --config CONFIG_JSON --out OUT_JSON [--batch B --seq S --steps K]``; rank 0 writes
the list of per-rank dicts.  :func:`measure` does all of that from a parent process, which never imports torch.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..recommender.zero import OFFLOAD, check_offload
from .ranks import (build_model, by_owner, gc_tensors, model_vocab, owned_storages, run_ranks, storage_bytes,
                    worker_parser, write_gathered)

MOMENTS = ("before_forward", "after_backward", "after_step")
WORKER_MODULE = "finetune_helper.measure.zero_states"

#: owners DeepSpeed places on the offload device (``self.device`` / ``"cpu"``) when the optimizer is offloaded
HOST_OWNERS = frozenset({
    "optimizer",  # the inner torch optimizer: fp32 master partitions, their fp32 grads, Adam's m and v
    "zero.single_partition_of_fp32_groups",  # ZeRO-1/2 fp32 master partitions (and .grad)
    "zero.param_buffer_of_bit16_for_cpu_offload_groups",  # ZeRO-1/2 16-bit copy of the partition (host side)
    "zero.temp_grad_buffer_for_cpu_offload",  # ZeRO-1/2 CPU staging buffer (largest parameter)
    "zero.accumulated_grads_in_cpu",  # ZeRO-1/2 gradient accumulation on the host
    "zero.fp32_partitioned_groups_flat",  # ZeRO-3 fp32 master partitions (and .grad)
    "zero.grad_partitions_flat_buffer",  # ZeRO-3 gradient partitions (self.device = cpu when offloaded)
    "zero._DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition",  # views of the buffer above
})
#: with ``offload_param`` the 16-bit partitions live on the host as well
HOST_OWNERS_PARAM = frozenset({"module.ds_tensor", "zero.fp16_partitioned_groups_flat",
                               "zero.fp16_partitioned_groups"})


# ----------------------------------------------------------------------------------------------- parent side


def _check(stage: int, offload: str) -> None:
    if stage not in (2, 3):
        raise ValueError(f"stage must be 2 or 3, got {stage!r}")
    check_offload(f"zero{stage}", offload)


def measure(config: dict, stage: int, offload: str = "none", batch: int = 1, seq: int = 32, steps: int = 2,
            processes: int = 2, timeout: float = 600) -> dict:
    """Measure the per-rank model-state bytes of a real DeepSpeed ZeRO run of ``config`` (see the module docstring).

    Returns the run's settings and ``ranks``: the list of per-rank dicts the workers wrote.  Raises RuntimeError
    with the last stderr lines when torchrun fails or times out before every rank's result is written.  A worker
    that dies after that, in its teardown (seen once with ZeRO-3 + offload: "terminate called without an active
    exception" at exit), does not lose the measurement: the result then carries ``teardown_error``.
    """
    _check(stage, offload)
    run = run_ranks(WORKER_MODULE, config, ["--stage", str(stage), "--offload", offload, "--batch", str(batch),
                                            "--seq", str(seq), "--steps", str(steps)], processes, timeout)
    return {"stage": stage, "offload": offload, "batch": batch, "seq": seq, "steps": steps, "processes": processes,
            **run}


# ----------------------------------------------------------------------------------------------- worker side


def hidden_size(config: dict[str, Any]) -> int:
    """The hidden size the HF Trainer fills the ``"auto"`` buckets from (``hidden_size``, the largest of
    ``hidden_sizes``, or the same in ``text_config``)."""
    for c in (config, config.get("text_config") or {}):
        if "hidden_size" in c:
            return int(c["hidden_size"])
        if "hidden_sizes" in c:
            return int(max(c["hidden_sizes"]))
    raise ValueError("the config has neither hidden_size nor hidden_sizes")


def ds_config(stage: int, offload: str, batch: int, hidden: int) -> dict[str, Any]:
    """The DeepSpeed config a plan ships (:func:`recommender.zero.deepspeed_config`), with its ``"auto"`` values as
    the Trainer fills them (``HfTrainerDeepSpeedConfig``): bf16, one micro-batch per step, the bucket sizes from
    ``hidden``, clipping 1.0.

    With offload the shipped config names an ``optimizer`` (DeepSpeed builds its ``DeepSpeedCPUAdam``: the same fp32
    m and v, updated in place without the step's temporaries); here the client's torch AdamW steps instead, which
    DeepSpeed allows only with ``zero_force_ds_cpu_optimizer`` off."""
    from ..recommender.zero import deepspeed_config

    _check(stage, offload)
    config = deepspeed_config(f"zero{stage}", offload)
    config.pop("optimizer", None)
    config.pop("fp16")
    filled = {"reduce_bucket_size": hidden * hidden, "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
              "stage3_param_persistence_threshold": 10 * hidden}
    config["zero_optimization"] = {k: filled.get(k, v) if v == "auto" else v
                                   for k, v in config["zero_optimization"].items()}
    del config["train_batch_size"]  # DeepSpeed derives it from the world size
    config.update(train_micro_batch_size_per_gpu=batch, gradient_accumulation_steps=1, gradient_clipping=1.0,
                  bf16={"enabled": True}, zero_allow_untested_optimizer=True)
    if offload != "none":
        config["zero_force_ds_cpu_optimizer"] = False  # else DeepSpeed refuses a torch optimizer with offload
    return config


def deepspeed_formula(params: int, largest_layer: int, stage: int, offload: str, world_size: int) -> dict[str, int]:
    """DeepSpeed's own estimate for this run (one node, ``world_size`` GPUs; no ``zero.Init``): ``gpu`` bytes per
    rank, ``cpu`` bytes per node (its ``additional_buffer_factor`` of 1.5 included)."""
    if stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        cpu, gpu = estimate_zero2_model_states_mem_needs(params, num_gpus_per_node=world_size,
                                                         cpu_offload=offload != "none")
    else:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(params, largest_layer, num_gpus_per_node=world_size,
                                                            cpu_offload=offload != "none",
                                                            cpu_offload_params=offload == "all", zero_init=False)
    return {"cpu": int(cpu), "gpu": int(gpu)}


def _tensors_in(obj, seen: set[int], depth: int = 6) -> Iterator[Any]:
    """Tensors reachable from ``obj`` through containers, a tensor's ``.grad`` and tensor attributes (``ds_tensor``)
    and DeepSpeed's own helper objects (buckets, coordinators); modules and torch optimizers are not entered, nor
    anything whose id is already in ``seen``."""
    import torch

    if depth < 0 or id(obj) in seen or obj is None or isinstance(obj, (str, bytes, int, float, bool)):
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
        # tensor-valued attributes only (ZeRO-3's ``ds_tensor``): ``_hp_mapping`` and the like point back at the
        # optimizer's fp32 fragments, which belong to the optimizer
        children = [v for v in vars(obj).values() if isinstance(v, torch.Tensor)]
        if obj.is_leaf:
            children.append(obj.grad)
    elif isinstance(obj, dict):
        children = [*obj.keys(), *obj.values()]
    elif isinstance(obj, (list, tuple, set, frozenset)):
        children = list(obj)
    elif (type(obj).__module__.startswith("deepspeed") and hasattr(obj, "__dict__")
          and not isinstance(obj, (torch.nn.Module, torch.optim.Optimizer))):
        children = list(vars(obj).values())
    else:
        return
    for child in children:
        yield from _tensors_in(child, seen, depth - 1)


def _owners(engine) -> Iterator[tuple[str, list[Any]]]:
    """``(owner, objects)`` in attribution order: the module, the inner torch optimizer, then each attribute of
    DeepSpeed's ZeRO optimizer (its ZeRO-3 parameter offload / coordinator included) and of the engine."""
    module, zero = engine.module, engine.optimizer
    yield "module.ds_tensor", [getattr(p, "ds_tensor", None) for p in module.parameters()]  # ZeRO-3 partitions
    yield "module", [*module.parameters(), *module.buffers()]
    inner = zero.optimizer
    yield "optimizer", [[p for g in inner.param_groups for p in g["params"]], inner.state]
    for name, value in vars(zero).items():
        yield f"zero.{name}", [value]
    for name, value in vars(engine).items():
        yield f"engine.{name}", [value]


def _owned(engine) -> Iterator[tuple[str, Iterator[Any]]]:
    """Each owner with the tensors it reaches (:func:`_tensors_in`, never through :func:`_roots`)."""
    roots = _roots(engine)
    return ((owner, _tensors_in(objs, set(roots))) for owner, objs in _owners(engine))


def _roots(engine) -> set[int]:
    """Ids the owner walk never enters from a back-reference (a parameter's attributes, a helper's ``optimizer``):
    the engine, its module, its ZeRO optimizer and the inner torch optimizer; each owner is what it reaches alone."""
    return {id(engine), id(engine.module), id(engine.optimizer), id(engine.optimizer.optimizer)}


def host_bytes(owners: dict[str, int], offload: str) -> int:
    """Bytes of the owners DeepSpeed keeps on the offload device (0 without offload; see :data:`HOST_OWNERS`)."""
    if offload == "none":
        return 0
    names = HOST_OWNERS | (HOST_OWNERS_PARAM if offload == "all" else frozenset())
    return sum(n for owner, n in owners.items() if owner in names)


def snapshot(mode, engine, offload: str) -> dict[str, Any]:
    """The live bytes now, the tracker reconciled first with every live tensor.

    ``unseen``: bytes of live storages the tracker did not know (not registered when the step began and not made
    by an op it saw: allocated by C++ outside the dispatcher, or in another thread); they are registered now, so
    ``live`` (the tracker's count) includes them from here on -- the peak before this moment may lack them.
    ``gc_live``: the same total counted from ``gc`` alone (no autograd graph is alive at the moments measured).
    """
    owned = owned_storages(_owned(engine))
    tensors = gc_tensors()
    before = mode.current
    mode.register(tensors, label="unseen")
    live = storage_bytes(tensors)
    owners = by_owner(owned, live)
    host = host_bytes(owners, offload)
    return {"live": mode.current, "gc_live": sum(live.values()), "unseen": mode.current - before, "host": host,
            "device": mode.current - host, "by_owner": owners}


def _data_tracker():
    """The project's :func:`.tracker.live_bytes_mode`, leaving out ops on ``meta`` tensors (no data)."""
    import torch
    from torch.utils._pytree import tree_leaves

    from .tracker import live_bytes_mode

    def on_meta(x) -> bool:
        return (isinstance(x, torch.Tensor) and x.device.type == "meta") or (
            isinstance(x, torch.device) and x.type == "meta")

    class DataBytes(type(live_bytes_mode())):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if any(on_meta(x) for x in tree_leaves((args, kwargs))):
                return func(*args, **(kwargs or {}))
            return super().__torch_dispatch__(func, types, args, kwargs)

    return DataBytes()


def train_step(engine, batch: int, seq: int, vocab: int, seed: int, at=lambda moment: None) -> None:
    """One step of forward (``input_ids = labels``, random) / ``engine.backward`` / ``engine.step``; ``at(moment)``
    is called before the forward, right after the backward and after the step."""
    import torch

    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
    at("before_forward")
    loss = engine(input_ids=ids, labels=ids).loss  # the output's logits die here; only the loss is kept
    engine.backward(loss)
    del loss
    at("after_backward")
    engine.step()
    at("after_step")


def measure_last_step(engine, batch: int, seq: int, vocab: int, steps: int, offload: str) -> dict[str, Any]:
    """Run ``steps`` steps, the last one under the tracker (pre-existing tensors registered from ``gc``).

    Returns a :func:`snapshot` at each of :data:`MOMENTS`, the peak of each phase of the step (``forward+backward``:
    before forward to after backward; ``step``: ``engine.step``) with the op that reached it and the live bytes by
    label at that moment (``pre-existing``: what lived when the step began; else the phase that allocated it),
    and the step's overall ``peak`` (the larger of the two, with its op and breakdown)."""
    import torch

    rank = torch.distributed.get_rank()
    for step in range(steps - 1):
        train_step(engine, batch, seq, vocab, seed=1000 * rank + step)
    mode = _data_tracker()
    owned_storages(_owned(engine))  # gives C++-held tensors their Python objects
    mode.register(gc_tensors())
    moments: dict[str, Any] = {}
    phases: dict[str, Any] = {}
    starts = {"before_forward": "forward+backward", "after_backward": "step"}
    phase = ""

    def at(moment: str) -> None:  # a snapshot allocates no tensor: it moves the peak only by what was unseen
        nonlocal phase
        if phase:  # it ends here
            phases[phase] = {"peak": mode.peak, "peak_op": mode.peak_op, "peak_by_label": mode.peak_by_label}
        moments[moment] = snapshot(mode, engine, offload)
        phase = starts.get(moment, "")
        if phase:
            mode.phase(phase)  # labels what is allocated from here on
            mode.reset_peak()

    with mode:
        train_step(engine, batch, seq, vocab, seed=1000 * rank + steps - 1, at=at)
    top = max(phases.values(), key=lambda p: p["peak"])
    return {**top, "phases": phases, "moments": moments}


def run_worker(config: dict[str, Any], stage: int, offload: str, batch: int, seq: int, steps: int) -> dict[str, Any]:
    """This rank's measurement (the process group must be up)."""
    import deepspeed
    import torch
    from deepspeed.runtime.zero.stage3 import model_to_params

    model = build_model(config)
    params, largest_layer = model_to_params(model)
    world = torch.distributed.get_world_size()
    ds = ds_config(stage, offload, batch, hidden_size(config))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    del model, optimizer
    result = measure_last_step(engine, batch, seq, model_vocab(engine.module), steps, offload)
    return {"rank": torch.distributed.get_rank(), "world_size": world, "stage": stage, "offload": offload,
            "params": params, "largest_layer_params": largest_layer,
            "deepspeed_formula": deepspeed_formula(params, largest_layer, stage, offload, world),
            "ds_config": ds, **result}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = worker_parser(WORKER_MODULE, __doc__.split("\n")[0])
    p.add_argument("--stage", type=int, choices=(2, 3), required=True)
    p.add_argument("--offload", choices=OFFLOAD, default="none")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    """The torchrun entry point: measure this rank, gather every rank's result, rank 0 writes ``--out``."""
    import deepspeed

    args = _parse(argv)
    _check(args.stage, args.offload)
    deepspeed.init_distributed(dist_backend="gloo")
    config = json.loads(Path(args.config).read_text())
    write_gathered(run_worker(config, args.stage, args.offload, args.batch, args.seq, args.steps), args.out)


if __name__ == "__main__":
    main()
