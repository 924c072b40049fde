"""The peak of live tensor bytes over whatever runs inside it: a ``TorchDispatchMode`` over tensor storages.

Every op's outputs are registered by their untyped storage (``storage._cdata``: views and in-place results of one
buffer count once) with its ``nbytes()``; a ``weakref.finalize`` on the storage subtracts it when torch frees it.
The running maximum is the peak of live tensor bytes: what a caching allocator would have to hold at least, before
fragmentation and rounding.  It sees everything dispatched on this thread -- forward, the autograd engine's
backward (on CPU it runs in the caller's thread), optimizer steps, gradient clipping, the collator's tensors --
and works the same under ``FakeTensorMode`` (storages without data), which is how real-size models are traced
without their weights in memory.  ``../shared/STACK-NOTES.md``: it agreed with PyTorch's own
``torch.distributed._tools.mem_tracker.MemTracker`` to within 256 bytes on a full fine-tune step.

Tensors that exist before the mode is entered (parameters, buffers) are registered with :meth:`register`.
The peak moment is recorded with the op that reached it and the live bytes by category
(:meth:`LiveBytes.snapshot_at_peak`), which is what a wrong estimate is debugged with.
"""

from __future__ import annotations

import weakref
from collections import Counter
from typing import Any, Iterable


def _mode_base():
    from torch.utils._python_dispatch import TorchDispatchMode

    return TorchDispatchMode


class _Storages:
    """Live storages by key, with their bytes and the label they were created under."""

    def __init__(self) -> None:
        self.bytes: dict[int, int] = {}
        self.labels: dict[int, str] = {}
        self.current = 0
        self.peak = 0
        self.peak_op = ""
        self.peak_by_label: dict[str, int] = {}
        #: live bytes by label, kept as storages come and go (read at each new peak)
        self.by_label: Counter[str] = Counter()
        self.label = "setup"

    def add(self, tensor: Any) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        nbytes = storage.nbytes()
        if key in self.bytes:
            if self.bytes[key] != nbytes:  # resized in place (out= ops)
                self.current += nbytes - self.bytes[key]
                self.by_label[self.labels[key]] += nbytes - self.bytes[key]
                self.bytes[key] = nbytes
            return
        self.bytes[key] = nbytes
        self.labels[key] = self.label
        self.current += nbytes
        self.by_label[self.label] += nbytes
        weakref.finalize(storage, self.free, key)

    def free(self, key: int) -> None:
        n = self.bytes.pop(key, 0)
        self.current -= n
        label = self.labels.pop(key, None)
        if label is not None:
            self.by_label[label] -= n

    def observe(self, op: str) -> None:
        if self.current > self.peak:
            self.peak = self.current
            self.peak_op = op
            self.peak_by_label = {label: n for label, n in self.by_label.items() if n}


def live_bytes_mode():
    """A new :class:`LiveBytes` mode (a class built on first use: importing this module does not import torch)."""
    import torch
    from torch.utils._pytree import tree_leaves

    class LiveBytes(_mode_base()):
        """``with LiveBytes() as m: ...``; then ``m.peak`` (bytes), ``m.peak_op``, ``m.peak_by_label``.

        ``m.phase("backward")`` labels the storages created from then on (the breakdown at the peak is by label).
        """

        def __init__(self) -> None:
            super().__init__()
            self._s = _Storages()

        def register(self, tensors: Iterable[Any], label: str = "pre-existing") -> None:
            old, self._s.label = self._s.label, label
            for t in tensors:
                if isinstance(t, torch.Tensor):
                    self._s.add(t)
            self._s.label = old
            self._s.observe("register")

        def phase(self, label: str) -> None:
            self._s.label = label

        @property
        def current(self) -> int:
            return self._s.current

        @property
        def peak(self) -> int:
            return self._s.peak

        @property
        def peak_op(self) -> str:
            return self._s.peak_op

        @property
        def peak_by_label(self) -> dict[str, int]:
            return dict(self._s.peak_by_label)

        def reset_peak(self) -> None:
            """Start a new peak from what is live now (per step, per back-off attempt)."""
            self._s.peak = self._s.current
            self._s.peak_op = "reset"
            self._s.peak_by_label = {label: n for label, n in self._s.by_label.items() if n}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self._s.add(t)
            self._s.observe(str(func))
            return out

    return LiveBytes()


def model_tensors(model) -> list[Any]:
    """Parameters and buffers of ``model`` (what exists before a step starts)."""
    return [*model.parameters(), *model.buffers()]
