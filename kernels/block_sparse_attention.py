"""Fused block-sparse flash-attention forwards over a BlockLayout.

One program computes one query block of one (batch, head). Query blocks come in two kinds:

- visual query blocks visit the layout's full key blocks (no element mask), then its partial
  key blocks (pattern mask computed in the kernel, plus sequence bounds), then every text key
  block (dense);
- text query blocks (and every block of a Dense pattern) visit all keys of the sequence.

Text keys may be padded per batch row (HunyuanVideo): with ``HAS_TEXT_LENS`` only the first
``TextLens[b]`` text tokens are attended; the padding is a suffix of the text segment.

``block_sparse_attn_fwd_kernel`` computes the pattern's attention. With ``EXTERNAL`` it computes
the complement instead: visual queries over the visual keys the pattern does not attend (from
the pattern's own layout: the key blocks in neither list, and the window mask inverted inside
its partial blocks) and no text keys; the launcher runs no text query blocks.

``block_sparse_partials_fwd_kernel`` computes both partials in one pass: each visual query
block walks every visual key block once and keeps two online softmaxes, the *internal* one
(the pattern's keys and the text keys) and the *external* one (every other visual key). Keys of
a partial block that the window mask rejects go to the external softmax, so the score tile is
computed once. Merged through their log-sum-exps the two partials give dense attention exactly.

Online softmax in base 2 with a running max; outputs ``out`` and the natural-log ``lse`` (a row
with no key gets out 0 and lse -inf). Tensors are ``[B, S, H, D]`` with a unit stride on D.

Non-finite inputs (the semantics of ``diffattn.masked_attention_reference``): a NaN or +inf
score of an attended key makes the row NaN (``p`` is NaN there, whatever ``tl.max`` does with a
NaN); masked scores are replaced by -inf before use, so a masked-out NaN key never leaks in; a
key block whose scores are all -inf for a row adds nothing (as SDPA), and a row with nothing
else gets out 0 and lse -inf. Key blocks are never read past the segment they belong to (the
visual tokens, or the attended text), so keys outside it contribute exact zeros. One place where
masking cannot keep a value out: in a window's partial block a masked key has ``p == 0``, and a
NaN / inf in its value reaches that block's other rows through ``p @ v`` (``0 * NaN``). Those
rows become NaN although they do not attend the key (torch's SDPA with a boolean mask does the
same, for every row); no row is ever silently finite. The hot loop has no extra work for this.
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
def _window_starts(q_loc, grid_h, grid_w, n_f, k_f, s_f, r_f, n_h, k_h, s_h, r_h, n_w, k_w, s_w, r_w):
    """Window (group, start) per axis of the visual queries ``q_loc`` [BM], once per query block."""
    g_f, st_f = _axis_window_start(q_loc // (grid_h * grid_w), n_f, k_f, s_f, r_f)
    g_h, st_h = _axis_window_start((q_loc // grid_w) % grid_h, n_h, k_h, s_h, r_h)
    g_w, st_w = _axis_window_start(q_loc % grid_w, n_w, k_w, s_w, r_w)
    return g_f, st_f, g_h, st_h, g_w, st_w


@triton.jit
def _window_inside(g_f, st_f, g_h, st_h, g_w, st_w, k_loc, Coords, n_vis, grid_h, grid_w, k_f, r_f, k_h, r_h, k_w, r_w,
                   DILATED: tl.constexpr, PACKED_COORDS: tl.constexpr):
    """Visual keys ``k_loc`` [BN] inside the windows of the query block -> [BM, BN]."""
    if PACKED_COORDS:  # one load instead of three run-time divisions per key
        packed = tl.load(Coords + k_loc, mask=k_loc < n_vis, other=0)  # [BN]
        kf = packed >> 20
        kh = (packed >> 10) & 1023
        kw = packed & 1023
    else:
        kf = k_loc // (grid_h * grid_w)
        kh = (k_loc // grid_w) % grid_h
        kw = k_loc % grid_w
    inside = _axis_inside(g_f, st_f, kf, k_f, r_f, DILATED)
    inside = inside & _axis_inside(g_h, st_h, kh, k_h, r_h, DILATED)
    return inside & _axis_inside(g_w, st_w, kw, k_w, r_w, DILATED)


@triton.jit
def _load_kv(k_ptrs, v_ptrs, offs_d, start_n, seq_len,
             stride_ks, stride_vs,
             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
             MASKED: tl.constexpr, UPCAST: tl.constexpr):
    """Key block ``[BD, BN]`` and value block ``[BN, BD]`` starting at key ``start_n``.

    Offsets from this (batch, head)'s base pointers are 32-bit: the launchers check that
    ``S * stride`` of k and v stays below 2^31. 64-bit per-element offsets cost registers (the
    Piecewise kernel spilled with them)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if MASKED:  # the block may run past the sequence: never read there (garbage * 0 is NaN)
        in_seq = offs_n < seq_len
        k = tl.load(k_ptrs + offs_n[None, :] * stride_ks,
                    mask=in_seq[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)  # [BD, BN]
        v = tl.load(v_ptrs + offs_n[:, None] * stride_vs,
                    mask=in_seq[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)  # [BN, BD]
    elif BLOCK_D == HEAD_DIM:
        k = tl.load(k_ptrs + offs_n[None, :] * stride_ks)  # [BD, BN]
        v = tl.load(v_ptrs + offs_n[:, None] * stride_vs)  # [BN, BD]
    else:
        k = tl.load(k_ptrs + offs_n[None, :] * stride_ks, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
        v = tl.load(v_ptrs + offs_n[:, None] * stride_vs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


@triton.jit
def _softmax_update(acc, l_i, m_i, qk, v, key_mask, qk_scale, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold the scores ``qk`` [BM, BN] and values ``v`` [BN, BD] into one online softmax;
    ``key_mask`` [BM, BN] is used when MASKED."""
    if MASKED:
        qk = tl.where(key_mask, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows whose scores are all -inf so far
    p = tl.math.exp2(qk * qk_scale - m_use[:, None])  # [BM, BN]
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)  # [BM, BD]
    return acc, l_i, m_new


@triton.jit
def _attend_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, offs_d, start_n, key_mask, seq_len,
                  stride_ks, stride_vs, qk_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                  MASKED: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One key block of the online softmax. ``key_mask`` [BM, BN] is used when MASKED."""
    k, v = _load_kv(k_ptrs, v_ptrs, offs_d, start_n, seq_len, stride_ks, stride_vs,
                    HEAD_DIM, BLOCK_D, BLOCK_N, MASKED, UPCAST)
    qk = tl.dot(q, k, input_precision=DOT_PRECISION)  # [BM, BN]
    return _softmax_update(acc, l_i, m_i, qk, v, key_mask, qk_scale, MASKED, DOT_PRECISION)


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
def _attend_listed_blocks(acc, l_i, m_i, q, k_ptrs, v_ptrs, offs_d, num_ptr, idx_ptr, vis_start, seq_len,
                          stride_ks, stride_vs, qk_scale,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Whole visual key blocks listed at ``idx_ptr`` (``num_ptr`` of them), no element mask."""
    no_mask = tl.full((BLOCK_M, BLOCK_N), 1, tl.int1)
    for i in range(tl.load(num_ptr)):
        start = tl.load(idx_ptr + i) * BLOCK_N
        acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, offs_d, vis_start + start, no_mask, seq_len,
                                      stride_ks, stride_vs, qk_scale,
                                      HEAD_DIM, BLOCK_D, BLOCK_N, False, UPCAST, DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def _attend_unlisted_blocks(acc, l_i, m_i, q, k_ptrs, v_ptrs, offs_d, full_num, full_idx_ptr, part_num, part_idx_ptr,
                            vis_start, n_vis, seq_len, stride_ks, stride_vs, qk_scale,
                            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The visual key blocks in neither ascending list (``full_num`` / ``part_num`` entries at
    ``full_idx_ptr`` / ``part_idx_ptr``): the complement of a layout, walked here so that no
    complement layout (O(NQ x NK) entries) is ever built. The short last block is bounds-masked."""
    n_blocks = tl.cdiv(n_vis, BLOCK_N)
    n_whole = n_vis // BLOCK_N
    next_full = tl.load(full_idx_ptr, mask=full_num > 0, other=n_blocks)
    next_part = tl.load(part_idx_ptr, mask=part_num > 0, other=n_blocks)
    fi = 0
    pi = 0
    no_mask = tl.full((BLOCK_M, BLOCK_N), 1, tl.int1)
    for j in range(n_whole):
        if j == next_full:
            fi += 1
            next_full = tl.load(full_idx_ptr + fi, mask=fi < full_num, other=n_blocks)
        elif j == next_part:
            pi += 1
            next_part = tl.load(part_idx_ptr + pi, mask=pi < part_num, other=n_blocks)
        else:
            acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, offs_d, vis_start + j * BLOCK_N, no_mask,
                                          seq_len, stride_ks, stride_vs, qk_scale,
                                          HEAD_DIM, BLOCK_D, BLOCK_N, False, UPCAST, DOT_PRECISION)
    if (n_whole < n_blocks) & (next_full != n_whole) & (next_part != n_whole):
        start = n_whole * BLOCK_N
        in_seq = tl.broadcast_to(((start + tl.arange(0, BLOCK_N)) < n_vis)[None, :], (BLOCK_M, BLOCK_N))
        acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, offs_d, vis_start + start, in_seq,
                                      vis_start + n_vis, stride_ks, stride_vs, qk_scale,
                                      HEAD_DIM, BLOCK_D, BLOCK_N, True, UPCAST, DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def _attend_all_keys(acc, l_i, m_i, q, k_ptrs, v_ptrs, offs_d, text_stop, text_end, seq_len,
                     stride_ks, stride_vs, qk_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     HAS_TEXT_LENS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """A dense row (text query, or any query of a Dense pattern): every key but the text
    padding ``[text_stop, text_end)``."""
    if HAS_TEXT_LENS:
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
    return acc, l_i, m_i


@triton.jit
def _query_block(Q, K, V, TextLens, pid_m, pid_bh, num_heads, vis_start, n_vis, dense_start, dense_len,
                 text_start, text_len, n_vis_q_blocks,
                 stride_qb, stride_qs, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                 HAS_TEXT_LENS: tl.constexpr, UPCAST: tl.constexpr):
    """The program's rows and operands: (b, h, is_visual, q_loc, rows, row_valid, q [BM, BD],
    k_ptrs [BD, 1], v_ptrs [1, BD], offs_d, text_stop, text_end). Visual blocks come first
    (``q_loc`` visual-local), then the dense rows (``q_loc`` local to ``dense_start``)."""
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    is_visual = pid_m < n_vis_q_blocks
    if is_visual:
        q_loc = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_valid = q_loc < n_vis
        rows = vis_start + q_loc
    else:
        q_loc = (pid_m - n_vis_q_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_valid = q_loc < dense_len
        rows = dense_start + q_loc
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = (Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
              + rows[:, None].to(tl.int64) * stride_qs + offs_d[None, :])
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
    return b, h, is_visual, q_loc, rows, row_valid, q, k_ptrs, v_ptrs, offs_d, text_stop, text_end


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
    b, h, is_visual, q_loc, rows, row_valid, q, k_ptrs, v_ptrs, offs_d, text_stop, text_end = _query_block(
        Q, K, V, TextLens, pid_m, tl.program_id(1), num_heads, vis_start, n_vis, dense_start, dense_len,
        text_start, text_len, n_vis_q_blocks,
        stride_qb, stride_qs, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
        HEAD_DIM, BLOCK_D, BLOCK_M, HAS_TEXT_LENS, UPCAST)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)

    if is_visual:
        if MASK_KIND == 1:  # window starts of this block's queries, once for all key blocks
            g_f, st_f, g_h, st_h, g_w, st_w = _window_starts(q_loc, grid_h, grid_w, n_f, k_f, s_f, r_f,
                                                             n_h, k_h, s_h, r_h, n_w, k_w, s_w, r_w)
        fn_ptr = FullNum + b * stride_fnb + h * stride_fnh + pid_m * stride_fnm
        fi_ptr = FullIdx + b * stride_fib + h * stride_fih + pid_m * stride_fim
        pn_ptr = PartNum + b * stride_pnb + h * stride_pnh + pid_m * stride_pnm
        pi_ptr = PartIdx + b * stride_pib + h * stride_pih + pid_m * stride_pim
        if EXTERNAL:  # the blocks the layout does not list; its full blocks are wholly internal
            acc, l_i, m_i = _attend_unlisted_blocks(acc, l_i, m_i, q, k_ptrs, v_ptrs, offs_d, tl.load(fn_ptr), fi_ptr,
                                                    tl.load(pn_ptr), pi_ptr, vis_start, n_vis, seq_len,
                                                    stride_ks, stride_vs, qk_scale,
                                                    HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, UPCAST, DOT_PRECISION)
        else:
            acc, l_i, m_i = _attend_listed_blocks(acc, l_i, m_i, q, k_ptrs, v_ptrs, offs_d, fn_ptr, fi_ptr,
                                                  vis_start, seq_len, stride_ks, stride_vs, qk_scale,
                                                  HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, UPCAST, DOT_PRECISION)
        # partial blocks: the window mask inside them (inverted for EXTERNAL); block-granular
        # patterns' partial blocks are bounds-masked only, wholly internal
        n_partial = tl.load(pn_ptr) if (MASK_KIND == 1 or not EXTERNAL) else 0
        for i in range(n_partial):
            start = tl.load(pi_ptr + i) * BLOCK_N
            k_loc = start + tl.arange(0, BLOCK_N)
            key_mask = tl.broadcast_to((k_loc < n_vis)[None, :], (BLOCK_M, BLOCK_N))
            if MASK_KIND == 1:
                inside = _window_inside(g_f, st_f, g_h, st_h, g_w, st_w, k_loc, Coords, n_vis, grid_h, grid_w,
                                        k_f, r_f, k_h, r_h, k_w, r_w, DILATED, PACKED_COORDS)
                if EXTERNAL:  # the keys outside the window
                    key_mask = key_mask & (inside == 0)
                else:
                    key_mask = key_mask & inside
            # never read past the visual keys (text keys there may be padding)
            k, v = _load_kv(k_ptrs, v_ptrs, offs_d, vis_start + start, vis_start + n_vis, stride_ks, stride_vs,
                            HEAD_DIM, BLOCK_D, BLOCK_N, True, UPCAST)
            qk = tl.dot(q, k, input_precision=DOT_PRECISION)  # [BM, BN]
            acc, l_i, m_i = _softmax_update(acc, l_i, m_i, qk, v, key_mask, qk_scale, True, DOT_PRECISION)
        if not EXTERNAL:  # text keys are always internal
            acc, l_i, m_i = _attend_range(acc, l_i, m_i, q, k_ptrs, v_ptrs, offs_d, text_start, text_stop,
                                          stride_ks, stride_vs, qk_scale,
                                          HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, UPCAST, DOT_PRECISION)
    else:
        acc, l_i, m_i = _attend_all_keys(acc, l_i, m_i, q, k_ptrs, v_ptrs, offs_d, text_stop, text_end, seq_len,
                                         stride_ks, stride_vs, qk_scale,
                                         HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, HAS_TEXT_LENS, UPCAST, DOT_PRECISION)

    _store_rows(Out, Lse, acc, l_i, m_i, b, h, rows, row_valid, offs_d,
                stride_ob, stride_os, stride_oh, stride_lb, stride_ls, stride_lh, HEAD_DIM)


@triton.jit
def block_sparse_partials_fwd_kernel(
    Q, K, V, OutIn, LseIn, OutEx, LseEx,
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
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Internal and external partials in one pass over the key blocks.

    The layout (FullNum .. PartIdx, ascending lists) holds the pattern's key blocks; every other
    visual key block is wholly external and is found by walking the lists
    (``_attend_unlisted_blocks``), so no external layout exists. Out and Lse of both partials
    share strides.
    """
    pid_m = tl.program_id(0)
    b, h, is_visual, q_loc, rows, row_valid, q, k_ptrs, v_ptrs, offs_d, text_stop, text_end = _query_block(
        Q, K, V, TextLens, pid_m, tl.program_id(1), num_heads, vis_start, n_vis, dense_start, dense_len,
        text_start, text_len, n_vis_q_blocks,
        stride_qb, stride_qs, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
        HEAD_DIM, BLOCK_D, BLOCK_M, HAS_TEXT_LENS, UPCAST)

    m_in = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_in = tl.zeros((BLOCK_M,), tl.float32)
    acc_in = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    m_ex = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_ex = tl.zeros((BLOCK_M,), tl.float32)
    acc_ex = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)

    if is_visual:
        if MASK_KIND == 1:
            g_f, st_f, g_h, st_h, g_w, st_w = _window_starts(q_loc, grid_h, grid_w, n_f, k_f, s_f, r_f,
                                                             n_h, k_h, s_h, r_h, n_w, k_w, s_w, r_w)
        # the pattern's full blocks: internal only
        acc_in, l_in, m_in = _attend_listed_blocks(acc_in, l_in, m_in, q, k_ptrs, v_ptrs, offs_d,
                                                   FullNum + b * stride_fnb + h * stride_fnh + pid_m * stride_fnm,
                                                   FullIdx + b * stride_fib + h * stride_fih + pid_m * stride_fim,
                                                   vis_start, seq_len, stride_ks, stride_vs, qk_scale,
                                                   HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, UPCAST, DOT_PRECISION)
        # the pattern's partial blocks: one score tile, split by the window mask. Block-granular
        # patterns (MASK_KIND 0) have at most one, the short last key block: no loop, so that the
        # two accumulators' register pressure never spills inside a loop
        pn_ptr = PartNum + b * stride_pnb + h * stride_pnh + pid_m * stride_pnm
        pi_ptr = PartIdx + b * stride_pib + h * stride_pih + pid_m * stride_pim
        n_partial = tl.load(pn_ptr) if MASK_KIND == 1 else tl.minimum(tl.load(pn_ptr), 1)
        for i in range(n_partial):
            start = tl.load(pi_ptr + i) * BLOCK_N
            k_loc = start + tl.arange(0, BLOCK_N)
            in_seq = tl.broadcast_to((k_loc < n_vis)[None, :], (BLOCK_M, BLOCK_N))
            k, v = _load_kv(k_ptrs, v_ptrs, offs_d, vis_start + start, vis_start + n_vis, stride_ks, stride_vs,
                            HEAD_DIM, BLOCK_D, BLOCK_N, True, UPCAST)
            qk = tl.dot(q, k, input_precision=DOT_PRECISION)  # [BM, BN]
            if MASK_KIND == 1:
                inside = _window_inside(g_f, st_f, g_h, st_h, g_w, st_w, k_loc, Coords, n_vis, grid_h, grid_w,
                                        k_f, r_f, k_h, r_h, k_w, r_w, DILATED, PACKED_COORDS)
                acc_in, l_in, m_in = _softmax_update(acc_in, l_in, m_in, qk, v, in_seq & inside, qk_scale, True, DOT_PRECISION)
                acc_ex, l_ex, m_ex = _softmax_update(acc_ex, l_ex, m_ex, qk, v, in_seq & (inside == 0), qk_scale,
                                                     True, DOT_PRECISION)
            else:  # block-granular patterns: partial only through the sequence bounds
                acc_in, l_in, m_in = _softmax_update(acc_in, l_in, m_in, qk, v, in_seq, qk_scale, True, DOT_PRECISION)
        # the blocks outside the pattern (in neither list): external only
        acc_ex, l_ex, m_ex = _attend_unlisted_blocks(acc_ex, l_ex, m_ex, q, k_ptrs, v_ptrs, offs_d,
                                                     tl.load(FullNum + b * stride_fnb + h * stride_fnh + pid_m * stride_fnm),
                                                     FullIdx + b * stride_fib + h * stride_fih + pid_m * stride_fim,
                                                     tl.load(pn_ptr), pi_ptr, vis_start, n_vis, seq_len,
                                                     stride_ks, stride_vs, qk_scale,
                                                     HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, UPCAST, DOT_PRECISION)
        # text keys are always internal
        acc_in, l_in, m_in = _attend_range(acc_in, l_in, m_in, q, k_ptrs, v_ptrs, offs_d, text_start, text_stop,
                                           stride_ks, stride_vs, qk_scale,
                                           HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, UPCAST, DOT_PRECISION)
    else:  # dense rows have no external keys: their external partial stays empty
        acc_in, l_in, m_in = _attend_all_keys(acc_in, l_in, m_in, q, k_ptrs, v_ptrs, offs_d, text_stop, text_end, seq_len,
                                              stride_ks, stride_vs, qk_scale,
                                              HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, HAS_TEXT_LENS, UPCAST, DOT_PRECISION)

    _store_rows(OutIn, LseIn, acc_in, l_in, m_in, b, h, rows, row_valid, offs_d,
                stride_ob, stride_os, stride_oh, stride_lb, stride_ls, stride_lh, HEAD_DIM)
    _store_rows(OutEx, LseEx, acc_ex, l_ex, m_ex, b, h, rows, row_valid, offs_d,
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
