"""Exact block classification for masks that factor over the grid axes.

If ``attend(q, k) = A_f(q_f, k_f) & A_h(q_h, k_h) & A_w(q_w, k_w)``, the number of attended
pairs between two raster ranges follows from per-axis 2-D prefix sums, without touching
individual tokens:

- a raster prefix ``[0, x)`` of the (F, H, W) grid is the union of three boxes
  (whole frames before ``x``; whole rows before it in its frame; columns before it in its row);
- the attended count between two boxes is the product over axes of per-axis counts, each a
  4-term lookup in that axis' prefix table ``T[i, j] = sum(A[:i, :j])``;
- so ``C(x, y) = #{q < x, k < y attended}`` costs 9 box pairs x 3 axes of lookups, and
  ``count(I, J)`` of a block pair is an inclusion-exclusion of four ``C`` values.

A block pair is FULL when its count equals its area, EMPTY when it is 0, else PARTIAL.
Cost: O(NQ * NK) lookups with NQ, NK the block counts; memory O(n^2) per axis.
"""

from __future__ import annotations

import torch

from .base import EMPTY, FULL, PARTIAL, block_sizes


def prefix_table(axis_mask: torch.Tensor) -> torch.Tensor:
    """``T[i, j] = axis_mask[:i, :j].sum()``, ``int64 [n + 1, n + 1]``."""
    n = axis_mask.shape[0]
    table = torch.zeros(n + 1, n + 1, dtype=torch.int64)
    table[1:, 1:] = axis_mask.to(torch.int64).cumsum(0).cumsum(1)
    return table


def _prefix_boxes(x: torch.Tensor, grid3: tuple[int, int, int]) -> torch.Tensor:
    """Boxes covering raster prefixes ``[0, x)``: ``int64 [len(x), 3 boxes, 3 axes, (lo, hi)]``."""
    f_n, h_n, w_n = grid3
    xf, xh, xw = x // (h_n * w_n), (x // w_n) % h_n, x % w_n
    zero = torch.zeros_like(x)
    full_h, full_w = torch.full_like(x, h_n), torch.full_like(x, w_n)
    lo_f, hi_f = xf, torch.clamp(xf + 1, max=f_n)  # the frame of x (empty when x == N)
    lo_h, hi_h = xh, torch.clamp(xh + 1, max=h_n)
    boxes = torch.stack(
        [
            torch.stack([torch.stack([zero, xf], -1), torch.stack([zero, full_h], -1), torch.stack([zero, full_w], -1)], 1),
            torch.stack([torch.stack([lo_f, hi_f], -1), torch.stack([zero, xh], -1), torch.stack([zero, full_w], -1)], 1),
            torch.stack([torch.stack([lo_f, hi_f], -1), torch.stack([lo_h, hi_h], -1), torch.stack([zero, xw], -1)], 1),
        ],
        1,
    )
    return boxes


def _interval_ids(boxes: torch.Tensor, n: int) -> torch.Tensor:
    """Intervals ``(lo, hi)`` with ``0 <= lo <= hi <= n`` as ids ``lo * (n + 1) + hi``."""
    return boxes[..., 0] * (n + 1) + boxes[..., 1]


def _interval_counts(table: torch.Tensor, ids_q: torch.Tensor, ids_k: torch.Tensor) -> torch.Tensor:
    """Attended pairs between every query interval in ``ids_q`` and key interval in ``ids_k`` on
    one axis, ``int64 [len(ids_q), len(ids_k)]`` (four lookups in the prefix table)."""
    n1 = table.shape[0]
    ql, qh = ids_q // n1, ids_q % n1
    kl, kh = ids_k // n1, ids_k % n1
    return (table[qh[:, None], kh[None, :]] - table[ql[:, None], kh[None, :]]
            - table[qh[:, None], kl[None, :]] + table[ql[:, None], kl[None, :]])


def _prefix_counts(
    tables: list[torch.Tensor], qbox: torch.Tensor, kbox: torch.Tensor
) -> torch.Tensor:
    """``C[i, j]`` = attended pairs with query < x_i and key < y_j, ``int64 [NX, NY]``.

    Box intervals take few distinct values per axis, so the per-axis counts are computed once
    per distinct (query interval, key interval) pair and gathered.
    """
    total = None
    for axis, table in enumerate(tables):
        n = table.shape[0] - 1
        uq, iq = torch.unique(_interval_ids(qbox[:, :, axis], n), return_inverse=True)  # iq: [NX, 3]
        uk, ik = torch.unique(_interval_ids(kbox[:, :, axis], n), return_inverse=True)  # ik: [NY, 3]
        counts = _interval_counts(table, uq, uk)
        s = counts[iq[:, :, None, None], ik[None, None, :, :]]  # [NX, 3, NY, 3]
        total = s if total is None else total.mul_(s)
    return total.sum(dim=(1, 3))


def separable_block_classes(
    axis_masks: list[torch.Tensor],
    grid3: tuple[int, int, int],
    block_q: int,
    block_k: int,
    chunk: int = 64,
) -> torch.Tensor:
    """EMPTY/PARTIAL/FULL per (query block, key block) for a per-axis factored mask.

    Args:
        axis_masks: three bool matrices ``[n_a, n_a]`` (query coordinate, key coordinate).
        grid3: ``(F, H, W)``.
        block_q, block_k: block sizes in visual tokens.

    Returns:
        ``int8 [ceil(N / block_q), ceil(N / block_k)]``.
    """
    n = grid3[0] * grid3[1] * grid3[2]
    tables = [prefix_table(m) for m in axis_masks]
    xs = torch.cat([torch.arange(0, n, block_q), torch.tensor([n])])
    ys = torch.cat([torch.arange(0, n, block_k), torch.tensor([n])])
    kbox = _prefix_boxes(ys, grid3)
    rows = []
    for c0 in range(0, len(xs), chunk):
        rows.append(_prefix_counts(tables, _prefix_boxes(xs[c0 : c0 + chunk], grid3), kbox))
    cum = torch.cat(rows, 0)  # [NQ + 1, NK + 1]
    count = cum[1:, 1:] - cum[:-1, 1:] - cum[1:, :-1] + cum[:-1, :-1]
    area = block_sizes(n, block_q)[:, None] * block_sizes(n, block_k)[None, :]
    classes = torch.full(count.shape, PARTIAL, dtype=torch.int8)
    classes[count == 0] = EMPTY
    classes[count == area] = FULL
    return classes
