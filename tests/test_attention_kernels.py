"""Triton flash-attention kernels against the fp32 ``math`` reference.

Without a GPU the kernels run under Triton's interpreter: every test not marked ``gpu`` sets
``TRITON_INTERPRET=1`` for its own duration (the kernel module loads an interpreted variant on
demand, whatever was imported before). Tolerance rule of the FlashAttention tests: the
kernel's max error against the fp32 reference is at most twice the error of the same
reference computed in the kernel's low precision (fp16/bf16; fp32 kernels against an fp64
upcast, with a 1e-5 floor). Each reference check prints its errors (``pytest -s``: lines
starting ``[kernel-err]``).
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
from typing import Optional, Union

import pytest
import torch

from beit3.model import BEiT3, get_config
from beit3.model.attention import attention, available_backends, math_attention, resolve_backend, sdpa_attention
from beit3.model.kernels import (BlockConfig, compiled_mode_available, flash_attention, interpreter_mode, plan,
                                 suffix_padding_lengths, triton_attention)


def tiles(fwd_m: int, fwd_n: int, dkdv_m: int, dkdv_n: int, dq_m: int, dq_n: int) -> BlockConfig:
    return BlockConfig(fwd_m, fwd_n, dkdv_m, dkdv_n, dq_m, dq_n, 1, 1, 1, 1)


T16, T32, T64 = tiles(*[16] * 6), tiles(*[32] * 6), tiles(*[64] * 6)


@pytest.fixture(autouse=True)
def _interpreter(request, monkeypatch):
    """CPU tests run the kernels under Triton's interpreter; GPU tests compile them (even when
    the suite is started with ``TRITON_INTERPRET=1`` in the environment; but then Triton's own
    functions were imported interpreted and cannot be compiled: GPU tests say so and skip)."""
    gpu = request.node.get_closest_marker("gpu") is not None
    if gpu and not compiled_mode_available():
        pytest.skip("triton was imported with TRITON_INTERPRET=1: run GPU tests without it in the environment")
    monkeypatch.setenv("TRITON_INTERPRET", "0" if gpu else "1")


# ---- helpers --------------------------------------------------------------------------------
def fused_qkv(B: int, N: int, H: int, D: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0) -> torch.Tensor:
    """A ``[B, N, 3, H, Dh]`` leaf, the model's fused projection layout."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, 3, H, D, generator=g).to(device=device, dtype=dtype).requires_grad_()


def views(qkv: torch.Tensor):
    B, N, _, H, D = qkv.shape
    return qkv.permute(2, 0, 3, 1, 4)  # q, k, v: strided [B, H, N, Dh] views


def padding_mask(valid: Optional[torch.Tensor], B: int, N: int, device) -> Optional[torch.Tensor]:
    if valid is None:
        return None
    return torch.arange(N, device=device)[None, :] >= valid.to(device)[:, None]


def run(fn, qkv: torch.Tensor, do: torch.Tensor, **mask):
    """Output and (dq, dk, dv) of ``fn`` on views of ``qkv``."""
    q, k, v = views(qkv)
    o = fn(q, k, v, **mask)
    (g,) = torch.autograd.grad(o, qkv, do.to(o.dtype))
    return [o] + [g[:, :, i] for i in range(3)]


def mask_kind(N: int, valid, prefix) -> str:
    """A label for the printed error lines: which mask features the call exercises."""
    parts = []
    if prefix is not None:
        p = torch.as_tensor(prefix).reshape(-1)
        parts += sorted({"causal" if x == 0 else "full" if x >= N else "prefix" for x in p.tolist()})
    if valid is not None:
        v = torch.as_tensor(valid).reshape(-1)
        if (v < N).any():
            parts.append("padding")
        if (v == 0).any():
            parts.append("empty-rows")
    return "+".join(parts) or "full"


def check_against_reference(B: int, N: int, H: int, D: int, dtype: torch.dtype, valid=None,
                            prefix: Union[int, torch.Tensor, None] = None, config: Optional[BlockConfig] = None,
                            device: str = "cpu", seed: int = 0) -> list:
    qkv = fused_qkv(B, N, H, D, dtype, device, seed)
    do = torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(seed + 1)).to(device)
    kpm = padding_mask(valid, B, N, device)
    ref_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    ours = run(lambda q, k, v: flash_attention(q, k, v, valid_len=valid, prefix_len=prefix, config=config), qkv, do)
    ref = run(lambda q, k, v: math_attention(q, k, v, key_padding_mask=kpm, prefix_len=prefix),
              qkv.detach().to(ref_dtype).requires_grad_(), do)
    low = run(lambda q, k, v: math_attention(q, k, v, key_padding_mask=kpm, prefix_len=prefix), qkv, do)
    floor = 1e-5 if dtype == torch.float32 else 1e-4
    errs = {}
    for name, a, r, lo in zip(("out", "dq", "dk", "dv"), ours, ref, low):
        assert a.dtype == dtype and not torch.isnan(a).any(), name
        errs[name] = ((a.double() - r.double()).abs().max().item(), (lo.double() - r.double()).abs().max().item())
    print(f"[kernel-err] {str(dtype)[6:]:<8} {device} B={B} N={N} H={H} D={D} mask={mask_kind(N, valid, prefix)}: "
          + " ".join(f"{n}={e:.2e}(ref {b:.2e})" for n, (e, b) in errs.items()))
    for name, (err, base) in errs.items():
        assert err <= 2 * base + floor, f"{name}: error {err:.3g} > 2 x {base:.3g} (+{floor})"
    return ours


# ---- kernel correctness (interpreter on CPU) --------------------------------------------------------
@pytest.mark.parametrize("N", [1, 63, 64, 65, 197, 261, 325, 384])
def test_sequence_lengths_fp16(N):
    """Sample 0 full attention, sample 1 padded and prefix-causal; tiles cut N anywhere."""
    valid = torch.tensor([N, max(1, N - N // 4)])
    prefix = torch.tensor([N, N // 3])
    check_against_reference(2, N, 1, 64, torch.float16, valid, prefix, T32 if N <= 65 else T64)


@pytest.mark.parametrize("pad", ["none", "empty_rows"])
@pytest.mark.parametrize("prefix", [0, 197, "full"], ids=["causal", "captioning", "prefix_full"])
def test_masks_pair_length(prefix, pad):
    """N=261 (image+text pair): captioning prefixes 0 (causal) / 197 / full, alone and with
    right padding of the text in sample 0 plus a sample whose keys are all padding (every query
    row fully masked). prefix_full with padding = the key padding mask alone."""
    N = 261
    valid = torch.tensor([N - 37, 0]) if pad == "empty_rows" else None
    out = check_against_reference(2, N, 1, 64, torch.float16, valid, N if prefix == "full" else prefix, T64)
    if pad == "empty_rows":
        for t in out:  # out, dq, dk, dv of the all-padding sample are exactly zero
            assert t[1].abs().max().item() == 0.0


@pytest.mark.parametrize("D", [16, 88, 128])
def test_head_dims_fp16(D):
    check_against_reference(1, 65, 2, D, torch.float16, torch.tensor([50]), 20, T32)


def test_giant_head_dim_padding_only():
    """Head dim 88 (giant, 1408/16) at N=197 (not a multiple of any tile), key padding without
    a prefix (``prefix_len=None``), default interpreter tiles."""
    check_against_reference(2, 197, 1, 88, torch.float16, torch.tensor([197, 150]), None)


@pytest.mark.parametrize("N,D", [(63, 64), (130, 88)])
def test_fp32(N, D):
    check_against_reference(2, N, 1, D, torch.float32, torch.tensor([N, N // 2]), torch.tensor([0, N // 3]),
                            T32 if N < 100 else T64)


@pytest.mark.parametrize("config", [tiles(64, 16, 16, 64, 64, 16), tiles(16, 64, 64, 16, 16, 64)],
                         ids=["wide_m", "wide_n"])
def test_non_square_tiles(config):
    """Block skipping and the masked/unmasked loop split with unequal query and key tiles."""
    check_against_reference(2, 150, 1, 32, torch.float32, torch.tensor([150, 111]), torch.tensor([0, 70]), config)


def test_masked_out_blocks_are_never_read():
    """Block skipping, shown with NaN poison (a NaN that is loaded reaches the result even where
    its probability is 0, since 0 * NaN = NaN). Causal mask, 32 x 32 tiles, N = 64: query block
    0 cannot see key block 1, so the forward and dQ of rows 0-31 must not read v[32:]; the dK/dV
    program of key block 1 must not read dO of rows 0-31; with 32 valid keys the dK/dV program
    of the padded key block reads no query block at all (dK = dV = 0 exactly)."""
    B, H, N, D = 1, 1, 64, 16
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(B, H, N, D, generator=g).requires_grad_() for _ in range(3))
    do = torch.randn(B, H, N, D, generator=g)
    ref_o = math_attention(q, k, v, prefix_len=0)
    ref = torch.autograd.grad(ref_o, (q, k, v), do, retain_graph=True)
    # forward and dQ: poisoned values of the key block a causal query block 0 skips
    v_bad = v.detach().clone()
    v_bad[:, :, 32:] = float("nan")
    v_bad.requires_grad_()
    o = flash_attention(q, k, v_bad, prefix_len=0, config=T32)
    torch.testing.assert_close(o[:, :, :32], ref_o[:, :, :32], atol=1e-5, rtol=1e-5)
    assert torch.isnan(o[:, :, 32:]).all()  # rows 32-63 do see the poison: it is live
    (dq,) = torch.autograd.grad(o, q, do)
    torch.testing.assert_close(dq[:, :, :32], ref[0][:, :, :32], atol=1e-5, rtol=1e-5)
    # dK/dV: poisoned output gradient of the query block that key block 1 is invisible to
    do_bad = do.clone()
    do_bad[:, :, :32] = float("nan")
    o = flash_attention(q, k, v, prefix_len=0, config=T32)
    dk, dv = torch.autograd.grad(o, (k, v), do_bad)
    ref_dk, ref_dv = torch.autograd.grad(ref_o, (k, v), do_bad.nan_to_num(0.0))
    torch.testing.assert_close(dk[:, :, 32:], ref_dk[:, :, 32:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dv[:, :, 32:], ref_dv[:, :, 32:], atol=1e-5, rtol=1e-5)
    assert torch.isnan(dv[:, :, :32]).all()
    # padding: key block 1 is all padding; every dO is poison, its dK/dV are still exact zeros
    o = flash_attention(q, k, v, valid_len=32, config=T32)
    dk, dv = torch.autograd.grad(o, (k, v), torch.full_like(do, float("nan")))
    assert dk[:, :, 32:].eq(0).all() and dv[:, :, 32:].eq(0).all()


def test_kernel_path_builds_no_dense_mask(monkeypatch):
    """The masks come from indices: the ``triton`` backend, forward and backward, with padding
    and the captioning mask, never calls the dense ``[B, 1, N, N]`` mask builder."""
    def no_dense_mask(*args, **kwargs):
        raise AssertionError("dense N x N mask built on the kernel path")

    q, k, v = views(fused_qkv(2, 40, 2, 16, torch.float32))
    kpm = padding_mask(torch.tensor([40, 25]), 2, 40, "cpu")
    ref = math_attention(q, k, v, key_padding_mask=kpm, prefix_len=17)
    ref_g = torch.autograd.grad(ref.square().sum(), (q, k, v))
    monkeypatch.setattr(importlib.import_module("beit3.model.attention"), "dense_keep_mask", no_dense_mask)
    o = attention(q, k, v, key_padding_mask=kpm, prefix_len=17, backend="triton")
    for a, b in zip(torch.autograd.grad(o.square().sum(), (q, k, v)), ref_g):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_backward_is_deterministic():
    qkv = fused_qkv(2, 65, 2, 32, torch.float16)
    do = torch.randn(2, 2, 65, 32, dtype=torch.float16)
    kw = dict(valid_len=torch.tensor([65, 40]), prefix_len=17, config=T32)
    g1 = run(lambda q, k, v: flash_attention(q, k, v, **kw), qkv, do)
    g2 = run(lambda q, k, v: flash_attention(q, k, v, **kw), qkv, do)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_cross_lengths_and_contiguous_inputs():
    """Nq != Nk and plain contiguous [B, H, N, Dh] tensors (not views of a fused projection)."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 2, 40, 16, generator=g, dtype=torch.float64).float().requires_grad_()
    k = torch.randn(2, 2, 70, 16, generator=g).requires_grad_()
    v = torch.randn(2, 2, 70, 16, generator=g).requires_grad_()
    valid, prefix = torch.tensor([70, 33]), torch.tensor([5, 50])
    o = flash_attention(q, k, v, valid_len=valid, prefix_len=prefix, config=T16)
    r = math_attention(q, k, v, key_padding_mask=padding_mask(valid, 2, 70, "cpu"), prefix_len=prefix)
    torch.testing.assert_close(o, r, atol=2e-6, rtol=1e-5)
    do = torch.randn_like(o)
    for a, b in zip(torch.autograd.grad(o, (q, k, v), do), torch.autograd.grad(r, (q, k, v), do)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_output_layout_makes_head_merge_free():
    q, k, v = views(fused_qkv(2, 20, 4, 16, torch.float32))
    o = flash_attention(q, k, v, config=T16)
    merged = o.transpose(1, 2).reshape(2, 20, 64)
    assert merged.data_ptr() == o.data_ptr() and o.transpose(1, 2).is_contiguous()


COMPILE_SCRIPT = """
import importlib, sys
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
dtype, D = getattr(torch, sys.argv[1]), int(sys.argv[2])
fa = importlib.import_module("beit3.model.kernels.flash_attention")
assert fa.compiled_mode_available()
kern, cfg = fa._kernels(False), fa.default_config(D, interpret=False)
types = dict.fromkeys(("Q", "K", "V", "O", "DO", "DK", "DV", "DQ"), {torch.float16: "*fp16", torch.bfloat16: "*bf16"}[dtype])
types.update(LSE="*fp32", DELTA="*fp32", VALID="*i32", PREFIX="*i32", sm_scale="fp32")
for fn, bm, bn, warps in ((kern.attn_fwd, cfg.fwd_m, cfg.fwd_n, cfg.fwd_warps),
                          (kern.attn_bwd_dkdv, cfg.dkdv_m, cfg.dkdv_n, cfg.dkdv_warps),
                          (kern.attn_bwd_dq, cfg.dq_m, cfg.dq_n, cfg.dq_warps)):
    const = dict(HEAD_DIM=D, BLOCK_D=fa._block_d(D), BLOCK_M=bm, BLOCK_N=bn, PRECISION="tf32")
    sig = {n: "constexpr" if n in const else types.get(n, "i32") for n in fn.arg_names}
    c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=warps, num_stages=cfg.num_stages))
    print("COMPILED", fn.__name__, len(c.asm["cubin"]), c.metadata.shared)
"""


@pytest.mark.slow
@pytest.mark.parametrize("dtype,D", [("bfloat16", 88)], ids=["bf16-d88"])
def test_kernels_compile_for_h100(dtype, D, tmp_path):
    """The interpreter accepts code that the compiler rejects, so without a GPU also compile
    all three kernels for sm_90 (H100) down to a cubin, with the default CUDA tiles, in bf16 at
    the giant head dim (88, padded to 128). In a fresh process: ``triton.language`` must have
    been imported without ``TRITON_INTERPRET`` for the compiler to take its functions."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a real compile, not a cache hit
    res = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT, dtype, str(D)], capture_output=True, text=True,
                         timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    done = {line.split()[1]: (int(line.split()[2]), int(line.split()[3]))
            for line in res.stdout.splitlines() if line.startswith("COMPILED")}
    assert set(done) == {"attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq"}, res.stdout
    for name, (cubin_bytes, smem) in done.items():
        assert cubin_bytes > 0 and smem <= 227 * 1024, (name, cubin_bytes, smem)


@pytest.mark.slow
def test_interpreted_triton_process_refuses_to_compile():
    """A process that imported Triton with ``TRITON_INTERPRET=1`` cannot compile the kernels:
    it says so clearly instead of failing inside Triton's compiler."""
    script = """
import importlib, os
import triton.language
fa = importlib.import_module("beit3.model.kernels.flash_attention")
assert not fa.compiled_mode_available()
os.environ["TRITON_INTERPRET"] = "0"
try:
    fa._kernels(False)
except RuntimeError as e:
    print("ERROR", e)
"""
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "ERROR triton.language was imported with TRITON_INTERPRET=1" in res.stdout, res.stdout


# ---- dispatch and fallbacks ---------------------------------------------------------------------
def test_suffix_padding_lengths():
    right = torch.tensor([[False, False, True, True], [False, False, False, False], [True, True, True, True]])
    assert suffix_padding_lengths(right).tolist() == [2, 4, 0]
    left = torch.tensor([[True, False, False, False], [False, False, False, False]])
    assert suffix_padding_lengths(left) is None
    inner = torch.tensor([[False, True, False, True]])
    assert suffix_padding_lengths(inner) is None
    m = torch.tensor([[False, False, True]])
    assert suffix_padding_lengths(m).tolist() == [2]
    m[0, 0] = True  # modified in place: the cached answer must not be reused
    assert suffix_padding_lengths(m) is None


def test_backend_registered_and_auto_on_cpu():
    assert "triton" in available_backends()
    assert resolve_backend("auto", torch.device("cpu"), dense_mask=False) == "sdpa"
    # no committed GPU measurement shows the kernel faster in bf16: auto is sdpa, triton by name only
    assert resolve_backend("auto", torch.device("cuda"), dense_mask=False) == "sdpa"
    assert resolve_backend("auto", torch.device("cuda"), dense_mask=True) == "sdpa"
    assert resolve_backend("triton", torch.device("cuda"), dense_mask=False) == "triton"


def test_backend_uses_kernel_for_right_padding():
    q, k, v = views(fused_qkv(2, 30, 2, 16, torch.float32))
    kpm = padding_mask(torch.tensor([30, 12]), 2, 30, "cpu")
    assert interpreter_mode()
    reason, valid = plan(q, k, v, key_padding_mask=kpm)
    assert reason is None and valid.tolist() == [30, 12]
    o = attention(q, k, v, key_padding_mask=kpm, prefix_len=10, backend="triton")
    r = math_attention(q, k, v, key_padding_mask=kpm, prefix_len=10)
    torch.testing.assert_close(o, r, atol=2e-6, rtol=1e-5)


def test_backend_falls_back_to_sdpa(monkeypatch, caplog):
    """What the kernel does not take goes to ``sdpa`` (same output and gradients), with the
    reason logged once at INFO."""
    monkeypatch.setattr(importlib.import_module("beit3.model.kernels.flash_attention"), "_LOGGED", set())
    caplog.set_level("INFO", logger="beit3.model.kernels.flash_attention")
    qkv = fused_qkv(2, 12, 2, 16, torch.float32)
    q, k, v = views(qkv)
    left = torch.zeros(2, 12, dtype=torch.bool)
    left[1, :3] = True
    dense = torch.rand(12, 12, generator=torch.Generator().manual_seed(0)) > 0.7
    dense.fill_diagonal_(False)
    do = torch.randn(2, 2, 12, 16, generator=torch.Generator().manual_seed(1))
    cases = {"suffix": dict(key_padding_mask=left), "dense attn_mask": dict(attn_mask=dense)}
    for word, kw in cases.items():
        reason, _ = plan(q, k, v, **kw)
        assert reason is not None and word in reason
        ours = run(lambda q, k, v: triton_attention(q, k, v, prefix_len=4, **kw), qkv, do)
        ref = run(lambda q, k, v: math_attention(q, k, v, prefix_len=4, **kw),
                  qkv.detach().double().requires_grad_(), do.double())
        for name, a, r in zip(("out", "dq", "dk", "dv"), ours, ref):
            torch.testing.assert_close(a, r.float(), atol=1e-5, rtol=1e-5, msg=f"{word}: {name}")
        assert any(f"falls back to sdpa: {reason}" in r.getMessage() for r in caplog.records), caplog.text
    assert "dropout" in plan(q, k, v, dropout_p=0.1)[0]
    big = torch.zeros(1, 1, 4, 256)
    assert "head dim" in plan(big, big, big)[0]
    bf = q.detach().bfloat16()
    assert "bf16" in plan(bf, bf, bf)[0]
    with pytest.raises(ValueError, match="head dim"):
        flash_attention(big, big, big)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "CUDA" in plan(q, k, v)[0]
    torch.testing.assert_close(triton_attention(q, k, v), sdpa_attention(q, k, v))


def test_without_triton_auto_is_sdpa_with_logged_reason():
    """A process where Triton cannot be imported: ``triton`` is not registered, ``auto`` picks
    ``sdpa`` even for CUDA, the import error is logged, and asking for ``triton`` names it."""
    script = """
import logging, sys
sys.modules["triton"] = None  # import triton -> ImportError
logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="LOG %(name)s %(message)s")
import torch
from beit3.model.attention import attention, available_backends, resolve_backend, sdpa_attention
assert available_backends() == ["math", "sdpa"], available_backends()
assert resolve_backend("auto", torch.device("cuda"), dense_mask=False) == "sdpa"
q = torch.randn(1, 2, 5, 8)
kpm = torch.tensor([[False, False, False, True, True]])
assert torch.equal(attention(q, q, q, key_padding_mask=kpm, prefix_len=2),
                   sdpa_attention(q, q, q, key_padding_mask=kpm, prefix_len=2))
try:
    attention(q, q, q, backend="triton")
except ValueError as e:
    print("ERROR", e)
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    log = [line for line in res.stdout.splitlines() if line.startswith("LOG beit3.model.attention")]
    assert len(log) == 1 and "triton attention backend unavailable" in log[0] and "triton" in log[0], res.stdout
    err = [line for line in res.stdout.splitlines() if line.startswith("ERROR")]
    assert err and "'triton' is not available here (ModuleNotFoundError" in err[0], res.stdout


@pytest.fixture(scope="module")
def tiny_models():
    """Tiny BEiT-3 (head dim 16) with the math and the triton backend, same weights."""
    torch.manual_seed(0)
    ref = BEiT3(get_config("tiny", attn_backend="math"))
    ours = BEiT3(get_config("tiny", attn_backend="triton"))
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("causal_text", [False, True], ids=["padding", "captioning"])
def test_whole_model_matches_math_backend(tiny_models, causal_text):
    """Fused image+text input with right-padded text: the triton backend gives the math
    backend's hidden states and parameter gradients in fp32."""
    from sklearn.datasets import load_digits

    digits = torch.tensor(load_digits().images[:2], dtype=torch.float32) / 16.0  # [2, 8, 8]
    images = torch.nn.functional.interpolate(digits[:, None], size=32, mode="bilinear").expand(-1, 3, -1, -1)
    text = torch.randint(3, 500, (2, 11), generator=torch.Generator().manual_seed(0))
    pad = torch.arange(11)[None, :] >= torch.tensor([11, 6])[:, None]
    results = []
    for model in tiny_models:
        model.zero_grad(set_to_none=True)
        out = model(images=images, text_ids=text, text_padding_mask=pad, causal_text=causal_text)
        out.hidden.square().mean().backward()
        results.append((out.hidden.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (h_math, g_math), (h_tri, g_tri) = results
    torch.testing.assert_close(h_tri, h_math, atol=2e-5, rtol=1e-4)
    assert g_math.keys() == g_tri.keys()
    for name in g_math:
        torch.testing.assert_close(g_tri[name], g_math[name], atol=1e-5, rtol=1e-3, msg=name)


def test_bench_script_runs(capsys, monkeypatch):
    """``bench/attention.py`` end to end on CPU: the correctness-only mode (interpreter), a table
    of errors against the fp32 reference with the ratio to SDPA and math in fp16; and the
    timing mode refuses to run without CUDA, with a message saying what to run instead."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "attention.py"
    spec = importlib.util.spec_from_file_location("bench_attention", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)
    spec.loader.exec_module(bench)
    bench.main(["--device", "cpu", "--batch", "2", "--heads", "1", "--cases", "text"])
    out = capsys.readouterr().out
    rows = {cells[4]: cells for line in out.splitlines()
            if (cells := [c.strip() for c in line.split("|")])[1:2] == ["text"]}
    assert set(rows) == {"ours", "sdpa fp16", "math fp16"}, out
    assert float(rows["ours"][9]) == 1.0 and float(rows["sdpa fp16"][9]) <= 2.0, out
    assert all(0 < float(x) < 1e-2 for x in rows["ours"][5:9]), out
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA GPU.*--device cpu"):
            bench.main([])


# ---- GPU only: bf16, real tile sizes, large shapes --------------------------------------------
GPU_LENGTHS = [1, 63, 64, 65, 197, 261, 325, 384]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("D", [64, 88, 128])
@pytest.mark.parametrize("N", GPU_LENGTHS)
@pytest.mark.parametrize("mask", ["full", "padding", "prefix0", "prefix197", "prefix_full_padded"])
def test_gpu_against_reference(dtype, D, N, mask):
    B = 4
    valid = prefix = None
    if mask in ("padding", "prefix_full_padded"):
        valid = torch.tensor([N, max(1, N - 40), N // 2, 0])  # the last sample: all rows fully masked
    if mask == "prefix0":
        prefix = 0
    elif mask == "prefix197":
        prefix = 197
    elif mask == "prefix_full_padded":
        prefix = N
    if valid is not None:
        valid = valid.cuda()
    check_against_reference(B, N, 12, D, dtype, valid, prefix, device="cuda")


@pytest.mark.gpu
def test_gpu_base_shape_fp32_and_dispatch():
    """A base-sized batch through ``attention(backend="triton")`` (``auto`` is sdpa, see model/attention.py)."""
    q, k, v = views(fused_qkv(8, 261, 12, 64, torch.bfloat16, "cuda"))
    kpm = padding_mask(torch.randint(200, 262, (8,)), 8, 261, "cuda")
    assert resolve_backend("auto", q.device, dense_mask=False) == "sdpa"
    assert plan(q, k, v, key_padding_mask=kpm)[0] is None
    o = attention(q, k, v, key_padding_mask=kpm, prefix_len=197, backend="triton")
    r = math_attention(q.float(), k.float(), v.float(), key_padding_mask=kpm, prefix_len=197)
    assert (o.float() - r).abs().max().item() < 2e-2
    check_against_reference(2, 261, 12, 64, torch.float32, torch.tensor([261, 230]).cuda(), 197, device="cuda")


@pytest.mark.gpu
def test_gpu_whole_model_bf16():
    model = BEiT3(get_config("base", attn_backend="triton", depth=2)).cuda().bfloat16()
    ref = BEiT3(get_config("base", attn_backend="math", depth=2)).cuda().bfloat16()
    ref.load_state_dict(model.state_dict())
    images = torch.randn(4, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    text = torch.randint(3, 1000, (4, 64), device="cuda")
    pad = torch.arange(64, device="cuda")[None, :] >= torch.tensor([64, 40, 10, 1], device="cuda")[:, None]
    a = model(images=images, text_ids=text, text_padding_mask=pad, causal_text=True).hidden.float()
    b = ref(images=images, text_ids=text, text_padding_mask=pad, causal_text=True).hidden.float()
    assert (a - b).abs().max().item() < 0.1 * b.abs().max().item()


def test_kernel_is_a_custom_op_that_compiles_without_graph_breaks():
    """``flash_attention`` is ``torch.ops.beit3.flash_attention_fwd`` (+ ``_bwd`` through autograd):
    dynamo traces it as one op, no graph break, and the compiled values and grads equal eager."""
    import torch._dynamo

    qkv = fused_qkv(2, 20, 2, 16, torch.float32)
    valid = torch.tensor([20, 9])

    def fn(x):
        q, k, v = views(x)
        return flash_attention(q, k, v, valid_len=valid, prefix_len=4, config=T16)

    explain = torch._dynamo.explain(fn)(qkv)
    assert explain.graph_break_count == 0, explain.break_reasons
    assert "beit3.flash_attention_fwd" in str(explain.graphs[0].graph)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    o = compiled(qkv)
    (g,) = torch.autograd.grad(o.sum(), qkv)
    o_ref = fn(qkv)
    (g_ref,) = torch.autograd.grad(o_ref.sum(), qkv)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(g, g_ref)
    torch._dynamo.reset()
