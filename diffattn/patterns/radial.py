"""Radial attention: a static O(n log n) energy-decay mask (arXiv 2506.19852, METHODS section 3).

Element mask. For a (query frame i, key frame j) pair at distance d = |i - j| with
g = bit_length(d) and ``s`` tokens per frame:

- d <= 1, or j == 0 with the attention sink: the whole frame pair is attended;
- otherwise tokens (r, c) (raster index within their frames) are kept iff
  ``|r - c| <= w`` with ``w = max(B, 2**bit_length(s) / 2**g * decay)``;
- frequency reduction: with ``l = 2**bit_length(s) / 2**g``, if ``l < B`` the pair is kept only
  when ``d % int(B / l) == 0``.

Block rule: the original's ``gen_log_mask_shrinked`` (mit-han-lab/radial-attention,
``radial_attn/attn_mask.py``), exactly. Blocks of B tokens are counted from the first visual
token. The original converts each frame pair separately: frame i's ``s x s`` mask is placed at
row offset ``(i * s) % B`` and column offset ``(j * s) % B`` of a zero ``ceil(s / B) * B``
square, that square is cut into ``B x B`` pieces, and the piece at local block (t, u) lands on
block ``((i * s) // B + t, (j * s) // B + u)``. A piece is kept iff, among its columns with any
kept entry, more than 60% have more than B / 3 kept rows (one third of the whole block height,
even where the frame fills only part of the block). A block is kept iff any piece landing on it
is kept (logical OR). So where a block straddles two frames each frame's part is judged on its
own, and a part with B / 3 rows or fewer is never kept by itself. A frame that spans
``ceil(s / B) + 1`` blocks loses its part in the last one (it falls outside the square). Kept
blocks are computed whole: the attended mask of this pattern is the kept blocks
(``visual_mask_mod``), and the kernel visits exactly those blocks, all FULL.

The builder evaluates each piece in O(1): for a row segment ``[a, b]`` and a band half-width
w >= B (a whole pair is w = s), column c has ``|[a, b] intersect [c - w, c + w]|`` kept rows, so the
columns with at least t kept rows are ``[a - w + t - 1, b + w - t + 1]`` (when ``b - a + 1 >= t``)
intersected with the piece's columns. Work is O(#blocks^2 * pieces per block pair), never S x S.

Where the original is not defined (it needs the token count n to be a multiple of B), ours
extends it as the original's own HunyuanVideo path does, which pads the video to a multiple of
B and keeps the block that holds the video/text border whole: when n % B != 0 the last (short)
block's row and column are kept whole (every query attends the last block's keys and the last
block's queries attend every key); the other blocks follow the rule above. Wan 480p, 21x30x52 =
32760 tokens, is such a grid: 0.3435 attended (the whole-block rule used before gave 0.3368).

Deliberate differences from the original, each where the original's result is degenerate:

- d = 1 is always attended whole (METHODS). The original also applies the frequency reduction
  to d = 1, which drops adjacent frames when s < 128 (then ``l < 128`` and ``1 % int(128 / l)``
  is 1). Only tiny frames are affected.
- A query block the rule leaves with no key block at all keeps its diagonal block, whose pairs
  are all attended (d <= 1); the original gives those queries no keys. It takes a block holding
  the dropped tail of one frame and B / 3 rows or fewer of the next, so ``s % B > 2B / 3``
  (e.g. 32x12x19, s = 228); no video grid of the presets has one.
- ``block`` other than 128: both the window floor and the frequency-reduction threshold are
  ``block`` (the original hard-codes 128 for the latter).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .base import EMPTY, FULL, MaskMod, Pattern, as_grid3, block_sizes, num_blocks

# Frame-pair widths: s means every token pair is kept, DROPPED_PAIR none.
DROPPED_PAIR = -1


@dataclass(frozen=True)
class Radial(Pattern):
    """Radial attention (static, from the grid); see the module docstring for the exact rule.

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
        """``bool [NB, NB]``: which (query block, key block) pairs of ``self.block`` tokens are
        kept (the module docstring's rule; cached per (pattern, grid), a fresh copy each call)."""
        return _cached_block_keep(self, as_grid3(grid)).clone()

    def spec(self) -> tuple:
        return ("Radial", self.decay, self.sink, self.block)

    def visual_mask_mod(self, grid: tuple, device=None) -> MaskMod:
        keep = _cached_block_keep(self, as_grid3(grid)).to(device or "cpu")
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
        keep = _cached_block_keep(self, as_grid3(grid))
        rows = torch.arange(num_blocks(n, block_q)) * block_q // b
        cols = torch.arange(num_blocks(n, block_k)) * block_k // b
        kept = keep[rows[:, None], cols[None, :]]
        return torch.where(kept, torch.tensor(FULL, dtype=torch.int8), torch.tensor(EMPTY, dtype=torch.int8))

    def visual_pairs(self, grid: tuple) -> int:
        f_n, h_n, w_n = as_grid3(grid)
        sizes = block_sizes(f_n * h_n * w_n, self.block)
        keep = _cached_block_keep(self, as_grid3(grid)).to(torch.int64)
        return int((sizes[:, None] * keep * sizes[None, :]).sum())


@functools.lru_cache(maxsize=32)
def _cached_block_keep(pattern: Radial, grid3: tuple) -> torch.Tensor:
    return _radial_block_keep(pattern.frame_widths(grid3), grid3, pattern.block)


def _block_segments(n: int, s: int, block: int) -> tuple[torch.Tensor, ...]:
    """The original's pieces along one axis: per (block, slot) with ``slot < span`` frames a block
    can touch, the frame, the frame-local segment ``[lo, hi]`` of that frame inside the block,
    and whether the original counts it (non-empty, and not past the frame's ``ceil(s / B)``
    blocks counted from the block it starts in)."""
    f_n = n // s
    nb = num_blocks(n, block)
    span = min(f_n, (block - 1) // s + 2)
    starts = torch.arange(nb, dtype=torch.int64) * block
    ends = torch.clamp(starts + block, max=n) - 1
    frame = (starts // s)[:, None] + torch.arange(span, dtype=torch.int64)[None, :]  # [NB, span]
    lo = torch.maximum(starts[:, None], frame * s) - frame * s
    hi = torch.minimum(ends[:, None], frame * s + s - 1) - frame * s
    local = torch.arange(nb, dtype=torch.int64)[:, None] - (frame * s) // block
    valid = (hi >= lo) & (local < num_blocks(s, block)) & (frame < f_n)
    return frame.clamp(max=f_n - 1), lo.to(torch.int32), hi.to(torch.int32), valid


def _radial_block_keep(widths: torch.Tensor, grid3: tuple, block: int, chunk: int = 1 << 16) -> torch.Tensor:
    """The block rule of the module docstring, piece by piece, without materialising the mask.

    ``widths``: ``int [F, F]`` from ``Radial.frame_widths``. Works in chunks of about ``chunk``
    block pairs (cache-sized int32 temporaries).
    """
    f_n, h_n, w_n = grid3
    s = h_n * w_n
    n = f_n * s
    nb = num_blocks(n, block)
    frame, lo, hi, valid = _block_segments(n, s, block)
    span = frame.shape[1]
    t = block // 3 + 1  # "more than 1/3 of the block's rows": at least t rows
    widths = widths.to(torch.int32)
    row_ok = valid & (hi - lo + 1 >= t)  # shorter row segments have no column over B / 3
    keep = torch.zeros(nb, nb, dtype=torch.bool)
    rows_per = max(1, chunk // nb)
    for sq in range(span):
        for sk in range(span):
            fk, c0, c1, vk = frame[:, sk], lo[:, sk], hi[:, sk], valid[:, sk]  # [NB] key blocks
            for r0 in range(0, nb, rows_per):
                sl = slice(r0, min(nb, r0 + rows_per))
                a, b, vq = lo[sl, sq, None], hi[sl, sq, None], row_ok[sl, sq, None]  # [R, 1]
                w = widths[frame[sl, sq, None], fk]  # [R, NB]
                touched = (torch.minimum(b + w, c1) - torch.maximum(a - w, c0) + 1).clamp_(min=0)
                reach = w - (t - 1)
                dense = (torch.minimum(b + reach, c1) - torch.maximum(a - reach, c0) + 1).clamp_(min=0)
                keep[sl] |= (5 * dense > 3 * touched) & (w >= 0) & vq & vk
    if n % block:  # the extension: the short last block is kept whole, both ways
        keep[-1, :] = True
        keep[:, -1] = True
    lonely = ~keep.any(1)
    if bool(lonely.any()):  # deliberate: no query block is left without keys
        idx = lonely.nonzero()[:, 0]
        keep[idx, idx] = True
    return keep
