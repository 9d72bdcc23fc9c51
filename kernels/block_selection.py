"""Dynamic block selection (BlockTopK, Piecewise) on the GPU: pooling, pooled scores, top-k / cdf.

Two kernels replace the torch selection of ``diffattn.patterns.topk.BlockTopK.select`` (the
reference and oracle):

1. ``block_pool_fwd_kernel``: one program per (block, batch * head) sums its tokens in float32
   and writes the block mean; with ``SIMILARITY`` also the block's mean pairwise cosine
   ``(|sum_t u_t|^2 - n) / (n (n - 1))`` of the unit vectors ``u_t`` (1.0 for a one-token block).
2. ``block_select_fwd_kernel``: one program per ``BLOCK_I`` query blocks of one (batch, head)
   computes their whole row of pooled logits ``scale * q̄_I . k̄_J`` in registers, chooses the
   blocks and writes the keep mask ``[B, H, NQ, NK]``:

   - top-k (``MODE == 0``): the ``count`` largest logits (softmax is monotone, so these are the
     largest pooled probabilities). The ``count``-th largest value ``T`` is found by bisection
     over the order-preserving integer image of the float32 logits (32 steps, each one count
     over the row); keys above ``T`` are kept, then keys equal to ``T`` by increasing index
     until ``count`` are kept.
   - cdf (``MODE == 1``): probabilities ``P = softmax_J(logits)``; the kept blocks are the
     shortest prefix of the descending order whose mass before each block is ``< cdf``. The
     smallest kept value ``T`` is the smallest value with ``sum(P > T) < cdf`` (bisection over
     the bit patterns of non-negative floats, 31 steps); blocks with ``P > T`` are kept, and the
     ``m``-th block (by index) equal to ``T`` is kept while ``sum(P > T) + m * T < cdf``.

   Ties (bitwise-equal scores) go to the lower key-block index, in both modes, as in the
   reference's stable descending sort. Non-finite logits (NaN / inf in q or k) rank below every
   finite one and are then kept anyway, as in the reference. The guards (diagonal, sink,
   non-self-similar key and query blocks) are ORed in last.

The kernel's float32 sums run in a different order than torch's, so a block whose pooled score
lies within rounding (~1e-7 relative) of the top-k threshold or cdf boundary can be chosen
differently from the reference; for equal scores the choice is identical.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .ops import interpreting

POOL_CHUNK = 64  # tokens loaded at once by the pooling kernel
SELECT_TILE = 8192  # BLOCK_I * BLOCK_NK scores held in registers by one selection program


@triton.jit
def block_pool_fwd_kernel(
    X, Mean, Sim,
    stride_xb, stride_xs, stride_xh,
    stride_mb, stride_mh, stride_mn, stride_md,
    stride_sb, stride_sh,
    num_heads, vis_start, n_vis,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
    SIMILARITY: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads

    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    x_base = X + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh
    first = pid_n * BLOCK
    total = tl.zeros((BLOCK_D,), tl.float32)
    unit_total = tl.zeros((BLOCK_D,), tl.float32)
    for t0 in tl.static_range(0, BLOCK, CHUNK):
        offs_t = first + t0 + tl.arange(0, CHUNK)
        t_valid = offs_t < n_vis
        x = tl.load(x_base + (vis_start + offs_t)[:, None].to(tl.int64) * stride_xs + offs_d[None, :],
                    mask=t_valid[:, None] & d_valid[None, :], other=0.0).to(tl.float32)  # [CHUNK, BD]
        total += tl.sum(x, 0)
        if SIMILARITY:
            norm = tl.sqrt(tl.sum(x * x, 1))  # [CHUNK]
            unit_total += tl.sum(x / tl.maximum(norm, 1e-12)[:, None], 0)
    count = tl.minimum(n_vis - first, BLOCK).to(tl.float32)
    m_ptrs = Mean + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh + pid_n.to(tl.int64) * stride_mn
    tl.store(m_ptrs + offs_d * stride_md, total / count, mask=d_valid)
    if SIMILARITY:
        pairs = tl.sum(unit_total * unit_total, 0) - count  # sum over t != u of cos(t, u)
        sim = tl.where(count > 1.0, pairs / tl.maximum(count * (count - 1.0), 1.0), 1.0)
        tl.store(Sim + b * stride_sb + h * stride_sh + pid_n, sim)


@triton.jit
def block_select_fwd_kernel(
    QMean, KMean, QSim, KSim, Keep,
    stride_qb, stride_qh, stride_qi,  # QMean [B, H, NQ, D], unit stride on D
    stride_kb, stride_kh, stride_kd,  # KMean [B, H, D, NK], unit stride on NK
    stride_sb, stride_sh,  # QSim / KSim [B, H, NB], unit stride on NB
    stride_eb, stride_eh, stride_ei,  # Keep [B, H, NQ, NK] int8, unit stride on NK
    num_heads, n_q, n_k, keep_count, cdf, scale, similarity,
    HEAD_DIM: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_NK: tl.constexpr, MODE: tl.constexpr,
    KEEP_DIAGONAL: tl.constexpr, KEEP_SINK: tl.constexpr, SIMILARITY: tl.constexpr,
):
    pid_i = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads

    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_j = tl.arange(0, BLOCK_NK)
    i_valid = offs_i < n_q
    j_valid = offs_j < n_k
    q_base = QMean + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + offs_i.to(tl.int64) * stride_qi
    k_base = KMean + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh + offs_j

    # pooled logits of BLOCK_I query blocks against every key block, one outer product per dim
    scores = tl.zeros((BLOCK_I, BLOCK_NK), tl.float32)
    for d in range(HEAD_DIM):
        qd = tl.load(q_base + d, mask=i_valid, other=0.0)  # [BI]
        kd = tl.load(k_base + d * stride_kd, mask=j_valid, other=0.0)  # [BNK]
        scores += qd[:, None] * kd[None, :]  # [BI, BNK]
    logits = scores * scale
    valid = i_valid[:, None] & j_valid[None, :]  # [BI, BNK]
    non_finite = ~(tl.abs(logits) < float("inf"))  # NaN or +-inf: kept, ranked last in the choice
    logits = tl.where(non_finite, float("-inf"), logits)

    if MODE == 0:
        keep = _top_count(logits, j_valid, keep_count, BLOCK_I)
    else:
        keep = _top_mass(logits, j_valid, cdf, BLOCK_I)

    keep = keep | non_finite
    if KEEP_DIAGONAL:
        keep = keep | (offs_i[:, None] == offs_j[None, :])
    if KEEP_SINK:
        keep = keep | (offs_j == 0)[None, :]
    if SIMILARITY:
        s_off = b.to(tl.int64) * stride_sb + h.to(tl.int64) * stride_sh
        k_sim = tl.load(KSim + s_off + offs_j, mask=j_valid, other=1.0)  # [BNK]
        q_sim = tl.load(QSim + s_off + offs_i, mask=i_valid, other=1.0)  # [BI]
        keep = keep | (k_sim < similarity)[None, :] | (q_sim < similarity)[:, None]

    e_ptrs = (Keep + b.to(tl.int64) * stride_eb + h.to(tl.int64) * stride_eh
              + offs_i[:, None].to(tl.int64) * stride_ei + offs_j[None, :])
    tl.store(e_ptrs, (keep & valid).to(tl.int8), mask=valid)


@triton.jit
def _top_count(logits, j_valid, keep_count, BLOCK_I: tl.constexpr):
    """``[BI, BNK]`` bool: the ``keep_count`` largest logits per row, ties to the lower index."""
    logits = tl.where(logits == 0.0, 0.0, logits)  # -0.0 and +0.0 are one value
    bits = logits.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # integer order == float order
    key = tl.where(j_valid[None, :], key, -2147483647)  # below every float, -inf and NaN included
    # the keep_count-th largest key: largest t with #(key >= t) >= keep_count
    lo = tl.full((BLOCK_I,), -2147483647, tl.int64)  # [BI]
    hi = tl.full((BLOCK_I,), 2147483647, tl.int64)
    for _ in range(32):
        mid = lo + (hi - lo + 1) // 2
        n_ge = tl.sum((key >= mid.to(tl.int32)[:, None]).to(tl.int32), 1)
        enough = n_ge >= keep_count
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid - 1)
    t = lo.to(tl.int32)[:, None]
    above = key > t
    n_above = tl.sum(above.to(tl.int32), 1)
    tied = key == t
    tie_rank = tl.cumsum(tied.to(tl.int32), 1)  # 1-based among the ties, by index
    return above | (tied & (tie_rank <= (keep_count - n_above)[:, None]))


@triton.jit
def _top_mass(logits, j_valid, cdf, BLOCK_I: tl.constexpr):
    """``[BI, BNK]`` bool: the shortest descending prefix whose mass before each kept block is
    below ``cdf``, over ``P = softmax(logits)``; ties to the lower index."""
    logits = tl.where(j_valid[None, :], logits, float("-inf"))
    row_max = tl.max(logits, 1)
    e = tl.exp(logits - row_max[:, None])
    p = e / tl.sum(e, 1)[:, None]  # [BI, BNK], >= 0, padded columns 0
    key = p.to(tl.int32, bitcast=True)  # non-negative floats: integer order == float order
    # smallest t with mass(P > t) < cdf; mass(P > +inf) = 0 < cdf
    lo = tl.zeros((BLOCK_I,), tl.int32)
    hi = tl.full((BLOCK_I,), 0x7F800000, tl.int32)
    for _ in range(31):
        mid = lo + (hi - lo) // 2
        mass = tl.sum(tl.where(key > mid[:, None], p, 0.0), 1)
        light = mass < cdf
        hi = tl.where(light, mid, hi)
        lo = tl.where(light, lo, mid + 1)
    t = hi[:, None]
    above = key > t
    mass_above = tl.sum(tl.where(above, p, 0.0), 1)  # [BI]
    tied = (key == t) & j_valid[None, :]
    ties_before = tl.cumsum(tied.to(tl.int32), 1) - 1  # 0-based among the ties, by index
    t_value = t.to(tl.float32, bitcast=True)
    return above | (tied & (mass_above[:, None] + ties_before.to(tl.float32) * t_value < cdf))


def _pool(x: torch.Tensor, vis_start: int, n_vis: int, block: int, transpose: bool, similarity: bool):
    """Block means ``float32 [B, H, NB, D]`` (or ``[B, H, D, NB]`` with ``transpose``) and the
    self-similarity ``[B, H, NB]`` (None without ``similarity``)."""
    if x.stride(-1) != 1:  # the kernel walks D with a unit stride
        x = x.contiguous()
    batch, _, heads, head_dim = x.shape
    nb = triton.cdiv(n_vis, block)
    if transpose:
        mean = torch.empty((batch, heads, head_dim, nb), dtype=torch.float32, device=x.device)
        m_strides = (mean.stride(0), mean.stride(1), mean.stride(3), mean.stride(2))
    else:
        mean = torch.empty((batch, heads, nb, head_dim), dtype=torch.float32, device=x.device)
        m_strides = mean.stride()
    sim = torch.empty((batch, heads, nb), dtype=torch.float32, device=x.device) if similarity else mean
    block_pool_fwd_kernel[(nb, batch * heads)](
        x, mean, sim,
        x.stride(0), x.stride(1), x.stride(2),
        *m_strides,
        sim.stride(0), sim.stride(1),
        heads, vis_start, n_vis,
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK=block,
        CHUNK=min(block, POOL_CHUNK),
        SIMILARITY=similarity,
    )
    return mean, (sim if similarity else None)


@torch.library.custom_op("diffattn::block_select", mutates_args=())
def block_select(
    q: torch.Tensor,
    k: torch.Tensor,
    vis_start: int,
    n_vis: int,
    block: int,
    scale: float,
    keep_count: int,
    cdf: float,
    keep_diagonal: bool,
    keep_sink: bool,
    similarity: float | None = None,
) -> torch.Tensor:
    """Kept key blocks per query block of BlockTopK's selection (see the module docstring).

    Args:
        q, k: ``[B, S, H, D]``, fp16 / bf16 / fp32; the visual tokens are
            ``[vis_start, vis_start + n_vis)``.
        block: selection block size in tokens.
        scale: softmax scale of the pooled scores.
        keep_count: blocks kept per query block (top-k mode), ``1 <= keep_count <= NK``; 0 selects
            the cdf mode.
        cdf: the mass to reach in cdf mode, in (0, 1]; unused in top-k mode.
        keep_diagonal, keep_sink: always keep block ``J == I`` / ``J == 0``.
        similarity: keep key blocks (for every query block) and query blocks (every key block)
            whose mean pairwise cosine is below this; None: off.

    Returns:
        ``bool [B, H, NQ, NK]`` with ``NQ = NK = ceil(n_vis / block)``.

    Example (CUDA tensors ``q, k [1, S, H, 128]``, all tokens visual, top 4 blocks of 64)::

        keep = torch.ops.diffattn.block_select(q, k, 0, q.shape[1], 64, 128**-0.5, 4, 0.0, True, True)
    """
    batch, _, heads, head_dim = q.shape
    nb = triton.cdiv(n_vis, block)
    if not 0 <= keep_count <= nb:
        raise ValueError(f"keep_count must be in [0, NK={nb}], got {keep_count}")
    if keep_count == 0 and not 0 < cdf <= 1:
        raise ValueError(f"cdf must be in (0, 1] when keep_count == 0, got {cdf}")
    with_sim = similarity is not None
    q_mean, q_sim = _pool(q, vis_start, n_vis, block, transpose=False, similarity=with_sim)
    k_mean, k_sim = _pool(k, vis_start, n_vis, block, transpose=True, similarity=with_sim)
    keep = torch.empty((batch, heads, nb, nb), dtype=torch.bool, device=q.device)
    keep_bytes = keep.view(torch.int8)
    block_nk = max(16, triton.next_power_of_2(nb))
    block_i = max(1, min(16, SELECT_TILE // block_nk, triton.next_power_of_2(nb)))
    sims = (q_sim, k_sim) if with_sim else (q_mean, q_mean)
    block_select_fwd_kernel[(triton.cdiv(nb, block_i), batch * heads)](
        q_mean, k_mean, *sims, keep_bytes,
        q_mean.stride(0), q_mean.stride(1), q_mean.stride(2),
        k_mean.stride(0), k_mean.stride(1), k_mean.stride(2),
        sims[0].stride(0), sims[0].stride(1),
        keep_bytes.stride(0), keep_bytes.stride(1), keep_bytes.stride(2),
        heads, nb, nb, keep_count, float(cdf), float(scale), float(similarity) if with_sim else 0.0,
        HEAD_DIM=head_dim,
        BLOCK_I=block_i,
        BLOCK_NK=block_nk,
        MODE=0 if keep_count else 1,
        KEEP_DIAGONAL=keep_diagonal,
        KEEP_SINK=keep_sink,
        SIMILARITY=with_sim,
        **({} if interpreting() else {"num_warps": 8 if block_i * block_nk > 4096 else 4}),
    )
    return keep


@block_select.register_fake
def _(q, k, vis_start, n_vis, block, scale, keep_count, cdf, keep_diagonal, keep_sink, similarity=None):
    nb = -(-n_vis // block)
    return q.new_empty((q.shape[0], q.shape[2], nb, nb), dtype=torch.bool)
