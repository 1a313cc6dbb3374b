"""Attention dispatch: one entry point, several interchangeable backends.

All backends take ``q, k, v`` of shape ``[B, H, N, Dh]`` and the same *structured* mask:

- ``key_padding_mask``: ``[B, N]`` bool, True where the key is padding;
- ``prefix_len``: captioning (prefix-LM) mask; query ``i`` may see key ``j`` iff
  ``j < prefix_len`` or ``j <= i`` (image tokens see only image tokens; text tokens see all
  image tokens and leftward text); an ``int`` or a ``[B]`` LongTensor;
- ``attn_mask``: an arbitrary dense mask, ``[N, N]`` or ``[B, N, N]``, True/1 = blocked
  (only ``math`` and ``sdpa`` take it).

Query rows with no visible key return zeros, not NaN. Backends:
``math`` (explicit fp32 softmax, the reference), ``sdpa`` (PyTorch's
``scaled_dot_product_attention``), ``triton`` (fused kernel, CUDA, registered by
``model.kernels`` when importable; chosen by name only). ``auto`` picks ``sdpa`` everywhere:
no GPU measurement committed in ``bench/results/`` shows the Triton kernel correct in bf16 and
faster than SDPA at BEiT-3 shapes yet; ``triton`` stays available by name
(``attn_backend: triton``) until one does.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

PrefixLen = Union[int, Tensor, None]
Backend = Callable[..., Tensor]
logger = logging.getLogger(__name__)

_BACKENDS: dict[str, Backend] = {}


def register_backend(name: str, fn: Backend) -> None:
    """Register an attention implementation under ``name`` (used by ``model.kernels``)."""
    _BACKENDS[name] = fn


def available_backends() -> list[str]:
    _load_kernels()
    return sorted(_BACKENDS)


def dense_keep_mask(
    batch: int,
    q_len: int,
    k_len: int,
    device: torch.device,
    key_padding_mask: Optional[Tensor] = None,
    prefix_len: PrefixLen = None,
    attn_mask: Optional[Tensor] = None,
) -> Optional[Tensor]:
    """The structured mask as a dense ``[B, 1, Nq, Nk]`` bool tensor, True = may attend.

    Returns None when nothing is masked.
    """
    keep: Optional[Tensor] = None
    if key_padding_mask is not None:
        keep = (~key_padding_mask.bool())[:, None, None, :].expand(batch, 1, q_len, k_len)
    if prefix_len is not None:
        qi = torch.arange(q_len, device=device)[:, None]
        kj = torch.arange(k_len, device=device)[None, :]
        prefix = torch.as_tensor(prefix_len, device=device).reshape(-1, 1, 1, 1)
        pl = (kj[None, None] < prefix) | (kj <= qi)[None, None]
        keep = pl if keep is None else keep & pl
    if attn_mask is not None:
        am = ~attn_mask.bool()
        am = am[None, None] if am.dim() == 2 else am[:, None]
        keep = am if keep is None else keep & am
    if keep is not None:
        keep = keep.expand(batch, 1, q_len, k_len)
    return keep


def math_attention(q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Optional[Tensor] = None,
                   prefix_len: PrefixLen = None, attn_mask: Optional[Tensor] = None,
                   dropout_p: float = 0.0, scale: Optional[float] = None) -> Tensor:
    """Reference attention: scores in the input dtype, softmax in fp32 (as the official code)."""
    B, H, Nq, Dh = q.shape
    scale = Dh ** -0.5 if scale is None else scale
    scores = torch.matmul(q * scale, k.transpose(-2, -1))  # [B, H, Nq, Nk]
    keep = dense_keep_mask(B, Nq, k.shape[2], q.device, key_padding_mask, prefix_len, attn_mask)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    if keep is not None:
        probs = probs.masked_fill(~keep.any(-1, keepdim=True), 0.0)  # fully masked rows -> 0
    probs = probs.to(q.dtype)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v)  # [B, H, Nq, Dh]


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Optional[Tensor] = None,
                   prefix_len: PrefixLen = None, attn_mask: Optional[Tensor] = None,
                   dropout_p: float = 0.0, scale: Optional[float] = None) -> Tensor:
    """PyTorch SDPA; a boolean mask is built only when something is masked."""
    B, H, Nq, _ = q.shape
    keep = dense_keep_mask(B, Nq, k.shape[2], q.device, key_padding_mask, prefix_len, attn_mask)
    if keep is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    # rows with no visible key attend to everything, then are zeroed: no NaN. Branch-free (no
    # host sync, no graph break under torch.compile).
    empty_rows = ~keep.any(-1, keepdim=True)  # [B, 1, Nq, 1]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep | empty_rows, dropout_p=dropout_p, scale=scale)
    return out.masked_fill(empty_rows, 0.0)


register_backend("math", math_attention)
register_backend("sdpa", sdpa_attention)

_kernels_loaded = False
_kernels_error: Optional[str] = None  # why ``triton`` is not registered (import failure), if so


def _load_kernels() -> None:
    """Import ``model.kernels`` once; it registers ``triton`` if Triton is importable."""
    global _kernels_loaded, _kernels_error
    if not _kernels_loaded:
        _kernels_loaded = True
        try:
            from . import kernels  # noqa: F401  (registers itself)
        except ImportError as e:
            _kernels_error = f"{type(e).__name__}: {e}"
            logger.warning("triton attention backend unavailable (%s); 'auto' uses sdpa", _kernels_error)


def resolve_backend(backend: str, device: torch.device, dense_mask: bool) -> str:
    """The backend ``auto`` stands for on this device and mask: ``sdpa`` (see the module docstring;
    ``device`` and ``dense_mask`` are kept for when a measured GPU default differs)."""
    if backend != "auto":
        return backend
    return "sdpa"


def attention(q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Optional[Tensor] = None,
              prefix_len: PrefixLen = None, attn_mask: Optional[Tensor] = None,
              dropout_p: float = 0.0, backend: str = "auto") -> Tensor:
    """Multi-head attention over ``[B, H, N, Dh]`` inputs; returns ``[B, H, N, Dh]``."""
    name = resolve_backend(backend, q.device, attn_mask is not None)
    if name not in _BACKENDS:
        _load_kernels()
        if name not in _BACKENDS:
            why = f" ({_kernels_error})" if name == "triton" and _kernels_error else ""
            raise ValueError(f"attention backend {name!r} is not available here{why}; "
                             f"available: {sorted(_BACKENDS)}")
    return _BACKENDS[name](q, k, v, key_padding_mask=key_padding_mask, prefix_len=prefix_len,
                           attn_mask=attn_mask, dropout_p=dropout_p)


__all__ = ["attention", "register_backend", "available_backends", "dense_keep_mask",
           "math_attention", "sdpa_attention", "resolve_backend"]
