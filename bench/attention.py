"""Attention benchmark at BEiT-3 shapes: our Triton kernel against SDPA, FlexAttention, flash-attn.

GPU commands (bf16; every run times forward and forward+backward; ``--no-backward`` drops the latter):

    python bench/attention.py --preset base  --dtype bf16 --batch 64 256   # 12 heads, Dh 64
    python bench/attention.py --preset large --dtype bf16 --batch 64 256   # 16 heads, Dh 64
    python bench/attention.py --preset giant --dtype bf16 --batch 64       # 16 heads, Dh 88, 257 image tokens
    python bench/attention.py --preset base --batch 128 --sweep            # + other tile configs of ours

On CUDA it prints, per case and implementation, time and TFLOP/s (only unmasked query-key
pairs count: 4 * Dh FLOPs per visible pair and head forward, 2.5x that backward) for forward
and forward+backward, and the speed-up of ours over each (their time / our time). ``sdpa
mask`` is the repo's ``sdpa`` backend (builds the dense mask per call, as the model's fallback
does); ``sdpa mask built`` passes a mask built once (SDPA's kernel alone).

Cases (base/large; giant has 257 image tokens): ``vision`` N=197, no mask; ``text`` N=64,
right padding; ``pair`` N=261 (197 image + 64 text), padding of the text; ``caption`` N=261
with the captioning (prefix-causal) mask and text padding. q/k/v are strided views of a fused ``[B, N, 3, H, Dh]`` projection, as in the model.

Without a GPU, timing our kernel means timing Triton's interpreter, so ``--device cpu`` is a
correctness-only mode instead (fp16; needs ``TRITON_INTERPRET=1``): the same cases at a small
batch, max abs error of out/dq/dk/dv against the fp32 ``math`` reference for ours, SDPA and
``math`` in fp16, and the ratio of our error to each baseline's (the FlashAttention tests'
rule asks for at most 2):

    TRITON_INTERPRET=1 python bench/attention.py --device cpu --batch 2 --heads 2
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from beit3.model import get_config
from beit3.model.attention import dense_keep_mask, math_attention, sdpa_attention
from beit3.model.kernels import BlockConfig, default_config, flash_attention, interpreter_mode, triton_attention

logger = logging.getLogger(__name__)
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


def make_cases(batch: int, device: torch.device, image_tokens: int = 197, seed: int = 0) -> list[Case]:
    """The four BEiT-3 cases (``image_tokens``: 197 for base/large, 257 for giant's 14-pixel
    patches); text lengths uniform in [8, 64] (fixed seed)."""
    g = torch.Generator().manual_seed(seed)
    text_len = torch.randint(8, TEXT_TOKENS + 1, (batch,), generator=g)
    text_pad = (torch.arange(TEXT_TOKENS)[None, :] >= text_len[:, None]).to(device)  # [B, 64]
    pair_pad = torch.cat([torch.zeros(batch, image_tokens, dtype=torch.bool, device=device), text_pad], 1)
    n_pair = image_tokens + TEXT_TOKENS
    return [Case("vision", image_tokens, None, None), Case("text", TEXT_TOKENS, text_pad, None),
            Case("pair", n_pair, pair_pad, None), Case("caption", n_pair, pair_pad, image_tokens)]


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
def time_ms(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Median CUDA time of ``fn`` in ms (``triton.testing.do_bench``; warmup/iters in ms)."""
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=warmup, rep=iters))


def measure(impl: Callable, qkv: torch.Tensor, backward: bool, args) -> tuple[float, Optional[float]]:
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # strided [B, H, N, Dh] views
    with torch.no_grad():
        fwd = time_ms(lambda: impl(q, k, v), args.warmup, args.iters)
    if not backward:
        return fwd, None
    do = torch.randn(q.shape, device=qkv.device, dtype=qkv.dtype)

    def step():
        qkv.grad = None
        qq, kk, vv = qkv.permute(2, 0, 3, 1, 4)
        impl(qq, kk, vv).backward(do)
    return fwd, time_ms(step, args.warmup, args.iters)


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


def grads_of(fn: Callable, qkv: torch.Tensor, do: torch.Tensor) -> list[torch.Tensor]:
    """[out, dq, dk, dv] of ``fn`` on strided views of the fused ``qkv`` leaf."""
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    o = fn(q, k, v)
    (g,) = torch.autograd.grad(o, qkv, do.to(o.dtype))
    return [o] + [g[:, :, i] for i in range(3)]


def check_cpu(args, H: int, D: int, image_tokens: int) -> None:
    """Correctness-only mode (no GPU): errors against the fp32 ``math`` reference, no times."""
    device, dtype = torch.device("cpu"), torch.float16
    print(f"# cpu, Triton interpreter, correctness only (no timings: they would time the interpreter); "
          f"{dtype}, heads {H}, head dim {D}, {image_tokens} image tokens")
    print("# max abs error vs fp32 math reference; ratio = our error / this impl's error, worst of "
          "out/dq/dk/dv (FlashAttention test rule: <= 2)")
    print(f"| {'case':<8} | {'N':>3} | {'B':>3} | {'impl':<10} | {'out':>8} | {'dq':>8} | {'dk':>8} | {'dv':>8} "
          f"| {'ours/this':>9} |")
    print("|" + "|".join("-" * w for w in (10, 5, 5, 12, 10, 10, 10, 10, 11)) + "|")
    for B in args.batch:
        for case in make_cases(B, device, image_tokens):
            if case.name not in args.cases:
                continue
            g = torch.Generator().manual_seed(B)
            qkv = torch.randn(B, case.n, 3, H, D, generator=g).to(dtype).requires_grad_()
            do = torch.randn(B, H, case.n, D, generator=g)
            mask = dict(key_padding_mask=case.key_padding_mask, prefix_len=case.prefix_len)
            ref = grads_of(lambda q, k, v: math_attention(q, k, v, **mask), qkv.detach().float().requires_grad_(), do)
            impls = {"ours": lambda q, k, v: triton_attention(q, k, v, **mask),
                     "sdpa fp16": lambda q, k, v: sdpa_attention(q, k, v, **mask),
                     "math fp16": lambda q, k, v: math_attention(q, k, v, **mask)}
            errs = {label: [(a.float() - r).abs().max().item() for a, r in zip(grads_of(fn, qkv, do), ref)]
                    for label, fn in impls.items()}
            for label, e in errs.items():
                ratio = max(o / max(t, 1e-12) for o, t in zip(errs["ours"], e))
                print(f"| {case.name:<8} | {case.n:>3} | {B:>3} | {label:<10} | "
                      + " | ".join(f"{x:8.2e}" for x in e) + f" | {ratio:9.2f} |")


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=["base", "large", "giant"], default="base",
                   help="model size: heads and head dim (overridden by --heads/--head-dim)")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="default: 64 256 on CUDA, 2 on cpu")
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--cases", nargs="+", default=["vision", "text", "pair", "caption"],
                   choices=["vision", "text", "pair", "caption"])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--warmup", type=int, default=25, help="ms (triton.testing.do_bench)")
    p.add_argument("--iters", type=int, default=100, help="ms (triton.testing.do_bench)")
    p.add_argument("--no-backward", action="store_true")
    p.add_argument("--sweep", action="store_true", help="also time other tile configs of ours")
    args = p.parse_args(argv)
    cfg = get_config(args.preset)
    H = args.heads or cfg.num_heads
    D = args.head_dim or cfg.head_dim
    device = torch.device(args.device)
    if device.type == "cpu":
        if not interpreter_mode():
            raise SystemExit("--device cpu runs our kernel under Triton's interpreter: set TRITON_INTERPRET=1")
        args.batch = args.batch or [2]
        check_cpu(args, H, D, cfg.num_vision_tokens)
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench/attention.py times the kernels on a CUDA GPU and none is available; "
                         "without one, run the correctness-only mode: "
                         "TRITON_INTERPRET=1 python bench/attention.py --device cpu --batch 2 --heads 2")
    if interpreter_mode():
        raise SystemExit("TRITON_INTERPRET=1 is set: unset it to time the compiled kernels on CUDA")
    args.batch = args.batch or [64, 256]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    print(f"# {torch.cuda.get_device_name()}, {dtype}, {args.preset}: heads {H}, head dim {D}, "
          f"{cfg.num_vision_tokens} image tokens; "
          f"TFLOP/s count unmasked pairs only; speed-up = their time / our time")
    header = f"{'case':<8} {'B':>4} {'impl':<16} {'fwd ms':>8} {'TF/s':>7} {'f+b ms':>8} {'TF/s':>7} {'speedup fwd':>11} {'speedup f+b':>11}"
    for B in args.batch:
        print(header)
        for case in make_cases(B, device, cfg.num_vision_tokens):
            if case.name not in args.cases:
                continue
            flops_fwd = 4.0 * D * H * visible_pairs(case, B, device)
            qkv = torch.randn(B, case.n, 3, H, D, device=device, dtype=dtype, requires_grad=True)
            impls: dict[str, Optional[Callable]] = {"ours": impl_ours(case)}
            if args.sweep:
                for i, cfg_i in enumerate(sweep_configs(D)[1:], 1):
                    impls[f"ours cfg{i}"] = impl_ours(case, cfg_i)
            impls["sdpa mask"] = impl_sdpa_mask(case)
            impls["sdpa mask built"] = impl_sdpa_mask_prebuilt(case, B, device)
            impls["sdpa no mask"] = impl_sdpa_nomask(case, flash_only=False)
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
            if "ours" not in results:
                continue
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
