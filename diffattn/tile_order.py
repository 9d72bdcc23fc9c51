"""Tile-major token order: the visual grid cut into tiles, tiles in raster order, tokens in raster
order inside each tile (STA, the tile-aligned sliding window).

When every query tile attends whole key tiles (a window that starts and ends on tile boundaries,
shared by all queries of a tile), the score matrix in tile order is made of whole
(tile x tile) squares: with kernel blocks that do not straddle tiles, every block is either
full or empty and the kernel never evaluates an element mask.

A grid ``(F, H, W)`` with tile ``(tf, th, tw)`` has ``T = (F/tf) * (H/th) * (W/tw)`` tiles of
``V = tf * th * tw`` tokens. Raster token ``(f, h, w)`` sits at tile-order position
``tile_index * V + (f % tf) * th * tw + (h % th) * tw + w % tw``.

Text tokens stay where they are; only the visual segment is reordered.

>>> import torch
>>> to_tiles, from_tiles = tile_permutation((2, 4), (2, 2))
>>> to_tiles.tolist()  # raster index of each tile-order position
[0, 1, 4, 5, 2, 3, 6, 7]
>>> torch.equal(to_tiles[from_tiles], torch.arange(8))
True
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .patterns.base import EMPTY, FULL, PARTIAL, as_grid3
from .tokens import TokenLayout

#: Smallest kernel block: a tile must hold a multiple of it.
MIN_BLOCK = 16


def check_tile(grid: tuple, tile: tuple) -> tuple[int, int, int]:
    """``tile`` (one positive int per axis of ``grid``) as ``(tf, th, tw)``; raises ValueError if
    an axis of the grid is not a whole number of tiles.

    >>> check_tile((30, 48, 80), (6, 8, 8))
    (6, 8, 8)
    """
    if not isinstance(tile, tuple) or len(tile) != len(grid):
        raise ValueError(f"tile must be a tuple with one entry per grid axis {tuple(grid)}, got {tile!r}")
    for axis, (n, t) in enumerate(zip(grid, tile)):
        if isinstance(t, bool) or not isinstance(t, int) or t < 1:
            raise ValueError(f"tile[{axis}] must be a positive int, got {t!r}")
        if n % t:
            raise ValueError(f"grid axis {axis} has {n} tokens, not a whole number of tile[{axis}]={t}; "
                             f"allowed: tile sizes that divide {n}")
    return as_grid3(tuple(tile))


def tile_volume(tile: tuple) -> int:
    """Tokens per tile."""
    volume = 1
    for t in tile:
        volume *= t
    return volume


def largest_block(volume: int, limit: int = 256) -> int:
    """The largest power of two <= ``limit`` that divides ``volume`` (a kernel block that never
    straddles two tiles)."""
    block = 1
    while volume % (block * 2) == 0 and block * 2 <= limit:
        block *= 2
    return block


@functools.lru_cache(maxsize=32)
def _permutation(grid3: tuple, tile3: tuple, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    (f_n, h_n, w_n), (tf, th, tw) = grid3, tile3
    raster = torch.arange(f_n * h_n * w_n).reshape(f_n // tf, tf, h_n // th, th, w_n // tw, tw)
    to_tiles = raster.permute(0, 2, 4, 1, 3, 5).reshape(-1)
    from_tiles = torch.empty_like(to_tiles)
    from_tiles[to_tiles] = torch.arange(to_tiles.numel())
    return to_tiles.to(device), from_tiles.to(device)


def tile_permutation(grid: tuple, tile: tuple, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Index tensors ``int64 [F * H * W]`` of the visual tokens, cached per (grid, tile, device):

    - ``to_tiles[p]``: the raster index of the token at tile-order position ``p``
      (``x_tiles = x_raster[to_tiles]``);
    - ``from_tiles[r]``: the tile-order position of raster token ``r``
      (``x_raster = x_tiles[from_tiles]``).
    """
    tile3 = check_tile(tuple(grid), tuple(tile))
    return _permutation(as_grid3(tuple(grid)), tile3, str(torch.device(device)))


@functools.lru_cache(maxsize=32)
def _sequence_permutation(grid: tuple, text_len: int, text_first: bool, tile: tuple,
                          device: str) -> tuple[torch.Tensor, torch.Tensor]:
    layout = TokenLayout(grid, text_len, text_first)
    to_vis, from_vis = tile_permutation(grid, tile, "cpu")
    vs, nv, s = layout.visual_start, layout.num_visual, layout.seq_len
    head, tail = torch.arange(vs), torch.arange(vs + nv, s)
    to_tiles = torch.cat([head, vs + to_vis, tail])
    from_tiles = torch.cat([head, vs + from_vis, tail])
    return to_tiles.to(device), from_tiles.to(device)


@torch.compiler.assume_constant_result
def _sequence_permutation_constant(grid: tuple, text_len: int, text_first: bool, tile: tuple,
                                   device: str) -> tuple[torch.Tensor, torch.Tensor]:
    # plain arguments: torch.compile cannot pass a TokenLayout to a constant-result call
    return _sequence_permutation(grid, text_len, text_first, tile, device)


def sequence_permutation(layout: TokenLayout, tile: tuple, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``tile_permutation`` over the whole sequence of ``layout`` (``int64 [S]``): text positions map
    to themselves. Cached per (layout, tile, device); a constant for ``torch.compile``."""
    return _sequence_permutation_constant(layout.grid, layout.text_len, layout.text_first, tuple(tile),
                                          str(torch.device(device)))


@dataclass(frozen=True)
class TileOrder:
    """Moves ``[B, S, ...]`` tensors of a TokenLayout between raster and tile-major token order.

    Args:
        layout: where visual and text tokens sit.
        tile: tile shape, one int per grid axis; each grid axis must be a whole number of tiles.

    >>> import torch
    >>> order = TileOrder(TokenLayout((2, 4), text_len=1), (2, 2))
    >>> x = torch.arange(9)[None]                    # [B=1, S=9]: text first, then the 2 x 4 grid
    >>> order.to_tiles(x).tolist()
    [[0, 1, 2, 5, 6, 3, 4, 7, 8]]
    >>> torch.equal(order.from_tiles(order.to_tiles(x)), x)
    True
    """

    layout: TokenLayout
    tile: tuple

    def __post_init__(self):
        check_tile(self.layout.grid, tuple(self.tile))

    def _apply(self, x: torch.Tensor, which: int) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.layout.seq_len:
            raise ValueError(f"expected a [B, S={self.layout.seq_len}, ...] tensor for {self.layout}, got {tuple(x.shape)}")
        index = sequence_permutation(self.layout, tuple(self.tile), str(x.device))[which]
        return x.index_select(1, index)

    def to_tiles(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, S, ...]`` in raster order -> the same tokens in tile order (a new tensor)."""
        return self._apply(x, 0)

    def from_tiles(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, S, ...]`` in tile order -> raster order (a new tensor)."""
        return self._apply(x, 1)


def _touched_tiles(n: int, block: int, volume: int) -> torch.Tensor:
    """Tiles each block of ``block`` tokens overlaps, ``int64 [NB, m]`` (a block's last tile
    repeated where it touches fewer than ``m``)."""
    starts = torch.arange(0, n, block)
    ends = torch.clamp(starts + block, max=n)
    first, last = starts // volume, (ends - 1) // volume
    width = int((last - first).max()) + 1
    return torch.minimum(first[:, None] + torch.arange(width)[None, :], last[:, None])


def tile_block_classes(axis_tiles: list[torch.Tensor], grid3: tuple, tile3: tuple, block_q: int, block_k: int,
                       chunk: int = 256) -> torch.Tensor:
    """EMPTY / PARTIAL / FULL per (query block, key block) over the visual tokens in tile order.

    Args:
        axis_tiles: three bool matrices ``[n_a / t_a, n_a / t_a]``: whether query tile ``i``
            attends key tile ``j`` on axis ``a`` (the pattern attends whole tiles).
        grid3, tile3: ``(F, H, W)`` and ``(tf, th, tw)``, each axis a whole number of tiles.
        block_q, block_k: block sizes in tokens (any; blocks that straddle tiles are classified
            from every tile they touch).

    Returns:
        ``int8 [ceil(N / block_q), ceil(N / block_k)]``.
    """
    n, volume = grid3[0] * grid3[1] * grid3[2], tile_volume(tile3)
    nh, nw = grid3[1] // tile3[1], grid3[2] // tile3[2]

    def coords(tiles: torch.Tensor) -> tuple:
        return tiles // (nh * nw), (tiles // nw) % nh, tiles % nw

    kf, kh, kw = (c[None, None, :, :] for c in coords(_touched_tiles(n, block_k, volume)))  # [1, 1, NK, mk]
    q_tiles = _touched_tiles(n, block_q, volume)
    rows = []
    for c0 in range(0, q_tiles.shape[0], chunk):
        qf, qh, qw = (c[:, :, None, None] for c in coords(q_tiles[c0 : c0 + chunk]))  # [cq, mq, 1, 1]
        attended = axis_tiles[0][qf, kf] & axis_tiles[1][qh, kh] & axis_tiles[2][qw, kw]  # [cq, mq, NK, mk]
        every, some = attended.all(3).all(1), attended.any(3).any(1)
        block = torch.full(every.shape, PARTIAL, dtype=torch.int8)
        block[every] = FULL
        block[~some] = EMPTY
        rows.append(block)
    return torch.cat(rows, 0)


def _axis_intervals(axis_tiles: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per axis, the first and last key tile each query tile attends (``int64 [n_a]`` each), or
    None when some query tile attends a set of key tiles that is not one interval."""
    out = []
    for matrix in axis_tiles:
        n = matrix.shape[1]
        lo = matrix.to(torch.int8).argmax(1)
        hi = n - 1 - matrix.flip(1).to(torch.int8).argmax(1)
        if bool((matrix.sum(1) != hi - lo + 1).any()) or not bool(matrix.any(1).all()):
            return None
        out.append((lo, hi))
    return out


def _tile_intervals(intervals, grid3: tuple, tile3: tuple) -> torch.Tensor:
    """``int64 [T, 6]``: (lo, hi) of the key tiles on each axis, per query tile in tile order."""
    nf, nh, nw = (g // t for g, t in zip(grid3, tile3))
    (lf, hf), (lh, hh), (lw, hw) = intervals
    f = torch.arange(nf)[:, None, None].expand(nf, nh, nw).reshape(-1)
    h = torch.arange(nh)[None, :, None].expand(nf, nh, nw).reshape(-1)
    w = torch.arange(nw)[None, None, :].expand(nf, nh, nw).reshape(-1)
    return torch.stack([lf[f], hf[f], lh[h], hh[h], lw[w], hw[w]], 1)


def query_blocks_share_keys(axis_tiles: list[torch.Tensor], grid3: tuple, tile3: tuple, block_q: int) -> bool | None:
    """Whether every query block of ``block_q`` tokens (tile order) lies in tiles that attend one
    and the same set of key tiles: with key blocks inside tiles, exactly when no block is partial.
    O(number of tiles), no block matrix; None when a query tile's key tiles are not an interval
    per axis (undecided here)."""
    intervals = _axis_intervals(axis_tiles)
    if intervals is None:
        return None
    per_tile = _tile_intervals(intervals, grid3, tile3)
    n, volume = per_tile.shape[0] * tile_volume(tile3), tile_volume(tile3)
    touched = _touched_tiles(n, block_q, volume)  # [NQ, m]
    return bool((per_tile[touched] == per_tile[touched[:, :1]]).all())


def tile_block_lists(axis_tiles: list[torch.Tensor], grid3: tuple, tile3: tuple, block_q: int,
                     block_k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The key blocks each query block visits, built from the tiles in O(kept blocks): no
    ``[NQ, NK]`` matrix (a 506,880-token grid with 32-token blocks would need 250 M entries).

    Applies when key blocks lie inside tiles (``block_k`` divides the tile volume), every query
    block's tiles share one key set (:func:`query_blocks_share_keys`) and each query tile attends
    an interval of key tiles per axis; then every visited block is full. Returns
    ``(count int32 [NQ], ascending indices int32 [NQ, max(1, count)])`` or None where it does
    not apply (use :func:`tile_block_classes` there).
    """
    volume = tile_volume(tile3)
    if volume % block_k:
        return None
    intervals = _axis_intervals(axis_tiles)
    if intervals is None or not query_blocks_share_keys(axis_tiles, grid3, tile3, block_q):
        return None  # (a query block over tiles with different keys has partial blocks)
    nf, nh, nw = (g // t for g, t in zip(grid3, tile3))
    per_tile = _tile_intervals(intervals, grid3, tile3)  # [T, 6]
    spans = per_tile[:, 1::2] - per_tile[:, 0::2] + 1  # [T, 3] key tiles per axis
    widths = [int(spans[:, a].max()) for a in range(3)]
    steps = [torch.arange(m) for m in widths]
    f = per_tile[:, 0, None, None, None] + steps[0][None, :, None, None]
    h = per_tile[:, 2, None, None, None] + steps[1][None, None, :, None]
    w = per_tile[:, 4, None, None, None] + steps[2][None, None, None, :]
    valid = ((steps[0][None, :, None, None] < spans[:, 0, None, None, None])
             & (steps[1][None, None, :, None] < spans[:, 1, None, None, None])
             & (steps[2][None, None, None, :] < spans[:, 2, None, None, None]))
    key_tiles = (f * nh * nw + h * nw + w).reshape(len(per_tile), -1)  # ascending where valid
    valid = valid.reshape(len(per_tile), -1)
    count = valid.sum(1)
    order = torch.argsort(valid.to(torch.int8), dim=1, descending=True, stable=True)[:, : int(count.max())]
    key_tiles = torch.gather(key_tiles, 1, order)
    per_key_tile = volume // block_k  # key blocks of one tile, consecutive
    blocks = (key_tiles[:, :, None] * per_key_tile + torch.arange(per_key_tile)).reshape(len(per_tile), -1)
    count = count * per_key_tile
    first_tile = _touched_tiles(per_tile.shape[0] * volume, block_q, volume)[:, 0]  # [NQ]
    return count[first_tile].to(torch.int32), blocks[first_tile].to(torch.int32).contiguous()
