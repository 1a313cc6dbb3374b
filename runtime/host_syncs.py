"""Counting the places where the host waits for the device, on any machine.

On a GPU an op whose result the host reads (``.item()``, ``float()``, ``int()``, ``bool()``,
``.tolist()``), an op whose output size depends on tensor values (``nonzero``, boolean-mask
indexing, ``masked_select``) and a device-to-host copy all block the host until the device has
caught up: the step's kernels stop overlapping with the host's Python. ``HostSyncCounter`` is a
``TorchDispatchMode`` that counts exactly those ops (``aten::_local_scalar_dense``,
``aten::nonzero``, ``aten::masked_select``, ``aten::index`` / ``index_put_`` with a boolean
index, copies from a CUDA tensor to the CPU) plus ``Tensor.tolist`` / ``Tensor.numpy``. On the
CPU every tensor is a host tensor, so the same step is counted as it would sync on a GPU:
deterministic counts that tests can assert (``tests/test_host_syncs.py``, ``bench/host_syncs.py``).

Work that is done on purpose on host tensors (the packed layout and label indices built from the
loader's CPU masks before the host-to-device copy) runs inside ``host_side()``: not counted, because
on a GPU it touches no device tensor. Outside a counter ``host_side()`` costs nothing.

Each event is attributed to the innermost frame of this project (or of DeepSpeed, when the op is
issued there): ``"pretrain/objective.py:mdm_loss"``.
"""
from __future__ import annotations

import contextlib
import threading
import traceback
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
_REPO = str(Path(__file__).resolve().parent.parent)
_SELF = str(Path(__file__).resolve())
_SCALAR = {aten._local_scalar_dense.default}
_NONZERO = {aten.nonzero.default, aten.nonzero_static.default, aten.masked_select.default,
            aten.argwhere.default}
_BOOL_INDEX = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}
_COPIES = {aten._to_copy.default, aten.copy_.default}
_state = threading.local()


@contextlib.contextmanager
def host_side() -> Iterator[None]:
    """Ops here run on host (CPU) tensors by design and are not counted as device waits."""
    depth = getattr(_state, "host", 0)
    _state.host = depth + 1
    try:
        yield
    finally:
        _state.host = depth


def _in_host_side() -> bool:
    return getattr(_state, "host", 0) > 0


def _source() -> str:
    """The innermost project or DeepSpeed frame of the current stack, as ``path:function``."""
    for frame in reversed(traceback.extract_stack()):
        name = frame.filename
        if name == _SELF or "/torch/" in name:
            continue
        if "/deepspeed/" in name:  # before the project test: a venv may live inside the checkout
            return f"deepspeed/{name.split('/deepspeed/', 1)[1]}:{frame.name}"
        if name.startswith(_REPO) and "site-packages" not in name:
            return f"{Path(name).relative_to(_REPO)}:{frame.name}"
    return "<other>"


def _bool_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in indices or ())


def _device_to_host(func: Any, args: tuple, kwargs: dict) -> bool:
    if func is aten.copy_.default:
        dst, src = args[0], args[1]
        return src.device.type == "cuda" and dst.device.type == "cpu"
    dev = kwargs.get("device")
    return args[0].device.type == "cuda" and dev is not None and torch.device(dev).type == "cpu"


class HostSyncCounter(TorchDispatchMode):
    """Counts host waits by source; ``mark(label)`` starts a new segment (e.g. one per optimizer step).

    ``counts[segment]`` is a ``Counter`` of ``"source kind"`` -> events; kinds: ``item`` (a scalar
    read), ``nonzero``, ``bool_index``, ``d2h`` (a device-to-host copy), ``tolist``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.segment: Optional[str] = None
        self.counts: dict[Optional[str], Counter] = {}
        self._patched: dict[str, Any] = {}

    def mark(self, segment: str) -> None:
        self.segment = segment

    def record(self, kind: str) -> None:
        if _in_host_side():
            return
        self.counts.setdefault(self.segment, Counter())[f"{_source()} {kind}"] += 1

    def total(self, segment: Optional[str]) -> int:
        return sum(self.counts.get(segment, Counter()).values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SCALAR:
            self.record("item")
        elif func in _NONZERO:
            self.record("nonzero")
        elif func in _BOOL_INDEX and _bool_index(args):
            self.record("bool_index")
        elif func in _COPIES and _device_to_host(func, args, kwargs):
            self.record("d2h")
        return func(*args, **kwargs)

    # ``Tensor.tolist`` / ``Tensor.numpy`` of a CPU tensor read memory without dispatching an op
    def __enter__(self) -> "HostSyncCounter":
        counter = self
        for name in ("tolist", "numpy"):
            original = getattr(torch.Tensor, name)
            self._patched[name] = original

            def wrapped(t, *a, _original=original, _name=name, **k):
                if t.device.type != "cuda":  # a CUDA tensor's read is counted as its d2h copy
                    counter.record(_name)
                return _original(t, *a, **k)

            setattr(torch.Tensor, name, wrapped)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for name, original in self._patched.items():
            setattr(torch.Tensor, name, original)
        self._patched.clear()
        return super().__exit__(*exc)


__all__ = ["HostSyncCounter", "host_side"]
