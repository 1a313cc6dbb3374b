"""Loading weight files that may come from outside without running code from them.

A ``.pth``/``.pt`` file is a pickle: ``torch.load(weights_only=False)`` would run whatever
callable it names (``os.system`` ...). Every file a user can hand us (VQ-KD tokenizers,
teachers, official checkpoints, fine-tuning weights) goes through :func:`load_untrusted`
(``weights_only=True``: tensors, dicts, lists, tuples, str, numbers only) or through
safetensors (:func:`read_tensors`); anything else is refused with :class:`UnsafeFileError`.
"""
from __future__ import annotations

import os
import pickle
import re
from typing import Any, Union

import torch

_GLOBAL_RE = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


class UnsafeFileError(ValueError):
    """A file holds pickled objects beyond plain tensors and containers (it could run code)."""


def _numpy_globals() -> list[Any]:
    """What a pickled numpy array needs (e.g. a numpy RNG state); its elements are still
    unpickled by the weights-only unpickler, so an object array cannot smuggle code in."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_untrusted(path: Union[str, os.PathLike], map_location: Any = "cpu", allow_numpy: bool = False,
                   mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)``; a pickle that names other globals raises
    :class:`UnsafeFileError` naming the file and the global, and nothing of it runs.
    ``allow_numpy`` also admits numpy arrays (DeepSpeed files holding our client state)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist")
    try:
        with torch.serialization.safe_globals(_numpy_globals() if allow_numpy else []):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        found = _GLOBAL_RE.search(str(err))
        what = f"the global {found.group(1)!r}" if found else "objects other than tensors and plain containers"
        raise UnsafeFileError(
            f"refused to load {path!r}: it is a pickle that needs {what}, which could run code. Only tensors, "
            "dicts, lists, str and numbers are loaded from files that may come from outside (weights_only=True). "
            "If you trust its source, re-save its tensors as safetensors or a plain state dict.") from None


def read_tensors(path: Union[str, os.PathLike], map_location: Any = "cpu") -> Any:
    """The content of a ``.safetensors`` file (a dict of tensors) or a weights-only ``.pt``/``.pth``."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path!r} does not exist")
        from safetensors.torch import load_file

        return load_file(path, device=str(map_location))
    return load_untrusted(path, map_location)


__all__ = ["UnsafeFileError", "load_untrusted", "read_tensors"]
