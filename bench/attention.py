"""Attention benchmark at BEiT-3 shapes: our Triton kernel against SDPA, FlexAttention, flash-attn.

Prints, per case and implementation, time and TFLOP/s (only unmasked query-key pairs count:
4 * Dh FLOPs per visible pair and head forward, 2.5x that backward) for forward and
forward+backward, and the speed-up of ours over each (their time / our time). ``sdpa mask`` is
the repo's ``sdpa`` backend (builds the dense mask per call, as the model's fallback does);
``sdpa mask built`` passes a mask built once (SDPA's kernel alone).

Cases (base: 12 heads, Dh 64): ``vision`` N=197, no mask; ``text`` N=64, right padding;
``pair`` N=261 (197 image + 64 text), padding of the text; ``caption`` N=261 with the
captioning (prefix-causal) mask and text padding. q/k/v are strided views of a fused
``[B, N, 3, H, Dh]`` projection, as in the model.

    python bench/attention.py                      # CUDA, bf16, batch 64 and 256
    python bench/attention.py --batch 128 --sweep  # also try other tile configs for ours
    TRITON_INTERPRET=1 python bench/attention.py --device cpu --batch 2 --heads 2 --iters 1
        # a smoke run of the script itself (interpreter; the times mean nothing)
"""
from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from beit3.model.attention import dense_keep_mask, sdpa_attention
from beit3.model.kernels import BlockConfig, default_config, flash_attention, interpreter_mode, triton_attention

logger = logging.getLogger(__name__)
IMAGE_TOKENS = 197
TEXT_TOKENS = 64


@dataclass
class Case:
    name: str
    n: int
    key_padding_mask: Optional[torch.Tensor]  # [B, N] True = padding (right padding)
    prefix_len: Optional[int]

    @property
    def masked(self) -> bool:
        return self.key_padding_mask is not None or self.prefix_len is not None


def make_cases(batch: int, device: torch.device, seed: int = 0) -> list[Case]:
    """The four BEiT-3 cases; text lengths uniform in [8, 64] (fixed seed)."""
    g = torch.Generator().manual_seed(seed)
    text_len = torch.randint(8, TEXT_TOKENS + 1, (batch,), generator=g)
    text_pad = (torch.arange(TEXT_TOKENS)[None, :] >= text_len[:, None]).to(device)  # [B, 64]
    pair_pad = torch.cat([torch.zeros(batch, IMAGE_TOKENS, dtype=torch.bool, device=device), text_pad], 1)
    n_pair = IMAGE_TOKENS + TEXT_TOKENS
    return [Case("vision", IMAGE_TOKENS, None, None), Case("text", TEXT_TOKENS, text_pad, None),
            Case("pair", n_pair, pair_pad, None), Case("caption", n_pair, pair_pad, IMAGE_TOKENS)]


def visible_pairs(case: Case, batch: int, device: torch.device) -> int:
    keep = dense_keep_mask(batch, case.n, case.n, device, case.key_padding_mask, case.prefix_len)
    return batch * case.n * case.n if keep is None else int(keep.sum())


# ---- implementations: fn(q, k, v) -> o ----------------------------------------------------
def impl_ours(case: Case, config: Optional[BlockConfig] = None) -> Callable:
    if config is None:
        return lambda q, k, v: triton_attention(q, k, v, key_padding_mask=case.key_padding_mask,
                                                prefix_len=case.prefix_len)
    valid = None if case.key_padding_mask is None else (~case.key_padding_mask).sum(1, dtype=torch.int32)
    return lambda q, k, v: flash_attention(q, k, v, valid_len=valid, prefix_len=case.prefix_len, config=config)


def impl_sdpa_mask(case: Case) -> Optional[Callable]:
    if not case.masked:
        return None
    return lambda q, k, v: sdpa_attention(q, k, v, key_padding_mask=case.key_padding_mask,
                                          prefix_len=case.prefix_len)


def impl_sdpa_mask_prebuilt(case: Case, batch: int, device: torch.device) -> Optional[Callable]:
    """SDPA's own cost with a boolean mask: the ``[B, 1, N, N]`` mask built once, outside the timing."""
    if not case.masked:
        return None
    keep = dense_keep_mask(batch, case.n, case.n, device, case.key_padding_mask, case.prefix_len)
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


def impl_sdpa_nomask(case: Case, flash_only: bool) -> Optional[Callable]:
    if case.masked:
        return None
    if not flash_only:
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def fn(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)
    return fn


def impl_flex(case: Case, batch: int, device: torch.device) -> Optional[Callable]:
    """FlexAttention with a block mask built once (as a model would, per batch), compiled."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    valid = (torch.full((batch,), case.n, device=device) if case.key_padding_mask is None
             else (~case.key_padding_mask).sum(1))
    prefix = case.n if case.prefix_len is None else case.prefix_len

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx < valid[b]) & ((kv_idx < prefix) | (kv_idx <= q_idx))

    block_mask = create_block_mask(mask_mod, batch, None, case.n, case.n, device=str(device))
    flex = torch.compile(flex_attention, dynamic=False) if device.type == "cuda" else flex_attention
    return lambda q, k, v: flex(q, k, v, block_mask=block_mask)


def impl_flash_attn(case: Case) -> Optional[Callable]:
    """flash-attn 2 if installed: dense for ``vision``, varlen on packed tokens for padding
    (packing the inputs excluded from the time); no prefix-causal mask, so nothing for ``caption``."""
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func
    except ImportError:
        return None
    if case.prefix_len is not None:
        return None
    if case.key_padding_mask is None:
        return lambda q, k, v: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    keep = ~case.key_padding_mask
    lens = keep.sum(1, dtype=torch.int32)
    cu = F.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))
    max_len = int(lens.max())
    idx = keep.flatten().nonzero().squeeze(1)
    packed: dict[int, torch.Tensor] = {}

    def pack(x):  # [B, H, N, D] -> [total, H, D], cached per input tensor
        key = x.data_ptr()
        if key not in packed:
            packed[key] = x.transpose(1, 2).flatten(0, 1)[idx].detach().requires_grad_(x.requires_grad)
        return packed[key]

    def fn(q, k, v):  # unpacking the output back to [B, H, N, D] is timed (one small scatter)
        B, H, N, D = q.shape
        o = flash_attn_varlen_func(pack(q), pack(k), pack(v), cu, cu, max_len, max_len)  # [total, H, D]
        return o.new_zeros(B * N, H, D).index_copy(0, idx, o).view(B, N, H, D).transpose(1, 2)
    return fn


# ---- timing -------------------------------------------------------------------------------
def time_ms(fn: Callable[[], object], warmup: int, iters: int, device: torch.device) -> float:
    if device.type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=iters))  # warmup/rep in ms
    for _ in range(max(1, warmup // 100)):
        fn()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) * 1e3 / iters


def measure(impl: Callable, qkv: torch.Tensor, backward: bool, args) -> tuple[float, Optional[float]]:
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # strided [B, H, N, Dh] views
    with torch.no_grad():
        fwd = time_ms(lambda: impl(q, k, v), args.warmup, args.iters, qkv.device)
    if not backward:
        return fwd, None
    do = torch.randn(q.shape, device=qkv.device, dtype=qkv.dtype)

    def step():
        qkv.grad = None
        qq, kk, vv = qkv.permute(2, 0, 3, 1, 4)
        impl(qq, kk, vv).backward(do)
    return fwd, time_ms(step, args.warmup, args.iters, qkv.device)


def sweep_configs(head_dim: int) -> list[BlockConfig]:
    base = default_config(head_dim, interpret=False)
    out = [base]
    for fm, fn_, w in ((64, 64, 4), (128, 128, 8), (128, 32, 4), (64, 32, 4)):
        out.append(BlockConfig(fm, fn_, base.dkdv_m, base.dkdv_n, base.dq_m, base.dq_n, fwd_warps=w,
                               dkdv_warps=base.dkdv_warps, dq_warps=base.dq_warps, num_stages=base.num_stages))
    for dm, dn, qm, qn in ((32, 64, 64, 32), (64, 64, 64, 64), (16, 64, 64, 16)):
        out.append(BlockConfig(base.fwd_m, base.fwd_n, dm, dn, qm, qn, fwd_warps=base.fwd_warps,
                               dkdv_warps=4, dq_warps=4, num_stages=base.num_stages))
    return out


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--cases", nargs="+", default=["vision", "text", "pair", "caption"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--warmup", type=int, default=25, help="ms on CUDA (do_bench), else iterations x 100")
    p.add_argument("--iters", type=int, default=100, help="ms on CUDA (do_bench), else iterations")
    p.add_argument("--no-backward", action="store_true")
    p.add_argument("--sweep", action="store_true", help="also time other tile configs of ours")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/attention.py needs a CUDA GPU (or --device cpu with TRITON_INTERPRET=1 for a smoke run)")
    if device.type == "cpu" and not interpreter_mode():
        raise SystemExit("--device cpu runs our kernel under the interpreter: set TRITON_INTERPRET=1")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if device.type == "cpu" and dtype == torch.bfloat16:
        dtype = torch.float16  # the interpreter has no bf16
    H, D = args.heads, args.head_dim
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter smoke run)"
    print(f"# {name}, {dtype}, heads {H}, head dim {D}; TFLOP/s count unmasked pairs only; "
          f"speed-up = their time / our time")
    header = f"{'case':<8} {'B':>4} {'impl':<16} {'fwd ms':>8} {'TF/s':>7} {'f+b ms':>8} {'TF/s':>7} {'speedup fwd':>11} {'speedup f+b':>11}"
    for B in args.batch:
        print(header)
        for case in make_cases(B, device):
            if case.name not in args.cases:
                continue
            flops_fwd = 4.0 * D * H * visible_pairs(case, B, device)
            qkv = torch.randn(B, case.n, 3, H, D, device=device, dtype=dtype, requires_grad=True)
            impls: dict[str, Optional[Callable]] = {"ours": impl_ours(case)}
            if args.sweep:
                for i, cfg in enumerate(sweep_configs(D)[1:], 1):
                    impls[f"ours cfg{i}"] = impl_ours(case, cfg)
            impls["sdpa mask"] = impl_sdpa_mask(case)
            impls["sdpa mask built"] = impl_sdpa_mask_prebuilt(case, B, device)
            impls["sdpa no mask"] = impl_sdpa_nomask(case, flash_only=False)
            if device.type == "cuda":
                impls["sdpa flash"] = impl_sdpa_nomask(case, flash_only=True)
            impls["flex"] = impl_flex(case, B, device)
            impls["flash-attn"] = impl_flash_attn(case)
            q, k, v = qkv.detach().permute(2, 0, 3, 1, 4)
            ref = sdpa_attention(q, k, v, key_padding_mask=case.key_padding_mask, prefix_len=case.prefix_len)
            ours_diff = (impls["ours"](q, k, v).float() - ref.float()).abs().max().item()
            results = {}
            for label, impl in impls.items():
                if impl is None:
                    continue
                try:
                    results[label] = measure(impl, qkv, not args.no_backward, args)
                except Exception as e:  # an implementation unavailable for this shape/device
                    print(f"{case.name:<8} {B:>4} {label:<16} failed: {type(e).__name__}: {str(e)[:80]}")
            of, ob = results["ours"]
            for label, (tf, tb) in results.items():
                tflops_f = flops_fwd / tf / 1e9
                cols = [f"{tf:8.3f}", f"{tflops_f:7.1f}"]
                if tb is not None:
                    cols += [f"{tb:8.3f}", f"{3.5 * flops_fwd / tb / 1e9:7.1f}"]
                else:
                    cols += [f"{'-':>8}", f"{'-':>7}"]
                rf = f"{tf / of:11.2f}"
                rb = f"{tb / ob:11.2f}" if tb is not None and ob is not None else f"{'-':>11}"
                print(f"{case.name:<8} {B:>4} {label:<16} {' '.join(cols)} {rf} {rb}")
            print(f"# {case.name} B={B}: max |ours - sdpa| = {ours_diff:.2e}, "
                  f"{visible_pairs(case, B, device) / (B * case.n * case.n):.0%} of pairs unmasked")


if __name__ == "__main__":
    main()
