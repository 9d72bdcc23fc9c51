"""Radial attention: a static O(n log n) energy-decay mask (arXiv 2506.19852, METHODS section 3).

For a (query frame i, key frame j) pair at distance d = |i - j| with g = bit_length(d) and
``s`` tokens per frame:

- d <= 1, or j == 0 with the attention sink: the whole frame pair is attended;
- otherwise tokens (r, c) (raster index within their frames) are kept iff
  ``|r - c| <= w`` with ``w = max(B, 2**bit_length(s) / 2**g * decay)``;
- frequency reduction: with ``l = 2**bit_length(s) / 2**g``, if ``l < B`` the pair is kept only
  when ``d % (B / l) == 0``.

The element mask is converted to blocks of B = 128 visual tokens: a block is kept iff, among
its key columns with any kept entry, more than 60% have more than 1/3 of the block's rows
kept. Kept blocks are computed fully. Blocks are counted from the first visual token and the
last block may be short (its row threshold is 1/3 of its actual rows), so any token count
works.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import EMPTY, FULL, MaskMod, Pattern, as_grid3, block_sizes, num_blocks

# Frame-pair widths: FULL_PAIR means every token pair is kept, DROPPED_PAIR none.
DROPPED_PAIR = -1


@dataclass(frozen=True)
class Radial(Pattern):
    """Radial attention (static, from the grid).

    Args:
        decay: window decay factor (Wan 0.2, HunyuanVideo 0.95 in the original).
        sink: the first frame is attended by every frame (the original's Wan setting). Default True.
        block: block size of the mask conversion, a power of two. Default 128 (the original).

    >>> import diffattn
    >>> p = diffattn.Radial(decay=0.2)
    >>> round(p.attended_fraction(diffattn.TokenLayout((18, 48, 80))), 3)
    0.287
    """

    decay: float
    sink: bool = True
    block: int = 128

    def __post_init__(self):
        if isinstance(self.decay, bool) or not isinstance(self.decay, (int, float)) or not self.decay > 0:
            raise ValueError(f"Radial decay must be a number > 0, got {self.decay!r}")
        if not isinstance(self.sink, bool):
            raise TypeError(f"Radial sink must be a bool, got {self.sink!r}")
        b = self.block
        if isinstance(b, bool) or not isinstance(b, int) or b < 16 or b & (b - 1):
            raise ValueError(f"Radial block must be a power of two >= 16, got {b!r}")
        object.__setattr__(self, "decay", float(self.decay))

    # --- element level -------------------------------------------------------------

    def frame_widths(self, grid: tuple) -> torch.Tensor:
        """``int64 [F, F]``: band half-width per (query frame, key frame); ``s`` for a whole
        pair, DROPPED_PAIR (-1) for none."""
        f_n, h_n, w_n = as_grid3(grid)
        s = h_n * w_n
        b = self.block
        top = 2 ** s.bit_length()
        widths = torch.empty(f_n, dtype=torch.int64)  # by distance d
        for d in range(f_n):
            if d <= 1:
                widths[d] = s
                continue
            g = d.bit_length()
            length = top / 2**g
            w = min(int(max(b, length * self.decay)), s)
            if length < b and d % int(b / length) != 0:
                w = DROPPED_PAIR
            widths[d] = w
        idx = torch.arange(f_n)
        table = widths[(idx[:, None] - idx[None, :]).abs()]
        if self.sink:
            table[:, 0] = s
        return table

    def element_mask_mod(self, grid: tuple, device=None) -> MaskMod:
        """The mask before block conversion, on visual token indices."""
        f_n, h_n, w_n = as_grid3(grid)
        s = h_n * w_n
        widths = self.frame_widths(grid).to(device or "cpu")

        def mask(q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
            table = widths if widths.device == q.device else widths.to(q.device)
            return (q % s - kv % s).abs() <= table[q // s, kv // s]

        return mask

    # --- block level ---------------------------------------------------------------

    def block_keep(self, grid: tuple) -> torch.Tensor:
        """``bool [NB, NB]``: which (query block, key block) pairs of ``self.block`` tokens are kept."""
        return _radial_block_keep(self.frame_widths(grid), as_grid3(grid), self.block)

    def spec(self) -> tuple:
        return ("Radial", self.decay, self.sink, self.block)

    def visual_mask_mod(self, grid: tuple, device=None) -> MaskMod:
        keep = self.block_keep(grid).to(device or "cpu")
        b = self.block

        def mask(q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
            table = keep if keep.device == q.device else keep.to(q.device)
            return table[q // b, kv // b]

        return mask

    def kernel_block_limit(self) -> int | None:
        return self.block

    def validate(self, grid: tuple) -> None:
        if len(grid) not in (2, 3):
            raise ValueError(f"Radial needs a (H, W) or (F, H, W) grid, got {grid!r}")

    def block_classes(self, grid: tuple, block_q: int, block_k: int) -> torch.Tensor:
        b = self.block
        for name, size in (("block_q", block_q), ("block_k", block_k)):
            if b % size:
                raise ValueError(f"Radial(block={b}) needs kernel {name} dividing {b}, got {size}")
        f_n, h_n, w_n = as_grid3(grid)
        n = f_n * h_n * w_n
        keep = self.block_keep(grid)
        rows = torch.arange(num_blocks(n, block_q)) * block_q // b
        cols = torch.arange(num_blocks(n, block_k)) * block_k // b
        kept = keep[rows[:, None], cols[None, :]]
        return torch.where(kept, torch.tensor(FULL, dtype=torch.int8), torch.tensor(EMPTY, dtype=torch.int8))

    def visual_pairs(self, grid: tuple) -> int:
        f_n, h_n, w_n = as_grid3(grid)
        sizes = block_sizes(f_n * h_n * w_n, self.block)
        keep = self.block_keep(grid).to(torch.int64)
        return int((sizes[:, None] * keep * sizes[None, :]).sum())


def _frames_of_blocks(n: int, s: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.arange(0, n, block)
    ends = torch.clamp(starts + block, max=n)
    return starts // s, (ends - 1) // s


def _radial_block_keep(widths: torch.Tensor, grid3: tuple, block: int, chunk: int = 4096) -> torch.Tensor:
    """Block conversion of the radial element mask without materialising it.

    Each block pair is first classified from its frame pairs (all whole -> kept, all dropped
    -> not kept, band too far from the block -> not kept); only block pairs that touch a band
    are counted column by column, from the row segments each frame contributes.
    """
    f_n, h_n, w_n = grid3
    s = h_n * w_n
    n = f_n * s
    nb = num_blocks(n, block)
    f_lo, f_hi = _frames_of_blocks(n, s, block)
    span = int((f_hi - f_lo).max()) + 1

    # Range of widths over the frame pairs each block pair touches.
    w_max = torch.full((nb, nb), DROPPED_PAIR, dtype=torch.int64)
    w_min = torch.full((nb, nb), s, dtype=torch.int64)
    for a in range(span):
        fq = torch.minimum(f_lo + a, f_hi)
        for c in range(span):
            fk = torch.minimum(f_lo + c, f_hi)
            w = widths[fq[:, None], fk[None, :]]
            w_max = torch.maximum(w_max, w)
            w_min = torch.minimum(w_min, w)
    keep = w_min >= s  # every frame pair whole
    undecided = (w_max > DROPPED_PAIR) & ~keep
    # Single-frame block pairs whose band cannot reach the block are dropped.
    starts = torch.arange(0, n, block)
    ends = torch.clamp(starts + block, max=n) - 1
    one_frame = f_lo == f_hi
    r0, r1 = starts - f_lo * s, ends - f_lo * s
    gap = torch.maximum(r0[None, :] - r1[:, None], r0[:, None] - r1[None, :]).clamp(min=0)
    unreachable = one_frame[:, None] & one_frame[None, :] & (gap > w_max)
    undecided &= ~unreachable

    pairs = undecided.nonzero()
    if len(pairs):
        keep[pairs[:, 0], pairs[:, 1]] = torch.cat(
            [_count_columns(widths, s, n, block, p, span) for p in pairs.split(chunk)]
        )
    return keep


def _count_columns(widths: torch.Tensor, s: int, n: int, block: int, pairs: torch.Tensor, span: int) -> torch.Tensor:
    """The 60% / one-third rule for block pairs ``pairs`` ``[P, 2]`` (query block, key block)."""
    # int32 throughout: token indices are < 2**31 and it halves the memory traffic.
    widths = widths.to(torch.int32)
    qb, kb = pairs[:, 0].to(torch.int32), pairs[:, 1].to(torch.int32)
    # Columns: [P, block]
    cols = kb[:, None] * block + torch.arange(block, dtype=torch.int32)[None, :]
    col_valid = cols < n
    cols = torch.clamp(cols, max=n - 1)
    col_frame, col_pos = cols // s, cols % s
    # Row segments: one per frame the query block touches, [P, span]
    q0 = qb * block
    q1 = torch.clamp(q0 + block, max=n) - 1
    seg_frame = (q0 // s)[:, None] + torch.arange(span, dtype=torch.int32)[None, :]
    seg_lo = torch.maximum(q0[:, None], seg_frame * s) - seg_frame * s
    seg_hi = torch.minimum(q1[:, None], seg_frame * s + s - 1) - seg_frame * s
    seg_valid = (seg_frame <= (q1 // s)[:, None]) & (seg_hi >= seg_lo)
    seg_frame = torch.clamp(seg_frame, max=widths.shape[0] - 1)
    # Kept rows per (column, segment): |r - c| <= w  ->  r in [c - w, c + w].
    w = widths[seg_frame[:, None, :], col_frame[:, :, None]]  # [P, block, span]
    lo = torch.maximum(seg_lo[:, None, :], col_pos[:, :, None] - w)
    hi = torch.minimum(seg_hi[:, None, :], col_pos[:, :, None] + w)
    kept_rows = ((hi - lo + 1).clamp(min=0) * seg_valid[:, None, :]).sum(-1)  # [P, block]
    kept_rows = kept_rows * col_valid
    rows = (q1 - q0 + 1)[:, None]
    nonzero = (kept_rows > 0).sum(-1)
    dense = (3 * kept_rows > rows).sum(-1)
    return (5 * dense > 3 * nonzero) & (nonzero > 0)
