"""Piecewise attention forward: critical key blocks exact, every other block approximated by
its Taylor expansion around the block's mean key, in one pass with one running maximum.

One program computes one query block (= one selection block) of one (batch, head):

1. approximate part: for chunks of key blocks, ``a = exp(scale q . k̄_J)`` on the block means,
   masked to the non-critical blocks of this query block; numerator ``a @ V_J``, approximate
   denominator ``a @ |J|`` (tensor-core dots in q's dtype: the block means and value sums are
   rounded to it, like the keys and values themselves);
2. exact part: the critical blocks (the layout's full / partial lists, as in the block-sparse
   kernel) and the text keys;
3. first order: with ``LOWRANK``, inside step 1, per chunk of key blocks
   ``numerator += scale * ((a ⊗ 1_r) * (q @ U)) @ W^T`` with the blocks' ``H_J ~ U_J W_J^T``
   stacked as ``U [D, BJ * r]`` and ``W [BJ * r, D]`` (two extra dots per chunk:
   O(S * NK * r * d)). The pooled and shared terms ``scale * (l_approx / norm) * (q @ H)`` are
   added after the kernel (a batched matrix product in ``diffattn.attention``): with
   ``APPROX_SHARE`` the kernel writes each visual row's ``l_approx / l`` (``ApxShare``), which is
   all they need from it. Keeping the d x d matrix out of the kernel keeps its registers for the
   attention itself (the fused version spilled ~16 KB per thread at d = 128).

Exact and approximate denominators are kept apart (the approximate share needs the approximate
one) and both are rescaled whenever the running maximum moves. Text query blocks are dense.
With ``HAS_TEXT_LENS`` only the first ``TextLens[b]`` text keys of batch row ``b`` are attended
(visual and text queries alike); the rest of the text segment is padding.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .block_sparse_attention import _attend_block, _attend_range, _query_block, _store_rows


@triton.jit
def piecewise_attn_fwd_kernel(
    Q, K, V, Out, Lse, ApxShare,
    FullNum, FullIdx, PartNum, PartIdx, Keep, KMean, VSum, Size, LowU, LowW, TextLens,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_ls, stride_lh,
    stride_nb, stride_nh,  # FullNum / PartNum [B, H, NQ] (contiguous)
    stride_fib, stride_fih, stride_fim,
    stride_pib, stride_pih, stride_pim,
    stride_keb, stride_keh, stride_kem,  # Keep [B, H, NQ, NK] int8
    stride_mb, stride_mh,  # KMean / VSum [B, H, NK, D] (contiguous)
    stride_ub, stride_uh,  # LowU / LowW [B, H, NK, D, RANK] (contiguous)
    num_heads, seq_len, vis_start, n_vis, text_start, text_len, n_vis_q_blocks, n_k_blocks,
    qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_J: tl.constexpr, LOWRANK: tl.constexpr, APPROX_SHARE: tl.constexpr, RANK: tl.constexpr,
    RANK_P: tl.constexpr, HAS_TEXT_LENS: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    # text query blocks follow the visual ones (they are the dense rows)
    b, h, is_visual, q_loc, rows, row_valid, q, k_ptrs, v_ptrs, offs_d, text_stop, text_end = _query_block(
        Q, K, V, TextLens, pid_m, tl.program_id(1), num_heads, vis_start, n_vis, text_start, text_len,
        text_start, text_len, n_vis_q_blocks,
        stride_qb, stride_qs, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
        HEAD_DIM, BLOCK_D, BLOCK_M, HAS_TEXT_LENS, UPCAST)
    d_valid = offs_d < HEAD_DIM
    # text queries attend [0, text_stop), then [text_end, seq_len)
    dense_stop = text_stop if HAS_TEXT_LENS else seq_len

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)  # exact denominator
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)

    if is_visual:
        # 1. approximate part over the non-critical key blocks (block means)
        l_apx = tl.zeros((BLOCK_M,), tl.float32)
        keep_row = Keep + b * stride_keb + h * stride_keh + pid_m * stride_kem
        stat_off = b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
        for j0 in range(0, n_k_blocks, BLOCK_J):
            offs_j = j0 + tl.arange(0, BLOCK_J)
            j_valid = offs_j < n_k_blocks
            critical = tl.load(keep_row + offs_j, mask=j_valid, other=1)
            use = j_valid & (critical == 0)  # [BJ]
            km = tl.load(KMean + stat_off + offs_j[None, :] * HEAD_DIM + offs_d[:, None],
                         mask=j_valid[None, :] & d_valid[:, None], other=0.0).to(q.dtype)  # [BD, BJ]
            logits = tl.dot(q, km, input_precision=DOT_PRECISION) * qk_scale  # [BM, BJ]
            logits = tl.where(use[None, :], logits, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(logits, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m_i - m_use)
            p = tl.math.exp2(logits - m_use[:, None])  # [BM, BJ]
            vsum = tl.load(VSum + stat_off + offs_j[:, None] * HEAD_DIM + offs_d[None, :],
                           mask=j_valid[:, None] & d_valid[None, :], other=0.0).to(q.dtype)  # [BJ, BD]
            size = tl.load(Size + offs_j, mask=j_valid, other=0.0)  # [BJ]
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(q.dtype), vsum, acc, input_precision=DOT_PRECISION)
            if LOWRANK:
                acc = _lowrank_term(acc, p, q, LowU, LowW, b.to(tl.int64) * stride_ub + h.to(tl.int64) * stride_uh,
                                    j0, n_k_blocks, offs_d, d_valid, sm_scale,
                                    HEAD_DIM, BLOCK_M, BLOCK_J, RANK, RANK_P, DOT_PRECISION)
            l_apx = l_apx * alpha + tl.sum(p * size[None, :], 1)
            l_i = l_i * alpha
            m_i = m_new

        # 2. exact part: critical blocks, then text keys
        no_mask = tl.full((BLOCK_M, BLOCK_N), 1, tl.int1)
        fn = tl.load(FullNum + b * stride_nb + h * stride_nh + pid_m)
        fi_ptr = FullIdx + b * stride_fib + h * stride_fih + pid_m * stride_fim
        for i in range(fn):
            start = tl.load(fi_ptr + i) * BLOCK_N
            acc, l_i, m_i, l_apx = _rescaled_block(acc, l_i, m_i, l_apx, q, k_ptrs, v_ptrs, offs_d, vis_start + start,
                                                   no_mask, seq_len, stride_ks, stride_vs, qk_scale,
                                                   HEAD_DIM, BLOCK_D, BLOCK_N, False, UPCAST, DOT_PRECISION)
        pn = tl.load(PartNum + b * stride_nb + h * stride_nh + pid_m)
        pi_ptr = PartIdx + b * stride_pib + h * stride_pih + pid_m * stride_pim
        for i in range(pn):
            start = tl.load(pi_ptr + i) * BLOCK_N
            k_loc = start + tl.arange(0, BLOCK_N)
            key_mask = tl.broadcast_to((k_loc < n_vis)[None, :], (BLOCK_M, BLOCK_N))
            acc, l_i, m_i, l_apx = _rescaled_block(acc, l_i, m_i, l_apx, q, k_ptrs, v_ptrs, offs_d, vis_start + start,
                                                   key_mask, vis_start + n_vis, stride_ks, stride_vs, qk_scale,
                                                   HEAD_DIM, BLOCK_D, BLOCK_N, True, UPCAST, DOT_PRECISION)
        n_whole = (text_stop - text_start) // BLOCK_N
        for i in range(n_whole):
            acc, l_i, m_i, l_apx = _rescaled_block(acc, l_i, m_i, l_apx, q, k_ptrs, v_ptrs, offs_d,
                                                   text_start + i * BLOCK_N, no_mask, seq_len,
                                                   stride_ks, stride_vs, qk_scale,
                                                   HEAD_DIM, BLOCK_D, BLOCK_N, False, UPCAST, DOT_PRECISION)
        tail = text_start + n_whole * BLOCK_N
        if tail < text_stop:
            in_range = (tail + tl.arange(0, BLOCK_N)) < text_stop
            key_mask = tl.broadcast_to(in_range[None, :], (BLOCK_M, BLOCK_N))
            acc, l_i, m_i, l_apx = _rescaled_block(acc, l_i, m_i, l_apx, q, k_ptrs, v_ptrs, offs_d, tail,
                                                   key_mask, text_stop, stride_ks, stride_vs, qk_scale,
                                                   HEAD_DIM, BLOCK_D, BLOCK_N, True, UPCAST, DOT_PRECISION)

        l_i = l_i + l_apx
        if APPROX_SHARE:  # the pooled / shared first-order terms are added outside: l_approx / l per row
            share_ptrs = (ApxShare + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh
                          + rows.to(tl.int64) * stride_ls)
            tl.store(share_ptrs, l_apx / tl.where(l_i == 0.0, 1.0, l_i), mask=row_valid)
    else:  # text query: every key but the padding [text_stop, text_end)
        acc, l_i, m_i = _attend_range(acc, l_i, m_i, q, k_ptrs, v_ptrs, offs_d, 0, dense_stop,
                                      stride_ks, stride_vs, qk_scale,
                                      HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, UPCAST, DOT_PRECISION)
        if HAS_TEXT_LENS:
            acc, l_i, m_i = _attend_range(acc, l_i, m_i, q, k_ptrs, v_ptrs, offs_d, text_end, seq_len,
                                          stride_ks, stride_vs, qk_scale,
                                          HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, UPCAST, DOT_PRECISION)

    _store_rows(Out, Lse, acc, l_i, m_i, b, h, rows, row_valid, offs_d,
                stride_ob, stride_os, stride_oh, stride_lb, stride_ls, stride_lh, HEAD_DIM)


@triton.jit
def _lowrank_term(acc, p, q, LowU, LowW, lr_off, j0, n_k_blocks, offs_d, d_valid, sm_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr,
                  RANK: tl.constexpr, RANK_P: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``acc + scale * sum_J p_J (q @ U_J) @ W_J^T`` over the chunk's key blocks ``[j0, j0 + BJ)``."""
    offs_c = tl.arange(0, BLOCK_J * RANK_P)  # column c = (block j0 + c // RANK_P, direction c % RANK_P)
    c_j = j0 + offs_c // RANK_P
    c_r = offs_c % RANK_P
    c_valid = (c_j < n_k_blocks) & (c_r < RANK)
    c_off = c_j * (HEAD_DIM * RANK) + c_r  # 32-bit: inside one (batch, head)'s statistics
    u = tl.load(LowU + lr_off + c_off[None, :] + offs_d[:, None] * RANK,
                mask=c_valid[None, :] & d_valid[:, None], other=0.0).to(q.dtype)  # [BD, BJ*RP]
    w = tl.load(LowW + lr_off + c_off[:, None] + offs_d[None, :] * RANK,
                mask=c_valid[:, None] & d_valid[None, :], other=0.0).to(q.dtype)  # [BJ*RP, BD]
    proj = tl.dot(q, u, input_precision=DOT_PRECISION)  # [BM, BJ*RP] fp32
    weight = tl.reshape(tl.broadcast_to(p[:, :, None], (BLOCK_M, BLOCK_J, RANK_P)), (BLOCK_M, BLOCK_J * RANK_P))
    return tl.dot((weight * proj * sm_scale).to(q.dtype), w, acc, input_precision=DOT_PRECISION)


@triton.jit
def _rescaled_block(acc, l_i, m_i, l_apx, q, k_ptrs, v_ptrs, offs_d, start_n, key_mask, seq_len,
                    stride_ks, stride_vs, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                    MASKED: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """An exact key block that also rescales the approximate denominator ``l_apx``."""
    m_old = m_i
    acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, offs_d, start_n, key_mask, seq_len,
                                  stride_ks, stride_vs, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N,
                                  MASKED, UPCAST, DOT_PRECISION)
    m_use = tl.where(m_i == float("-inf"), 0.0, m_i)
    l_apx = l_apx * tl.math.exp2(m_old - m_use)
    return acc, l_i, m_i, l_apx


def grid_for(n_vis_q_blocks: int, text_len: int, block_m: int, batch_heads: int) -> tuple[int, int]:
    return (n_vis_q_blocks + triton.cdiv(text_len, block_m), batch_heads)
