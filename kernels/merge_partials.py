"""Exact merge of two attention partials over disjoint keys, one pass over the outputs.

Each program merges ``BLOCK_R`` rows (one row = one (batch, token, head)) of ``D`` values:

    m = max(lse_1, lse_2);  w_i = e^(lse_i - m);  out = (out_1 w_1 + out_2 w_2) / (w_1 + w_2)

A partial with lse -inf has no keys: its weight is 0 and its output is not used (not even as
``0 * out``, so garbage there cannot turn into NaN). A row empty on both sides gets out 0 and
lse -inf. NaN propagates: a NaN or +inf lse makes the row NaN (``tl.maximum`` may drop a NaN,
but ``exp(NaN - m)`` does not), and the output of a non-empty partial is always multiplied, so
its NaN / inf reach the result even when its weight rounds to 0. Outputs are contiguous
``[rows, D]``; the lses are contiguous ``[rows]`` float32.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def merge_partials_fwd_kernel(Out1, Lse1, Out2, Lse2, Out, LseOut, n_rows,
                              HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR]
    row_ok = rows < n_rows
    offs_d = tl.arange(0, BLOCK_D)
    lse_1 = tl.load(Lse1 + rows, mask=row_ok, other=float("-inf"))
    lse_2 = tl.load(Lse2 + rows, mask=row_ok, other=float("-inf"))
    m = tl.maximum(lse_1, lse_2)
    m = tl.where(m == float("-inf"), 0.0, m)
    w_1 = tl.exp(lse_1 - m)
    w_2 = tl.exp(lse_2 - m)
    total = w_1 + w_2
    empty = total == 0.0  # both partials empty (a NaN total is not)
    safe = tl.where(empty, 1.0, total)
    a_1 = w_1 / safe
    a_2 = w_2 / safe
    offs = rows[:, None] * HEAD_DIM + offs_d[None, :]  # [BR, BD]
    mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    out_1 = tl.load(Out1 + offs, mask=mask, other=0.0).to(tl.float32)
    out_2 = tl.load(Out2 + offs, mask=mask, other=0.0).to(tl.float32)
    out = (tl.where((lse_1 == float("-inf"))[:, None], 0.0, out_1 * a_1[:, None])
           + tl.where((lse_2 == float("-inf"))[:, None], 0.0, out_2 * a_2[:, None]))
    tl.store(Out + offs, out.to(Out.dtype.element_ty), mask=mask)
    tl.store(LseOut + rows, tl.where(empty, float("-inf"), m + tl.log(safe)), mask=row_ok)
