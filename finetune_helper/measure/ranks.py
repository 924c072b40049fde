"""The torchrun harness the per-rank measurements share (:mod:`.zero_states`, :mod:`.fsdp_states`): the parent
starts ``processes`` CPU ranks of a worker module under ``torch.distributed.run`` and reads back the list of per-rank
results that rank 0 wrote; a worker builds its random model and gathers every rank's result into that file.  The
parent side imports no torch."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A TCP port free on localhost now (bound, read, released; torchrun binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _run(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; on timeout the whole group (torchrun and its workers) is killed."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise RuntimeError(f"torchrun timed out after {timeout:.0f} s; last stderr lines:\n{tail(err)}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_ranks(module: str, config: dict, worker_args: list[str], processes: int, timeout: float) -> dict[str, Any]:
    """Run ``python -m module --config C --out O *worker_args`` on ``processes`` CPU ranks and return
    ``{"ranks": [...]}`` (plus ``teardown_error`` when a worker died after every result was written: seen once
    with ZeRO-3 + offload at exit).  Raises RuntimeError with the last stderr lines when the results are missing."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory(prefix=module.rsplit(".", 1)[-1] + "-") as tmp:
        config_path, out_path = Path(tmp, "config.json"), Path(tmp, "out.json")
        config_path.write_text(json.dumps(config))
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", module,
               "--config", str(config_path), "--out", str(out_path), *worker_args]
        done = _run(cmd, env, timeout)
        ranks = json.loads(out_path.read_text()) if out_path.exists() else []
    if len(ranks) != processes:
        raise RuntimeError(f"torchrun exited with {done.returncode}; last stderr lines:\n{tail(done.stderr)}")
    return {"ranks": ranks, **({"teardown_error": tail(done.stderr, 12)} if done.returncode else {})}


# ----------------------------------------------------------------------------------------------- worker side


def worker_parser(module: str, description: str) -> argparse.ArgumentParser:
    """A worker's command line: the model config and the result file :func:`run_ranks` passes, the batch shape and
    the number of steps; the worker adds its own options."""
    p = argparse.ArgumentParser(prog=f"python -m torch.distributed.run --nproc_per_node=2 -m {module}",
                                description=description)
    p.add_argument("--config", required=True, help="a model config.json (a dict with model_type)")
    p.add_argument("--out", required=True, help="where rank 0 writes the list of per-rank results (JSON)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--steps", type=int, default=2)
    return p


def build_model(config: dict[str, Any], seed: int = 0):
    """A random ``AutoModelForCausalLM`` of ``config`` in fp32 on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    from .tools import hf_config

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(hf_config(config), dtype=torch.float32)


def model_vocab(model) -> int:
    """The vocabulary size of a causal LM (the range the random token ids are drawn from)."""
    return int(model.config.get_text_config().vocab_size)


def write_gathered(mine: dict[str, Any], out: str) -> None:
    """Gather every rank's result; rank 0 writes the list to ``out`` whole, then renames it (a reader never sees
    half a file); then the process group ends."""
    import torch.distributed as dist

    results: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(results, mine)
    if dist.get_rank() == 0:
        tmp = Path(f"{out}.part")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(out)
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------ live tensors, by owner


def data_tensors(t) -> Iterator[Any]:
    """The tensors holding ``t``'s data: ``t`` itself, or the inner tensors of a wrapper subclass (DTensor: its
    ``_local_tensor``), recursively; nothing for meta tensors (no data) or non-tensors."""
    import torch
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if not isinstance(t, torch.Tensor):
        return
    if is_traceable_wrapper_subclass(t):
        attrs, _ = t.__tensor_flatten__()
        for name in attrs:
            yield from data_tensors(getattr(t, name))
    elif t.device.type != "meta":
        yield t


def storage_key(t) -> tuple[int, int] | None:
    """``(key, nbytes)`` of a plain tensor's untyped storage; None without one (sparse layouts)."""
    try:
        s = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    return s._cdata, s.nbytes()


def storage_bytes(tensors: Iterable[Any]) -> dict[int, int]:
    """Bytes by untyped storage key of the data of ``tensors`` (views count once, wrappers by their inner tensors)."""
    out: dict[int, int] = {}
    for t in tensors:
        for d in data_tensors(t):
            s = storage_key(d)
            if s is not None:
                out[s[0]] = s[1]
    return out


def owned_storages(owned: Iterable[tuple[str, Iterable[Any]]]) -> list[tuple[str, dict[int, int]]]:
    """Each owner's storages, from ``(owner, tensors it reaches)`` in attribution order.  Walking them first also
    gives a tensor held only by C++ (a ``.grad`` autograd set and Python never read) the Python object that
    :func:`gc_tensors` then finds (torch keeps that object for as long as the tensor lives)."""
    return [(owner, storage_bytes(tensors)) for owner, tensors in owned]


def gc_tensors() -> list[Any]:
    """Every tensor object alive in this process with data (``gc.get_objects()``; meta and storage-less ones left
    out, wrappers kept: they count by their inner tensors)."""
    import gc

    import torch

    return [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and storage_bytes([o])]


def by_owner(owned: list[tuple[str, dict[int, int]]], live: dict[int, int]) -> dict[str, int]:
    """Live bytes by owner (first owner wins; ``unattributed``: live storages reachable from none of them)."""
    left = dict(live)
    out: dict[str, int] = {}
    for owner, keys in owned:
        n = sum(left.pop(k, 0) for k in keys)
        if n:
            out[owner] = n
    out["unattributed"] = sum(left.values())
    return out
