"""Triton kernels of the masked flash attention (forward, backward preprocess, dK/dV, dQ).

Loaded through ``flash_attention._kernels`` (once compiled for CUDA, once under Triton's
interpreter), never imported directly. Layout: every tensor is ``[B, H, N, Dh]`` addressed
through its four strides, so q/k/v may be views of the fused qkv projection. The mask is
computed from indices: query ``i`` sees key ``j`` iff ``j < VALID[b]`` (suffix padding) and
(``j < PREFIX[b]`` or ``j <= i``) (captioning prefix-causal; ``PREFIX = N_K`` is full
attention). Softmax runs in base 2: ``LSE`` holds ``log2(sum(exp2(s * scale * log2 e)))``
per query row, ``+inf`` for a row with no visible key (so its probabilities are 0).
Each kernel splits its loop into blocks the mask leaves whole (no mask arithmetic) and
blocks it cuts (masked); blocks it removes entirely are never visited. The backward is
deterministic: dK/dV and dQ are separate kernels, no atomics.
"""
import triton
import triton.language as tl

# Only builtins and these stdlib combine functions are used: ``tl.zeros``/``tl.max``/``tl.sum``
# are themselves jit functions of triton.language, compiled or interpreted depending on the
# environment when *triton* was imported; the interpreter recognises these combine functions.
_MAX = tl.standard._elementwise_max
_SUM = tl.standard._sum_combine


@triton.jit
def _row_max(x):
    return tl.reduce(x, 1, _MAX)


@triton.jit
def _row_sum(x):
    return tl.reduce(x, 1, _SUM)


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
               offs_m, offs_d, lo, hi, valid_len, prefix, qk_scale,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
               MASKED: tl.constexpr, PRECISION: tl.constexpr):
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd  # [BN, BD]
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd  # [BN, BD]
        if MASKED:
            ld = (offs_n[:, None] < valid_len) & d_ok[None, :]
            k = tl.load(k_ptrs, mask=ld, other=0.0)
            v = tl.load(v_ptrs, mask=ld, other=0.0)
        elif EVEN_D:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BM, BN], log2 units
        if MASKED:
            keep = (offs_n[None, :] < valid_len) & ((offs_n[None, :] < prefix) | (offs_n[None, :] <= offs_m[:, None]))
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, _row_max(s))
        if MASKED:  # a row may still have seen nothing: keep exp2 away from -inf - -inf
            m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new_safe = m_new
        p = tl.math.exp2(s - m_new_safe[:, None])
        alpha = tl.math.exp2(m_i - m_new_safe)
        l_i = l_i * alpha + _row_sum(p)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def attn_fwd(Q, K, V, O, LSE, VALID, PREFIX, sm_scale,
             stride_qb, stride_qh, stride_qn, stride_qd,
             stride_kb, stride_kh, stride_kn, stride_kd,
             stride_vb, stride_vh, stride_vn, stride_vd,
             stride_ob, stride_oh, stride_on, stride_od,
             H, N_Q, N_K,
             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    valid_len = tl.load(VALID + b)
    prefix = tl.load(PREFIX + b)
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    row_ok = offs_m < N_Q
    io_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask=io_mask, other=0.0)
    qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)
    # keys [0, full_end) are visible to every row of this block; [full_end, hi) to some
    hi = tl.minimum(valid_len, tl.maximum(prefix, start_m + BLOCK_M))
    full_end = tl.minimum(valid_len, tl.maximum(prefix, start_m + 1)) // BLOCK_N * BLOCK_N
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                               offs_m, offs_d, 0, full_end, valid_len, prefix, qk_scale,
                               BLOCK_N, HEAD_DIM, EVEN_D, False, PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                               offs_m, offs_d, full_end, hi, valid_len, prefix, qk_scale,
                               BLOCK_N, HEAD_DIM, EVEN_D, True, PRECISION)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od, acc.to(O.dtype.element_ty),
             mask=io_mask)
    tl.store(LSE + bh.to(tl.int64) * N_Q + offs_m, lse, mask=row_ok)


@triton.jit
def attn_bwd_preprocess(O, DO, DELTA,
                        stride_ob, stride_oh, stride_on, stride_od,
                        stride_dob, stride_doh, stride_don, stride_dod,
                        H, N_Q,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """DELTA[b, h, i] = sum_d O * dO (the softmax-backward row term)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < N_Q) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od, mask=mask, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                 + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod, mask=mask, other=0.0)
    delta = _row_sum(o.to(tl.float32) * do.to(tl.float32))
    tl.store(DELTA + bh.to(tl.int64) * N_Q + offs_m, delta, mask=offs_m < N_Q)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                    stride_qn, stride_qd, stride_don, stride_dod,
                    offs_n, offs_d, lo, hi, N_Q, valid_len, prefix, qk_scale,
                    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
                    MASKED: tl.constexpr, PRECISION: tl.constexpr):
    d_ok = offs_d < HEAD_DIM
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_ptrs = q_base + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
        do_ptrs = do_base + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod
        if MASKED:
            m_ok = offs_m < N_Q
            q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            do = tl.load(do_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            lse = tl.load(lse_base + offs_m, mask=m_ok, other=float("inf"))
            delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
        else:
            if EVEN_D:
                q = tl.load(q_ptrs)
                do = tl.load(do_ptrs)
            else:
                q = tl.load(q_ptrs, mask=d_ok[None, :], other=0.0)
                do = tl.load(do_ptrs, mask=d_ok[None, :], other=0.0)
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        sT = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # [BN, BM]
        pT = tl.math.exp2(sT - lse[None, :])
        if MASKED:
            keep = (offs_n[:, None] < valid_len) & ((offs_n[:, None] < prefix) | (offs_n[:, None] <= offs_m[None, :]))
            pT = tl.where(keep, pT, 0.0)
        dv += tl.dot(pT.to(do.dtype), do, input_precision=PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # [BN, BM]
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, VALID, PREFIX, sm_scale,
                  stride_qb, stride_qh, stride_qn, stride_qd,
                  stride_kb, stride_kh, stride_kn, stride_kd,
                  stride_vb, stride_vh, stride_vn, stride_vd,
                  stride_dob, stride_doh, stride_don, stride_dod,
                  stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                  stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                  H, N_Q, N_K,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """One key block per program; loops over the query blocks that can see it."""
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    valid_len = tl.load(VALID + b)
    prefix = tl.load(PREFIX + b)
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n[:, None] < N_K) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
                + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    v = tl.load(V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
                + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
    lse_base = LSE + bh.to(tl.int64) * N_Q
    delta_base = DELTA + bh.to(tl.int64) * N_Q
    qk_scale = sm_scale * 1.4426950408889634
    dk = tl.full([BLOCK_N, BLOCK_D], 0.0, dtype=tl.float32)
    dv = tl.full([BLOCK_N, BLOCK_D], 0.0, dtype=tl.float32)
    # Query blocks [m_lo, N_Q) can see this key block: all of them when a key is in the
    # prefix, else those from the block holding query start_n on. A padded block: none.
    m_lo = tl.where(start_n < prefix, 0, start_n // BLOCK_M * BLOCK_M)
    m_lo = tl.where(start_n < valid_len, m_lo, N_Q)
    # Rows from full_from on see every key of the block (no padding cut, past the diagonal).
    full_from = tl.where(start_n + BLOCK_N <= prefix, m_lo,
                         tl.maximum(m_lo, (start_n + BLOCK_N - 1 + BLOCK_M - 1) // BLOCK_M * BLOCK_M))
    full_from = tl.where(start_n + BLOCK_N <= valid_len, full_from, N_Q)
    full_to = tl.maximum(full_from, N_Q // BLOCK_M * BLOCK_M)  # whole query blocks only
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                             stride_qn, stride_qd, stride_don, stride_dod, offs_n, offs_d,
                             m_lo, tl.minimum(full_from, N_Q), N_Q, valid_len, prefix, qk_scale,
                             BLOCK_M, HEAD_DIM, EVEN_D, True, PRECISION)
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                             stride_qn, stride_qd, stride_don, stride_dod, offs_n, offs_d,
                             full_from, full_to, N_Q, valid_len, prefix, qk_scale,
                             BLOCK_M, HEAD_DIM, EVEN_D, False, PRECISION)
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                             stride_qn, stride_qd, stride_don, stride_dod, offs_n, offs_d,
                             full_to, N_Q, N_Q, valid_len, prefix, qk_scale,
                             BLOCK_M, HEAD_DIM, EVEN_D, True, PRECISION)
    dk = dk * sm_scale
    tl.store(DK + b.to(tl.int64) * stride_dkb + h.to(tl.int64) * stride_dkh
             + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b.to(tl.int64) * stride_dvb + h.to(tl.int64) * stride_dvh
             + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                  offs_m, offs_d, lo, hi, valid_len, prefix, qk_scale,
                  BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
                  MASKED: tl.constexpr, PRECISION: tl.constexpr):
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
        if MASKED:
            ld = (offs_n[:, None] < valid_len) & d_ok[None, :]
            k = tl.load(k_ptrs, mask=ld, other=0.0)
            v = tl.load(v_ptrs, mask=ld, other=0.0)
        elif EVEN_D:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BM, BN]
        p = tl.math.exp2(s - lse[:, None])
        if MASKED:
            keep = (offs_n[None, :] < valid_len) & ((offs_n[None, :] < prefix) | (offs_n[None, :] <= offs_m[:, None]))
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # [BM, BN]
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit
def attn_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, VALID, PREFIX, sm_scale,
                stride_qb, stride_qh, stride_qn, stride_qd,
                stride_kb, stride_kh, stride_kn, stride_kd,
                stride_vb, stride_vh, stride_vn, stride_vd,
                stride_dob, stride_doh, stride_don, stride_dod,
                stride_dqb, stride_dqh, stride_dqn, stride_dqd,
                H, N_Q, N_K,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """One query block per program; loops over the key blocks it can see (as the forward)."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    valid_len = tl.load(VALID + b)
    prefix = tl.load(PREFIX + b)
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N_Q
    io_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask=io_mask, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                 + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod, mask=io_mask, other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * N_Q + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * N_Q + offs_m, mask=row_ok, other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)
    hi = tl.minimum(valid_len, tl.maximum(prefix, start_m + BLOCK_M))
    full_end = tl.minimum(valid_len, tl.maximum(prefix, start_m + 1)) // BLOCK_N * BLOCK_N
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                       offs_m, offs_d, 0, full_end, valid_len, prefix, qk_scale,
                       BLOCK_N, HEAD_DIM, EVEN_D, False, PRECISION)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                       offs_m, offs_d, full_end, hi, valid_len, prefix, qk_scale,
                       BLOCK_N, HEAD_DIM, EVEN_D, True, PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
             + offs_m[:, None] * stride_dqn + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), mask=io_mask)
