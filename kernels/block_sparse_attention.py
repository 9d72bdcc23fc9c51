"""Fused block-sparse flash-attention forward over a BlockLayout.

One program computes one query block of one (batch, head). Query blocks come in two kinds:

- visual query blocks visit the layout's full key blocks (no element mask), then its partial
  key blocks (pattern mask computed in the kernel, plus sequence bounds), then every text key
  block (dense);
- text query blocks (and every block of a Dense pattern) visit all keys of the sequence.

Text keys may be padded per batch row (HunyuanVideo): with ``HAS_TEXT_LENS`` only the first
``TextLens[b]`` text tokens are attended; the padding is a suffix of the text segment.

With ``EXTERNAL`` the kernel computes the complement: visual queries over the visual keys the
pattern does not attend (the layout is the complement layout; window masks are inverted inside
partial blocks) and no text keys; the launcher runs no text query blocks. Merged through the
log-sum-exp with the pattern's own (internal) partial, it gives dense attention exactly.

Online softmax in base 2 with a running max; returns ``out`` and the natural-log ``lse``.
Tensors are ``[B, S, H, D]`` with a unit stride on D.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _axis_window_start(qc, n, k, s, r):
    """NATTEN/GNA rule on one axis for query coords ``qc`` [BM]: (dilation group, window start
    in group coordinates)."""
    group = qc % r
    group_len = (n - group + r - 1) // r
    leader = tl.minimum(((qc // r) // s) * s + s // 2, group_len - 1)
    left = k // 2
    right = k // 2 + k % 2 - 1
    centre = tl.minimum(tl.maximum(leader, left), group_len - 1 - right)
    return group, centre - left


@triton.jit
def _axis_inside(group, start, kc, k, r, DILATED: tl.constexpr):
    """Keys ``kc`` [BN] inside the windows of queries (group, start) [BM] -> [BM, BN]."""
    if DILATED:
        kg = kc // r
        ok = (kc % r)[None, :] == group[:, None]
        return ok & ((kg[None, :] - start[:, None]).to(tl.uint32, bitcast=True) < k)
    return (kc[None, :] - start[:, None]).to(tl.uint32, bitcast=True) < k


@triton.jit
def _attend_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, offs_d, start_n, key_mask, seq_len,
                  stride_ks, stride_vs, qk_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                  MASKED: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One key block of the online softmax. ``key_mask`` [BM, BN] is used when MASKED."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if MASKED:  # the block may run past the sequence: never read there (garbage * 0 is NaN)
        in_seq = offs_n < seq_len
        k = tl.load(k_ptrs + offs_n[None, :].to(tl.int64) * stride_ks,
                    mask=in_seq[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)  # [BD, BN]
        v = tl.load(v_ptrs + offs_n[:, None].to(tl.int64) * stride_vs,
                    mask=in_seq[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)  # [BN, BD]
    elif BLOCK_D == HEAD_DIM:
        k = tl.load(k_ptrs + offs_n[None, :].to(tl.int64) * stride_ks)  # [BD, BN]
        v = tl.load(v_ptrs + offs_n[:, None].to(tl.int64) * stride_vs)  # [BN, BD]
    else:
        k = tl.load(k_ptrs + offs_n[None, :].to(tl.int64) * stride_ks, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
        v = tl.load(v_ptrs + offs_n[:, None].to(tl.int64) * stride_vs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    qk = tl.dot(q, k, input_precision=DOT_PRECISION)  # [BM, BN]
    if MASKED:
        qk = tl.where(key_mask, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing attended yet
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_use = m_new
    p = tl.math.exp2(qk * qk_scale - m_use[:, None])  # [BM, BN]
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)  # [BM, BD]
    return acc, l_i, m_new


@triton.jit
def _attend_range(acc, l_i, m_i, q, k_ptrs, v_ptrs, offs_d, lo, hi,
                  stride_ks, stride_vs, qk_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Dense keys [lo, hi): whole blocks unmasked, the short tail block masked."""
    n_whole = (hi - lo) // BLOCK_N
    no_mask = tl.full((BLOCK_M, BLOCK_N), 1, tl.int1)
    for i in range(n_whole):
        acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, offs_d, lo + i * BLOCK_N, no_mask, hi,
                                      stride_ks, stride_vs, qk_scale,
                                      HEAD_DIM, BLOCK_D, BLOCK_N, False, UPCAST, DOT_PRECISION)
    tail = lo + n_whole * BLOCK_N
    if tail < hi:
        in_range = (tail + tl.arange(0, BLOCK_N)) < hi
        key_mask = tl.broadcast_to(in_range[None, :], (BLOCK_M, BLOCK_N))
        acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, offs_d, tail, key_mask, hi,
                                      stride_ks, stride_vs, qk_scale,
                                      HEAD_DIM, BLOCK_D, BLOCK_N, True, UPCAST, DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def block_sparse_attn_fwd_kernel(
    Q, K, V, Out, Lse,
    FullNum, FullIdx, PartNum, PartIdx, Coords, TextLens,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_ls, stride_lh,
    stride_fnb, stride_fnh, stride_fnm,
    stride_fib, stride_fih, stride_fim,
    stride_pnb, stride_pnh, stride_pnm,
    stride_pib, stride_pih, stride_pim,
    num_heads, seq_len, vis_start, n_vis, dense_start, dense_len, text_start, text_len, n_vis_q_blocks,
    grid_h, grid_w,
    n_f, k_f, s_f, r_f, n_h, k_h, s_h, r_h, n_w, k_w, s_w, r_w,
    qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_KIND: tl.constexpr, DILATED: tl.constexpr, PACKED_COORDS: tl.constexpr, HAS_TEXT_LENS: tl.constexpr,
    EXTERNAL: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads

    is_visual = pid_m < n_vis_q_blocks
    if is_visual:
        q_loc = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # visual-local rows
        row_valid = q_loc < n_vis
        rows = vis_start + q_loc
    else:
        t_loc = (pid_m - n_vis_q_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_valid = t_loc < dense_len
        rows = dense_start + t_loc
        q_loc = t_loc

    offs_d = tl.arange(0, BLOCK_D)
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    q_ptrs = q_base + rows[:, None].to(tl.int64) * stride_qs + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_valid[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)  # [BM, BD]
    if UPCAST:
        q = q.to(tl.float32)
    k_ptrs = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh + offs_d[:, None]  # [BD, 1]
    v_ptrs = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh + offs_d[None, :]  # [1, BD]

    text_end = text_start + text_len  # text keys past text_stop are padding of this batch row
    if HAS_TEXT_LENS:
        text_stop = text_start + tl.minimum(tl.load(TextLens + b), text_len)
    else:
        text_stop = text_end

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)

    if is_visual:
        no_mask = tl.full((BLOCK_M, BLOCK_N), 1, tl.int1)
        if MASK_KIND == 1:  # window starts of this block's queries, once for all key blocks
            hw = grid_h * grid_w
            g_f, st_f = _axis_window_start(q_loc // hw, n_f, k_f, s_f, r_f)
            g_h, st_h = _axis_window_start((q_loc // grid_w) % grid_h, n_h, k_h, s_h, r_h)
            g_w, st_w = _axis_window_start(q_loc % grid_w, n_w, k_w, s_w, r_w)
        fn_ptr = FullNum + b * stride_fnb + h * stride_fnh + pid_m * stride_fnm
        fi_ptr = FullIdx + b * stride_fib + h * stride_fih + pid_m * stride_fim
        for i in range(tl.load(fn_ptr)):
            start = tl.load(fi_ptr + i) * BLOCK_N
            acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, offs_d, vis_start + start, no_mask, seq_len,
                                          stride_ks, stride_vs, qk_scale,
                                          HEAD_DIM, BLOCK_D, BLOCK_N, False, UPCAST, DOT_PRECISION)
        pn_ptr = PartNum + b * stride_pnb + h * stride_pnh + pid_m * stride_pnm
        pi_ptr = PartIdx + b * stride_pib + h * stride_pih + pid_m * stride_pim
        for i in range(tl.load(pn_ptr)):
            start = tl.load(pi_ptr + i) * BLOCK_N
            k_loc = start + tl.arange(0, BLOCK_N)
            key_mask = tl.broadcast_to((k_loc < n_vis)[None, :], (BLOCK_M, BLOCK_N))
            if MASK_KIND == 1:
                if PACKED_COORDS:  # one load instead of three run-time divisions per key
                    packed = tl.load(Coords + k_loc, mask=k_loc < n_vis, other=0)  # [BN]
                    kf = packed >> 20
                    kh = (packed >> 10) & 1023
                    kw = packed & 1023
                else:
                    kf = k_loc // hw
                    kh = (k_loc // grid_w) % grid_h
                    kw = k_loc % grid_w
                inside = _axis_inside(g_f, st_f, kf, k_f, r_f, DILATED)
                inside = inside & _axis_inside(g_h, st_h, kh, k_h, r_h, DILATED)
                inside = inside & _axis_inside(g_w, st_w, kw, k_w, r_w, DILATED)
                if EXTERNAL:  # the keys outside the window
                    key_mask = key_mask & (inside == 0)
                else:
                    key_mask = key_mask & inside
            acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, offs_d, vis_start + start, key_mask, seq_len,
                                          stride_ks, stride_vs, qk_scale,
                                          HEAD_DIM, BLOCK_D, BLOCK_N, True, UPCAST, DOT_PRECISION)
        if not EXTERNAL:  # text keys are always internal
            acc, l_i, m_i = _attend_range(acc, l_i, m_i, q, k_ptrs, v_ptrs, offs_d, text_start, text_stop,
                                          stride_ks, stride_vs, qk_scale,
                                          HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, UPCAST, DOT_PRECISION)
    elif HAS_TEXT_LENS:  # all keys but the padding [text_stop, text_end)
        acc, l_i, m_i = _attend_range(acc, l_i, m_i, q, k_ptrs, v_ptrs, offs_d, 0, text_stop,
                                      stride_ks, stride_vs, qk_scale,
                                      HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, UPCAST, DOT_PRECISION)
        acc, l_i, m_i = _attend_range(acc, l_i, m_i, q, k_ptrs, v_ptrs, offs_d, text_end, seq_len,
                                      stride_ks, stride_vs, qk_scale,
                                      HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, UPCAST, DOT_PRECISION)
    else:
        acc, l_i, m_i = _attend_range(acc, l_i, m_i, q, k_ptrs, v_ptrs, offs_d, 0, seq_len,
                                      stride_ks, stride_vs, qk_scale,
                                      HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, UPCAST, DOT_PRECISION)

    _store_rows(Out, Lse, acc, l_i, m_i, b, h, rows, row_valid, offs_d,
                stride_ob, stride_os, stride_oh, stride_lb, stride_ls, stride_lh, HEAD_DIM)


@triton.jit
def _store_rows(Out, Lse, acc, l_i, m_i, b, h, rows, row_valid, offs_d,
                stride_ob, stride_os, stride_oh, stride_lb, stride_ls, stride_lh, HEAD_DIM: tl.constexpr):
    """Normalise the accumulator and write out ``[BM, D]`` and the natural-log lse ``[BM]``."""
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) / 1.4426950408889634)
    o_ptrs = (Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
              + rows[:, None].to(tl.int64) * stride_os + offs_d[None, :])
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_valid[:, None] & (offs_d[None, :] < HEAD_DIM))
    l_ptrs = Lse + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + rows.to(tl.int64) * stride_ls
    tl.store(l_ptrs, lse, mask=row_valid)
