"""Masked flash attention for BEiT-3: the autograd Function and the ``triton`` backend.

``flash_attention`` runs the Triton kernels of ``_flash_kernels.py`` (forward, deterministic
backward) on ``[B, H, N, Dh]`` views of any strides, with the mask given by indices:
``valid_len`` (per-sample count of real keys; the rest is right padding) and ``prefix_len``
(captioning prefix-causal mask). ``triton_attention`` is the attention-dispatch backend: it
turns a right-padding ``key_padding_mask`` into valid lengths and hands what the kernel does
not cover (dense ``attn_mask``, dropout, left/inner padding, CPU tensors outside Triton's
interpreter, head dims above 128) to ``sdpa_attention``.

On CUDA the kernels are compiled; with ``TRITON_INTERPRET=1`` in the environment at call time
they run under Triton's interpreter (CPU tensors included). Both variants are loaded lazily
from the same source, so the import order of triton, torch and this module does not matter.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Optional, Union

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..attention import sdpa_attention

logger = logging.getLogger(__name__)

PrefixLen = Union[int, Tensor, None]
MAX_HEAD_DIM = 128
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class BlockConfig:
    """Tile sizes (rows x columns of the score tile) and warps per kernel.

    ``fwd_m``/``fwd_n``: query/key block of the forward; ``dkdv_m``/``dkdv_n``: query block
    looped over / key block owned by a dK/dV program; ``dq_m``/``dq_n``: query block owned /
    key block looped over by a dQ program. Tiles are powers of two, at least 16.
    """

    fwd_m: int = 128
    fwd_n: int = 64
    dkdv_m: int = 32
    dkdv_n: int = 128
    dq_m: int = 128
    dq_n: int = 32
    fwd_warps: int = 4
    dkdv_warps: int = 8
    dq_warps: int = 8
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("fwd_m", "fwd_n", "dkdv_m", "dkdv_n", "dq_m", "dq_n"):
            val = getattr(self, name)
            if val < 16 or val & (val - 1):
                raise ValueError(f"BlockConfig.{name}={val}: must be a power of two >= 16")


def default_config(head_dim: int, interpret: bool) -> BlockConfig:
    """Tiles for a head dim. On CUDA: chosen so that none of the kernels spills registers
    when compiled for sm_90 (checked with ptxas; 12 bytes in dK/dV for head dims 65-128), not
    timed: no GPU was available (``bench/attention.py --sweep`` times others). Under the
    interpreter: 32 x 32 tiles (fewest interpreted steps for short test sequences)."""
    if interpret:
        return BlockConfig(32, 32, 32, 32, 32, 32, 1, 1, 1, 1)
    if _block_d(head_dim) <= 64:
        return BlockConfig(128, 64, 32, 128, 128, 32, fwd_warps=4, dkdv_warps=8, dq_warps=8, num_stages=3)
    return BlockConfig(128, 64, 32, 64, 64, 32, fwd_warps=8, dkdv_warps=8, dq_warps=4, num_stages=3)


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


# ---- kernel loading -----------------------------------------------------------------------
_KERNELS: dict[bool, ModuleType] = {}


@torch.compiler.assume_constant_result  # read once per compiled graph, not traced
def interpreter_mode() -> bool:
    """True when Triton's interpreter is switched on (``TRITON_INTERPRET=1``) right now."""
    return bool(triton.knobs.runtime.interpret)


@torch.compiler.assume_constant_result
def compiled_mode_available() -> bool:
    """False when ``triton.language`` was imported with ``TRITON_INTERPRET=1``: its own jit
    functions are then interpreted ones, which the compiler rejects, so this process can only
    run the kernels under the interpreter. (The reverse works: interpreted kernels take the
    compiled stdlib.) Start GPU processes without ``TRITON_INTERPRET`` set."""
    return isinstance(tl.standard._elementwise_max, triton.runtime.jit.JITFunction)


def _kernels(interpret: bool) -> ModuleType:
    """``_flash_kernels.py`` loaded as a compiled or an interpreted module (cached).

    ``triton.jit`` decides between the two when the decorator runs, from the environment; the
    source is executed with ``TRITON_INTERPRET`` set accordingly, then the variable is restored.
    """
    mod = _KERNELS.get(interpret)
    if mod is not None:
        return mod
    if not interpret and not compiled_mode_available():
        raise RuntimeError("triton.language was imported with TRITON_INTERPRET=1 in this process, so the "
                           "kernels cannot be compiled; start it without TRITON_INTERPRET")
    name = f"{__package__}._flash_kernels_{'interpreted' if interpret else 'compiled'}"
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("_flash_kernels.py"))
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old
    _KERNELS[interpret] = mod
    return mod


# ---- launches -----------------------------------------------------------------------------
def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 inputs: no TF32 rounding


def _bhnd_like(x: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """An empty ``[B, H, N, Dh]`` view of a ``[B, N, H, Dh]`` buffer (free ``reshape(B, N, H*Dh)``)."""
    B, H, N, D = x.shape
    return torch.empty(B, N, H, D, device=x.device, dtype=dtype or x.dtype).transpose(1, 2)


def _forward(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, prefix: Tensor, scale: float,
             cfg: BlockConfig, interpret: bool) -> tuple[Tensor, Tensor]:
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    o = _bhnd_like(q)
    lse = torch.empty(B, H, Nq, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(Nq, cfg.fwd_m), B * H)
    _kernels(interpret).attn_fwd[grid](
        q, k, v, o, lse, valid, prefix, scale,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        H, Nq, Nk,
        HEAD_DIM=D, BLOCK_D=_block_d(D), BLOCK_M=cfg.fwd_m, BLOCK_N=cfg.fwd_n,
        PRECISION=_precision(q.dtype), num_warps=cfg.fwd_warps, num_stages=cfg.num_stages)
    return o, lse


def _backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, valid: Tensor,
              prefix: Tensor, scale: float, cfg: BlockConfig,
              interpret: bool) -> tuple[Tensor, Tensor, Tensor]:
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    kern = _kernels(interpret)
    BD = _block_d(D)
    delta = torch.empty_like(lse)
    kern.attn_bwd_preprocess[(triton.cdiv(Nq, 64), B * H)](
        o, do, delta, *o.stride(), *do.stride(), H, Nq, HEAD_DIM=D, BLOCK_D=BD, BLOCK_M=64)
    dq, dk, dv = _bhnd_like(q), _bhnd_like(k), _bhnd_like(v)
    common = dict(HEAD_DIM=D, BLOCK_D=BD, PRECISION=_precision(q.dtype), num_stages=cfg.num_stages)
    kern.attn_bwd_dkdv[(triton.cdiv(Nk, cfg.dkdv_n), B * H)](
        q, k, v, do, dk, dv, lse, delta, valid, prefix, scale,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        H, Nq, Nk, BLOCK_M=cfg.dkdv_m, BLOCK_N=cfg.dkdv_n, num_warps=cfg.dkdv_warps, **common)
    kern.attn_bwd_dq[(triton.cdiv(Nq, cfg.dq_m), B * H)](
        q, k, v, do, dq, lse, delta, valid, prefix, scale,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        H, Nq, Nk, BLOCK_M=cfg.dq_m, BLOCK_N=cfg.dq_n, num_warps=cfg.dq_warps, **common)
    return dq, dk, dv


# The kernels as PyTorch custom ops (``torch.ops.beit3.flash_attention_fwd`` / ``_bwd``) with fake
# (meta) implementations and an autograd formula: ``torch.compile`` sees one opaque op per
# launch instead of breaking the graph at the Triton calls. Tiles travel as a list of ints.
_TILE_FIELDS = tuple(f.name for f in dataclasses.fields(BlockConfig))  # at import: dynamo cannot trace fields()


def _tiles(cfg: BlockConfig) -> list[int]:
    return [getattr(cfg, name) for name in _TILE_FIELDS]


@torch.library.custom_op("beit3::flash_attention_fwd", mutates_args=())
def _flash_fwd_op(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, prefix: Tensor, scale: float,
                  tiles: list[int], interpret: bool) -> tuple[Tensor, Tensor]:
    return _forward(q, k, v, valid, prefix, scale, BlockConfig(*tiles), interpret)


@_flash_fwd_op.register_fake
def _flash_fwd_fake(q, k, v, valid, prefix, scale, tiles, interpret):
    B, H, Nq, _ = q.shape
    return _bhnd_like(q), q.new_empty(B, H, Nq, dtype=torch.float32)


@torch.library.custom_op("beit3::flash_attention_bwd", mutates_args=())
def _flash_bwd_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, valid: Tensor,
                  prefix: Tensor, scale: float, tiles: list[int], interpret: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _backward(do, q, k, v, o, lse, valid, prefix, scale, BlockConfig(*tiles), interpret)


@_flash_bwd_op.register_fake
def _flash_bwd_fake(do, q, k, v, o, lse, valid, prefix, scale, tiles, interpret):
    return _bhnd_like(q), _bhnd_like(k), _bhnd_like(v)


def _flash_setup(ctx, inputs, output) -> None:
    q, k, v, valid, prefix, scale, tiles, interpret = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, valid, prefix)
    ctx.scale, ctx.tiles, ctx.interpret = scale, tiles, interpret


def _flash_grad(ctx, do: Tensor, dlse: Optional[Tensor]):
    q, k, v, o, lse, valid, prefix = ctx.saved_tensors
    dq, dk, dv = _flash_bwd_op(do, q, k, v, o, lse, valid, prefix, ctx.scale, ctx.tiles, ctx.interpret)
    return dq, dk, dv, None, None, None, None, None


_flash_fwd_op.register_autograd(_flash_grad, setup_context=_flash_setup)


def _per_sample(x: Union[int, Tensor, None], batch: int, n_k: int, device: torch.device, name: str) -> Tensor:
    """An int / ``[B]`` tensor / None (= ``n_k``) as an int32 ``[B]`` tensor clamped to ``[0, n_k]``."""
    if x is None:
        return torch.full((batch,), n_k, dtype=torch.int32, device=device)
    if isinstance(x, int):
        return torch.full((batch,), min(max(x, 0), n_k), dtype=torch.int32, device=device)
    t = x.to(device=device, dtype=torch.int32).reshape(-1)
    if t.numel() == 1:
        t = t.expand(batch)
    if t.numel() != batch:
        raise ValueError(f"{name} has {t.numel()} entries, expected one per sample ({batch})")
    return t.clamp(0, n_k).contiguous()


def flash_attention(q: Tensor, k: Tensor, v: Tensor, *, valid_len: Union[int, Tensor, None] = None,
                    prefix_len: PrefixLen = None, scale: Optional[float] = None,
                    config: Optional[BlockConfig] = None) -> Tensor:
    """Fused attention over ``[B, H, N, Dh]`` q/k/v (any strides); returns ``[B, H, Nq, Dh]``.

    valid_len: keys ``j >= valid_len[b]`` are padding (None = none). prefix_len: query ``i``
    sees key ``j`` iff ``j < prefix_len[b]`` or ``j <= i`` (None = full attention). Rows that
    see no key give zeros (and zero gradients). The output is a view of a ``[B, Nq, H, Dh]``
    buffer, so ``o.transpose(1, 2).reshape(B, Nq, H * Dh)`` is free. Raises ValueError on
    input the kernel does not take; ``triton_attention`` checks first and falls back instead.
    """
    reason = unsupported_reason(q, k, v)
    if reason is not None:
        raise ValueError(f"flash_attention: {reason}")
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    interpret = interpreter_mode()
    valid = _per_sample(valid_len, B, Nk, q.device, "valid_len")
    prefix = _per_sample(prefix_len, B, Nk, q.device, "prefix_len")
    scale = D ** -0.5 if scale is None else float(scale)
    cfg = config or default_config(D, interpret)
    return _flash_fwd_op(q, k, v, valid, prefix, scale, _tiles(cfg), interpret)[0]


def unsupported_reason(q: Tensor, k: Tensor, v: Tensor) -> Optional[str]:
    """Why the kernel cannot take these tensors (None when it can)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "q, k, v must be [B, H, N, Dh]"
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes {q.dtype}/{k.dtype}/{v.dtype}: need one of {SUPPORTED_DTYPES} for all three"
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        return f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match"
    if q.shape[3] > MAX_HEAD_DIM:
        return f"head dim {q.shape[3]} > {MAX_HEAD_DIM}"
    if not (q.device == k.device == v.device):
        return "q, k, v on different devices"
    if interpreter_mode():
        if q.dtype == torch.bfloat16:
            return "bf16 under the Triton interpreter (numpy has no bf16)"
    elif q.device.type != "cuda":
        return f"{q.device.type} tensors need CUDA (or TRITON_INTERPRET=1)"
    elif not compiled_mode_available():
        return "triton was imported with TRITON_INTERPRET=1: only interpreted kernels in this process"
    return None


# ---- key padding mask -> valid lengths ----------------------------------------------------
_last_mask: tuple[Optional["weakref.ref[Tensor]"], int, Optional[Tensor]] = (None, -1, None)


def suffix_padding_lengths(key_padding_mask: Tensor) -> Optional[Tensor]:
    """Per-sample valid lengths (int32 ``[B]``) if ``key_padding_mask`` (``[B, N]``, True =
    padding) pads only on the right, else None.

    Costs one device-to-host sync; the model passes the same mask tensor to every layer, so
    the answer for the last mask seen is kept (dropped if the mask is modified in place).
    """
    global _last_mask
    ref, version, result = _last_mask
    if ref is not None and ref() is key_padding_mask and version == key_padding_mask._version:
        return result
    pad = key_padding_mask.bool()
    n = pad.shape[-1]
    valid = (~pad).sum(-1, dtype=torch.int32)  # [B]
    suffix = torch.arange(n, device=pad.device)[None, :] >= valid[:, None]  # [B, N]
    result = valid if torch.equal(suffix, pad) else None
    _last_mask = (weakref.ref(key_padding_mask), key_padding_mask._version, result)
    return result


_LOGGED: set[str] = set()


def plan(q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Optional[Tensor] = None,
         attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0) -> tuple[Optional[str], Optional[Tensor]]:
    """What ``triton_attention`` will do: ``(reason to fall back to sdpa or None, valid lengths)``."""
    reason = unsupported_reason(q, k, v)
    if reason is None and attn_mask is not None:
        reason = "dense attn_mask"
    if reason is None and dropout_p > 0.0:
        reason = "attention dropout"
    if reason is not None or key_padding_mask is None:
        return reason, None
    if tuple(key_padding_mask.shape) != (q.shape[0], k.shape[2]):
        return f"key_padding_mask shape {tuple(key_padding_mask.shape)} is not [B, Nk]", None
    valid = suffix_padding_lengths(key_padding_mask)
    if valid is None:
        return "key_padding_mask is not right (suffix) padding", None
    return None, valid


def triton_attention(q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Optional[Tensor] = None,
                     prefix_len: PrefixLen = None, attn_mask: Optional[Tensor] = None,
                     dropout_p: float = 0.0, scale: Optional[float] = None) -> Tensor:
    """The ``triton`` attention backend (see ``beit3.model.attention``); falls back to
    ``sdpa_attention`` for what the kernel does not cover (see ``plan``; logged once per
    reason at INFO)."""
    reason, valid = plan(q, k, v, key_padding_mask=key_padding_mask, attn_mask=attn_mask, dropout_p=dropout_p)
    if reason is not None:
        if reason not in _LOGGED:
            _LOGGED.add(reason)
            logger.info("triton attention falls back to sdpa: %s", reason)
        return sdpa_attention(q, k, v, key_padding_mask=key_padding_mask, prefix_len=prefix_len,
                              attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
    return flash_attention(q, k, v, valid_len=valid, prefix_len=prefix_len, scale=scale)


__all__ = ["BlockConfig", "default_config", "flash_attention", "triton_attention", "suffix_padding_lengths",
           "plan", "unsupported_reason", "interpreter_mode", "compiled_mode_available", "MAX_HEAD_DIM"]
