"""What torch FSDP2 (``fully_shard``) really holds per rank: a measurement on CPU with gloo.

The memory estimator's ``sharding="fsdp"`` terms are checked against this: each rank keeps its 1/N shard of the
fp32 weights, of the fp32 gradients and of AdamW's m and v, and on top of that two decoder layers' parameters
gathered in the 16-bit compute dtype.  ``processes`` ranks are started with ``torchrun``
(``torch.distributed.run``); each builds a real random model from a config dict (fp32, seed 0), shards it with
``torch.distributed.fsdp.fully_shard`` (:func:`shard`), builds ``torch.optim.AdamW`` (lr 1e-4) over the sharded
parameters and runs ``steps`` steps of forward (``input_ids = labels``, random) / ``loss.backward()`` /
``optimizer.step()`` / ``optimizer.zero_grad(set_to_none=True)``.  AdamW runs ``foreach=True`` unless asked not to:
that is torch's default on a GPU (and for DTensor parameters), while on the CPU torch's default is the per-tensor
loop (``_get_foreach_kernels_supported_devices`` has no ``cpu``), whose temporaries are one parameter's, not all.

How it is sharded (``wrap``): ``"layers"`` is one FSDP unit per decoder layer (the classes of the model's
``_no_split_modules``, as accelerate's transformer auto-wrap policy picks them) with ``reshard_after_forward=True``,
then the root, which keeps what is left (embeddings, final norm, LM head) and gets torch's default for the root:
``reshard_after_forward=None``, resolved to False -- the root's parameters stay gathered from forward to backward.
``"accelerate"`` is what accelerate 1.15's ``fsdp2_prepare_model`` builds on top of that: the input embedding its own
unit (resharded after forward), the tail -- final norm and LM head (and the embedding when tied) -- one unit with
``reshard_after_forward=False``, then the root.  The policy (``mixed_precision``): ``"bf16"`` is
``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``; ``"bf16-accelerate"`` is what accelerate's
``FullyShardedDataParallelPlugin.set_mixed_precision("bf16")`` builds (``param_dtype``, ``reduce_dtype`` and
``output_dtype`` all bf16: gradients are reduce-scattered in bf16 and cast back to fp32); ``"no"`` is
``MixedPrecisionPolicy()`` (fp32 throughout).  The weights stay fp32 in every case (accelerate upcasts them).

What is counted (:func:`measure_last_step`): the live tensor bytes of the **last** step, with the project's tracker
(:mod:`.tracker`, a ``TorchDispatchMode`` over untyped storages), extended for FSDP2 (:func:`_fsdp_tracker`):

- DTensor.  FSDP2's sharded parameters, their gradients and AdamW's states are ``DTensor`` wrappers around a local
  tensor (``._local_tensor``); a wrapper has no data of its own.  Every tensor -- an op's output, a tensor found by
  gc -- is counted by the storages of its inner tensors (``__tensor_flatten__``, recursively; :func:`data_tensors`),
  never by the wrapper's: nothing twice, the local shards once.  An op on DTensors is seen by the mode as that op,
  with DTensor outputs (the mode runs before the subclass); DTensor's own local ops inside it are not seen, so a
  temporary that lives only inside one DTensor op is missed (none in FSDP2 + AdamW: all Shard(0), pointwise).
- In-place storage resizes.  FSDP2 keeps each parameter's unsharded tensor (``FSDPParam.all_gather_outputs``) for
  the whole run and frees / re-allocates its data with ``UntypedStorage.resize_`` (``free_storage`` /
  ``alloc_storage`` in ``_fsdp_param.py``), which is not a dispatched op: the tracker would never see a gathered
  layer freed.  While measuring, those two functions are wrapped (:func:`_fsdp_hooks`) to tell the tracker the new
  size; these storages are labelled ``unsharded_params`` and their live total is followed (``gathered``).
- Labels.  Storages allocated inside FSDP's ``foreach_all_gather`` (the bf16 copy of the local shards and the flat
  all-gather output) are labelled ``<phase>/all_gather``; inside ``foreach_reduce``, the reduce-scatter input (one
  group's unsharded gradients, in ``reduce_dtype``, flattened and padded) is ``<phase>/reduce_scatter_input`` and the
  rest -- the reduce-scatter output, which *is* the new sharded gradient, or its fp32 copy when ``reduce_dtype`` is
  bf16 -- ``<phase>/sharded_grads``.
- Collectives' scratch.  gloo's reduce-scatter (``ProcessGroupGloo::reduce_scatter_tensor_coalesced``) clones its
  whole input, all-reduces the clone and copies one chunk out; NCCL reduce-scatters in place.  What a collective
  call allocates is left out of the counts (:meth:`ignoring`); its largest total is ``collective_scratch_max``.
  gloo's all-gather stages through a flat buffer on its own worker thread, which the (thread-local) mode never sees.

Everything that exists when the last step starts (sharded parameters, AdamW's states, the zero-sized unsharded
tensors) is registered from ``gc.get_objects()`` before the mode is entered.  The step is cut in two phases,
``forward+backward`` and ``step`` (``optimizer.step``), each with its peak, the op that reached it, the live bytes
by label at that moment, ``gathered_at_peak`` / ``gathered_max`` (bytes of unsharded parameters then / at most)
and ``collective_scratch_max``.
At each of :data:`MOMENTS` a :func:`snapshot` reconciles the tracker with gc (``unseen``), gives gc's own total
(``gc_live``) and splits the live bytes by owner (:func:`by_owner`): ``sharded_params`` (the local shards),
``sharded_grads`` (their ``.grad``), ``unsharded_params``, ``unsharded_grads``, ``all_gather_buffers``,
``reduce_scatter_buffers`` (FSDP's own states), ``optimizer_states`` (AdamW's m, v and step), ``module`` (buffers
and anything else the module reaches), ``unattributed``.

What it showed (Llama, 3.4M parameters, 2 ranks): at the moments, exactly the estimator's states -- 4/N, 8/N and
(between backward and ``zero_grad``) 4/N bytes per parameter, ``unseen`` 0 and ``gc_live == live``.  On top of the
estimator's "two layers gathered": the root unit (embeddings, final norm, LM head under ``wrap="layers"``) stays
gathered from its forward to the end of backward, and its 16-bit gradients wait for the whole backward; in forward
the previous unit's flat all-gather output is kept until the next unit's copy-out (two flat buffers and one
unsharded unit at once); in backward one unit is unsharded and the next one prefetched into its flat buffer, and
the previous unit's reduce-scatter input (``reduce_dtype``, the unit's full size) is kept until the next one's;
foreach AdamW adds one fp32 temporary of all local shards (4/N bytes per parameter) during ``step``.

Host caveat: CPU "streams" are stubs, so FSDP2's overlap is serial here; its buffers (the previous all-gather result
kept in forward, one reduce-scatter input kept in backward) are the Python references that keep them, the same on a
GPU, where the caching allocator adds rounding and fragmentation on top.

Run a worker with ``python -m torch.distributed.run --nproc_per_node=2 -m finetune_helper.measure.fsdp_states
--config CONFIG_JSON --out OUT_JSON [--mixed-precision bf16 --wrap layers --batch B --seq S --steps K
--no-foreach]``; rank 0
writes the list of per-rank dicts.  :func:`measure` does all of that from a parent process, which never imports
torch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .ranks import (build_model, by_owner, data_tensors, gc_tensors, model_vocab, owned_storages, run_ranks,
                    storage_bytes, storage_key, worker_parser, write_gathered)

MIXED_PRECISIONS = ("bf16", "bf16-accelerate", "no")
WRAPS = ("layers", "accelerate")
#: the snapshots of the last step: before its forward, after backward, after ``optimizer.step``, after ``zero_grad``
MOMENTS = ("before_forward", "after_backward", "after_step", "after_zero_grad")
WORKER_MODULE = "finetune_helper.measure.fsdp_states"
#: the label of the unsharded parameters' storages (allocated and freed in place by FSDP)
GATHERED = "unsharded_params"


# ----------------------------------------------------------------------------------------------- parent side


def _check(mixed_precision: str, wrap: str) -> None:
    if mixed_precision not in MIXED_PRECISIONS:
        raise ValueError(f"mixed_precision must be one of {MIXED_PRECISIONS}, got {mixed_precision!r}")
    if wrap not in WRAPS:
        raise ValueError(f"wrap must be one of {WRAPS}, got {wrap!r}")


def measure(config: dict, mixed_precision: str = "bf16", wrap: str = "layers", batch: int = 1, seq: int = 32,
            steps: int = 2, processes: int = 2, foreach: bool = True, timeout: float = 600) -> dict:
    """Measure what a real FSDP2 run of ``config`` holds per rank (see the module docstring).

    Returns the run's settings and ``ranks``: the list of per-rank dicts the workers wrote.  Raises RuntimeError
    with the last stderr lines when torchrun fails or times out before every rank's result is written; a failure
    after that (in a worker's teardown) is reported as ``teardown_error``.
    """
    _check(mixed_precision, wrap)
    if steps < 2:
        raise ValueError("steps must be at least 2 (FSDP2 initialises lazily in the first forward)")
    run = run_ranks(WORKER_MODULE, config, ["--mixed-precision", mixed_precision, "--wrap", wrap, "--batch",
                                            str(batch), "--seq", str(seq), "--steps", str(steps),
                                            "--foreach" if foreach else "--no-foreach"], processes, timeout)
    return {"mixed_precision": mixed_precision, "wrap": wrap, "batch": batch, "seq": seq, "steps": steps,
            "processes": processes, "foreach": foreach, **run}


# ----------------------------------------------------------------------------------------------- worker side


def mp_policy(mixed_precision: str):
    """The ``MixedPrecisionPolicy`` of ``mixed_precision`` (see the module docstring)."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if mixed_precision not in MIXED_PRECISIONS:
        raise ValueError(f"mixed_precision must be one of {MIXED_PRECISIONS}, got {mixed_precision!r}")
    if mixed_precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if mixed_precision == "bf16-accelerate":  # accelerate's set_mixed_precision("bf16") for fsdp_version=2
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16,
                                    output_dtype=torch.bfloat16)
    return MixedPrecisionPolicy()


def decoder_layers(model) -> list[Any]:
    """The model's decoder layers: the modules whose class is named in ``_no_split_modules``."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no module of its _no_split_modules {sorted(names)}")
    return layers


def final_norm(model):
    """The last ``*Norm*`` child of the base model (accelerate's ``_find_final_norm``), or None."""
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else model
    found = None
    for _, child in (base.named_children() if base is not None else ()):
        if "Norm" in type(child).__name__:
            found = child
    return found


def shard(model, mixed_precision: str, wrap: str) -> None:
    """Apply ``fully_shard`` to ``model`` in place as ``wrap`` says (see the module docstring)."""
    from torch.distributed.fsdp import fully_shard

    _check(mixed_precision, wrap)
    policy = mp_policy(mixed_precision)
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=policy, reshard_after_forward=True)
    if wrap == "accelerate":  # accelerate 1.15 fsdp2_prepare_model: embedding unit, then a tail unit kept gathered
        embed, head = model.get_input_embeddings(), model.get_output_embeddings()
        tied = embed is not None and head is not None and embed.weight is head.weight
        if embed is not None and not tied:
            fully_shard(embed, mp_policy=policy, reshard_after_forward=True)
        tail = [m for m in (final_norm(model), *((embed, head) if tied else (head,))) if m is not None]
        if tail:
            fully_shard(tail, mp_policy=policy, reshard_after_forward=False)
    fully_shard(model, mp_policy=policy)  # root: reshard_after_forward=None, torch's heuristic resolves it to False


def param_groups(model) -> list[Any]:
    """Every ``FSDPParamGroup`` under the root ``model`` (after the first forward: FSDP's lazy init)."""
    states = model._get_fsdp_state()._state_ctx.all_states
    return [group for state in states for group in state._fsdp_param_groups]


def units(model) -> list[dict[str, Any]]:
    """Each FSDP unit: its module, its parameters (unsharded count) and whether it reshards after forward."""
    return [{"module": group._module_fqn or "<root>", "params": sum(fp._orig_size.numel() for fp in group.fsdp_params),
             "reshard_after_forward": group.post_forward_mesh_info is not None} for group in param_groups(model)]


def _tensors_in(obj, seen: set[int], depth: int = 6) -> Iterator[Any]:
    """Tensors reachable from ``obj`` through dicts, lists, tuples (FSDP's NamedTuple states); not ``.grad``."""
    import torch

    if depth < 0 or obj is None or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for child in [*obj.keys(), *obj.values()]:
            yield from _tensors_in(child, seen, depth - 1)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for child in obj:
            yield from _tensors_in(child, seen, depth - 1)


def _owners(model, optimizer) -> Iterator[tuple[str, list[Any]]]:
    """``(owner, objects)`` in attribution order (first owner wins): FSDP's per-parameter tensors, its per-group
    communication states, the optimizer's state, then the module (buffers and whatever else it reaches)."""
    groups = param_groups(model)
    fsdp_params = [fp for group in groups for fp in group.fsdp_params]
    yield "sharded_params", [[fp._sharded_param_data, fp.sharded_param,
                              getattr(fp, "_sharded_post_forward_param_data", None)] for fp in fsdp_params]
    yield "sharded_grads", [fp.sharded_param.grad for fp in fsdp_params]
    yield "unsharded_params", [[fp.all_gather_outputs, getattr(fp, "_unsharded_inner_tensors", None)]
                               for fp in fsdp_params]
    unsharded = [getattr(fp, "_unsharded_param", None) for fp in fsdp_params]
    yield "unsharded_grads", [[p.grad if p is not None else None, fp.unsharded_accumulated_grad]
                              for p, fp in zip(unsharded, fsdp_params)]
    ctxs = list({id(g.comm_ctx): g.comm_ctx for g in groups}.values())
    yield "all_gather_buffers", [[g._all_gather_result for g in groups],
                                 [getattr(c, "all_gather_state", None) for c in ctxs]]
    held = ("_all_reduce_state", "_partial_reduce_output")
    yield "reduce_scatter_buffers", [[getattr(c, "reduce_scatter_states", None) for c in ctxs],
                                     [[getattr(g, name, None) for name in held] for g in groups]]
    yield "optimizer_states", [optimizer.state]
    yield "module", [[*model.parameters(), *model.buffers()]]


def _owned(model, optimizer) -> Iterator[tuple[str, Iterator[Any]]]:
    """Each owner with the tensors it reaches (:func:`_tensors_in`)."""
    return ((owner, _tensors_in(objs, set())) for owner, objs in _owners(model, optimizer))


def snapshot(mode, model, optimizer) -> dict[str, Any]:
    """The live bytes now, the tracker reconciled first with every live tensor (``unseen``: bytes gc finds that the
    tracker did not know; registered now), gc's own total (``gc_live``) and the split by owner.

    A collective's scratch still alive (gloo's worker thread lets go of a finished work's tensors when it gets to
    it, so a reduce-scatter's input copy can outlive the call) is left out of all three and shown apart
    (``collective_scratch``)."""
    owned = owned_storages(_owned(model, optimizer))
    tensors = gc_tensors()
    before = mode.current
    mode.register(tensors, label="unseen")
    live = storage_bytes(tensors)
    scratch = sum(live.pop(k) for k in list(live) if k in mode.scratch)
    return {"live": mode.current, "gc_live": sum(live.values()), "unseen": mode.current - before,
            "gathered": mode.gathered, "collective_scratch": scratch, "by_owner": by_owner(owned, live)}


def _fsdp_tracker():
    """The project's :func:`.tracker.live_bytes_mode`, extended for FSDP2 (see the module docstring): counts wrapper
    subclasses by their inner tensors, takes in-place storage resizes (:meth:`resized`), sub-labels (:meth:`sub`),
    leaves a collective's scratch out (:meth:`ignoring`) and follows the bytes of unsharded parameters
    (``gathered``; ``gathered_at_peak``, ``gathered_max`` and ``scratch_max`` since the last :meth:`reset_peak`)."""
    import weakref

    from torch.utils._pytree import tree_leaves

    from .tracker import live_bytes_mode

    class FSDPBytes(type(live_bytes_mode())):
        def __init__(self) -> None:
            super().__init__()
            self._gathered: dict[int, int] = {}
            self._ignored: dict[int, int] | None = None
            #: live storages first seen inside a collective (left out of the counts), by key
            self.scratch: dict[int, int] = {}
            self.gathered = self.gathered_at_peak = self.gathered_max = self.scratch_max = 0

        def _observe(self, op: str) -> None:
            before = self._s.peak
            self._s.observe(op)
            if self._s.peak > before:
                self.gathered_at_peak = self.gathered
            self.gathered_max = max(self.gathered_max, self.gathered)

        def _is_scratch(self, tensor) -> bool:
            s = storage_key(tensor)
            return s is not None and s[0] in self.scratch

        def register(self, tensors, label: str = "pre-existing") -> None:
            super().register([d for t in tensors for d in data_tensors(t) if not self._is_scratch(d)], label)

        def track_gathered(self, tensors, why: str = "register") -> None:
            """Count these storages (the unsharded parameters) under :data:`GATHERED` and in ``gathered`` from now
            on, at their size now."""
            old, self._s.label = self._s.label, GATHERED
            for t in tensors:
                self._s.add(t)
                key, nbytes = storage_key(t)
                self.gathered += nbytes - self._gathered.get(key, 0)
                self._gathered[key] = nbytes
            self._s.label = old
            self._observe(why)

        def resized(self, tensor, why: str) -> None:
            """``tensor``'s storage was resized in place (by FSDP: not an op the mode sees): count its new size."""
            self._s.free(tensor.untyped_storage()._cdata)  # the old size, under whatever label it had
            self.track_gathered([tensor], why)

        def reset_peak(self) -> None:
            super().reset_peak()
            self.gathered_at_peak = self.gathered_max = self.gathered
            self.scratch_max = 0

        @contextlib.contextmanager
        def sub(self, label: str):
            """Label what is allocated inside as ``<current label>/<label>``."""
            old = self._s.label
            self._s.label = f"{old.split('/')[0]}/{label}"
            try:
                yield
            finally:
                self._s.label = old

        @contextlib.contextmanager
        def ignoring(self):
            """Storages first seen inside are not counted (a collective's own scratch: gloo's reduce-scatter
            copies its whole input); the largest total of them is kept as ``scratch_max``."""
            old, self._ignored = self._ignored, {}
            try:
                yield
            finally:
                self.scratch_max = max(self.scratch_max, sum(self._ignored.values()))
                self._ignored = old

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                for d in data_tensors(t):
                    if self._is_scratch(d):
                        continue
                    s = storage_key(d)
                    if self._ignored is not None and s is not None and s[0] not in self._s.bytes:
                        self._ignored[s[0]] = self.scratch[s[0]] = s[1]
                        weakref.finalize(d.untyped_storage(), self.scratch.pop, s[0], None)
                    else:
                        self._s.add(d)
            self._observe(str(func))
            return out

    return FSDPBytes()


class _Comm:
    """An FSDP communicator (``AllGather`` / ``ReduceScatter``) seen through ``mode``: the collective itself runs
    with the mode :meth:`ignoring` what it allocates (the backend's scratch); with ``first_label``, the storage of
    the first ``allocate`` (the reduce-scatter input) is labelled apart."""

    def __init__(self, comm, mode, first_label: str = "") -> None:
        self._comm, self._mode, self._first_label = comm, mode, first_label

    def allocate(self, *args, **kwargs):
        label, self._first_label = self._first_label, ""
        with self._mode.sub(label) if label else contextlib.nullcontext():
            return self._comm.allocate(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        with self._mode.ignoring():
            return self._comm(*args, **kwargs)


@contextlib.contextmanager
def _fsdp_hooks(mode):
    """Wrap FSDP2's in-place storage resizes and collectives for ``mode`` (restored on exit)."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param, _fsdp_param_group
    from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter

    alloc, free = _fsdp_param.alloc_storage, _fsdp_param.free_storage
    gather, reduce = _fsdp_param_group.foreach_all_gather, _fsdp_param_group.foreach_reduce

    def alloc_storage(tensor) -> None:
        alloc(tensor)
        mode.resized(tensor, "fsdp.alloc_storage")

    def free_storage(tensor) -> None:
        free(tensor)
        mode.resized(tensor, "fsdp.free_storage")

    def comms(args, kwargs, first_label: str = ""):
        """``args``, ``kwargs`` with FSDP's communicator (passed either way) seen through :class:`_Comm`."""
        def wrap(a):
            return _Comm(a, mode, first_label) if isinstance(a, (AllGather, ReduceScatter)) else a
        return [wrap(a) for a in args], {k: wrap(v) for k, v in kwargs.items()}

    def foreach_all_gather(*args, **kwargs):
        args, kwargs = comms(args, kwargs)
        with mode.sub("all_gather"):
            return gather(*args, **kwargs)

    def foreach_reduce(*args, **kwargs):
        args, kwargs = comms(args, kwargs, "reduce_scatter_input")
        with mode.sub("sharded_grads"):
            return reduce(*args, **kwargs)

    patches = [(_fsdp_param, "alloc_storage", alloc_storage), (_fsdp_param, "free_storage", free_storage),
               (_fsdp_param_group, "alloc_storage", alloc_storage),
               (_fsdp_param_group, "foreach_all_gather", foreach_all_gather),
               (_fsdp_param_group, "foreach_reduce", foreach_reduce)]
    saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
    try:
        for module, name, fn in patches:
            setattr(module, name, fn)
        yield
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)


def train_step(model, optimizer, batch: int, seq: int, vocab: int, seed: int, at=lambda moment: None) -> None:
    """One step of forward (``input_ids = labels``, random) / backward / ``optimizer.step`` / ``zero_grad``;
    ``at(moment)`` is called at each of :data:`MOMENTS`."""
    import torch

    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
    at("before_forward")
    loss = model(input_ids=ids, labels=ids).loss  # the output's logits die here; only the loss is kept
    loss.backward()
    del loss
    at("after_backward")
    optimizer.step()
    at("after_step")
    optimizer.zero_grad(set_to_none=True)
    at("after_zero_grad")


def measure_last_step(model, optimizer, batch: int, seq: int, vocab: int, steps: int) -> dict[str, Any]:
    """Run ``steps`` steps, the last one under the tracker (pre-existing tensors registered from ``gc``).

    Returns a :func:`snapshot` at each of :data:`MOMENTS`, the peak of each phase (``forward+backward``, ``step``)
    with the op that reached it, the live bytes by label then and the unsharded-parameter bytes then
    (``gathered_at_peak``) and at most (``gathered_max``), and the step's overall peak (the larger phase's)."""
    import torch

    rank = torch.distributed.get_rank()
    for step in range(steps - 1):
        train_step(model, optimizer, batch, seq, vocab, seed=1000 * rank + step)
    mode = _fsdp_tracker()
    owned_storages(_owned(model, optimizer))  # gives C++-held tensors their Python objects
    mode.register(gc_tensors())
    mode.track_gathered([t for g in param_groups(model) for fp in g.fsdp_params for t in fp.all_gather_outputs])
    moments: dict[str, Any] = {}
    phases: dict[str, Any] = {}
    starts = {"before_forward": "forward+backward", "after_backward": "step"}
    phase = ""

    def at(moment: str) -> None:
        nonlocal phase
        if phase:  # it ends here
            phases[phase] = {"peak": mode.peak, "peak_op": mode.peak_op, "peak_by_label": mode.peak_by_label,
                             "gathered_at_peak": mode.gathered_at_peak, "gathered_max": mode.gathered_max,
                             "collective_scratch_max": mode.scratch_max}
        moments[moment] = snapshot(mode, model, optimizer)
        phase = starts.get(moment, "")
        if phase:
            mode.phase(phase)
            mode.reset_peak()

    with mode, _fsdp_hooks(mode):
        train_step(model, optimizer, batch, seq, vocab, seed=1000 * rank + steps - 1, at=at)
    top = max(phases.values(), key=lambda p: p["peak"])
    return {**top, "phases": phases, "moments": moments}


def model_prediction(params: int, layer_params: int, world: int, mixed_precision: str) -> dict[str, int]:
    """The estimator's FSDP terms for full fine-tuning of AdamW (``recommender/memory.py``): fp32 weights,
    gradients and m, v split over ``world`` ranks; two layers gathered in the compute dtype."""
    compute = 4 if mixed_precision == "no" else 2
    return {"weights": -(-4 * params // world), "gradients": -(-4 * params // world),
            "optimizer_states": -(-8 * params // world), "gathered_layers": 2 * compute * layer_params}


def run_worker(config: dict[str, Any], mixed_precision: str, wrap: str, batch: int, seq: int, steps: int,
               foreach: bool = True) -> dict[str, Any]:
    """This rank's measurement (the process group must be up).  ``foreach``: AdamW's multi-tensor implementation
    (torch's default on a GPU; on the CPU its default is the per-tensor loop, ``torch_default_foreach``)."""
    import torch
    from torch.optim.optimizer import _default_to_fused_or_foreach

    model = build_model(config)
    params = sum(p.numel() for p in model.parameters())
    layer_params = max(sum(p.numel() for p in layer.parameters()) for layer in decoder_layers(model))
    world = torch.distributed.get_world_size()
    shard(model, mixed_precision, wrap)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=foreach)
    _, default_foreach = _default_to_fused_or_foreach(list(model.parameters()), differentiable=False)
    result = measure_last_step(model, optimizer, batch, seq, model_vocab(model), steps)
    return {"rank": torch.distributed.get_rank(), "world_size": world, "mixed_precision": mixed_precision,
            "mp_policy": repr(mp_policy(mixed_precision)), "wrap": wrap, "params": params,
            "layer_params": layer_params, "units": units(model), "foreach": foreach,
            "torch_default_foreach": default_foreach,
            "model_prediction": model_prediction(params, layer_params, world, mixed_precision), **result}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = worker_parser(WORKER_MODULE, __doc__.split("\n")[0])
    p.add_argument("--mixed-precision", choices=MIXED_PRECISIONS, default="bf16")
    p.add_argument("--wrap", choices=WRAPS, default="layers")
    p.add_argument("--foreach", action=argparse.BooleanOptionalAction, default=True,
                   help="AdamW's multi-tensor implementation (torch's GPU default; default: on)")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error("--steps must be at least 2 (FSDP2 initialises lazily in the first forward)")
    return args


def main(argv: list[str] | None = None) -> None:
    """The torchrun entry point: measure this rank, gather every rank's result, rank 0 writes ``--out``."""
    import torch.distributed as dist

    args = _parse(argv)
    dist.init_process_group(backend="gloo")
    config = json.loads(Path(args.config).read_text())
    write_gathered(run_worker(config, args.mixed_precision, args.wrap, args.batch, args.seq, args.steps,
                              args.foreach), args.out)


if __name__ == "__main__":
    main()
