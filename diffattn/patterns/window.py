"""Neighborhood (sliding-window) attention with NATTEN / GNA semantics.

Per grid axis of length n, with window k, stride s and dilation r (METHODS section 2):

- dilation splits the axis into r groups (coordinates equal mod r); the rule below runs on
  the group's own coordinate ``i // r`` and its length ``ceil((n - i % r) / r)``;
- queries with the same ``i // s`` share a window centred on the group leader
  ``L = min((i // s) * s + s // 2, n - 1)``;
- the window keeps its full size at borders: the centre is clamped to
  ``[k // 2, n - 1 - (k // 2 + k % 2 - 1)]`` (an even window 2m covers m keys left, the
  query, m - 1 right);
- a key is attended iff it is in the query's dilation group and window on every axis.

Tile-aligned variant (STA): with ``tile`` set, every query tile must share one window that starts
and ends on tile boundaries (e.g. stride == tile and window an odd multiple of the tile). The
attended pairs are the same; only the execution changes: the kernel runs on the tokens in
tile-major order (``diffattn.tile_order``), where every block is full or empty.
"""

from __future__ import annotations

from dataclasses import dataclass

import functools

import torch

from ..tile_order import (MIN_BLOCK, TileOrder, check_tile, largest_block, query_blocks_share_keys, tile_block_classes,
                          tile_block_lists, tile_volume)
from ..tokens import TokenLayout
from .base import MASK_BOUNDS, MASK_WINDOW, PARTIAL, MaskMod, Pattern, as_grid3
from .separable import separable_block_classes


@dataclass(frozen=True)
class AxisWindow:
    """The window rule on one axis of length ``n`` (window ``k``, stride ``s``, dilation ``r``)."""

    n: int
    k: int
    s: int = 1
    r: int = 1

    def window_start(self, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For query coordinates ``i``: (dilation group, first key of the window in group coordinates)."""
        n, k, s, r = self.n, self.k, self.s, self.r
        group = i % r
        gi = i // r
        group_len = (n - group + r - 1) // r
        leader = torch.minimum((gi // s) * s + s // 2, group_len - 1)
        left = k // 2
        right = k // 2 + k % 2 - 1
        centre = torch.minimum(leader.clamp(min=left), group_len - 1 - right)
        return group, centre - left

    def attends(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """Whether coordinate ``q`` attends coordinate ``kv`` on this axis (broadcasting)."""
        group, start = self.window_start(q)
        kg = kv // self.r
        return (kv % self.r == group) & (kg >= start) & (kg < start + self.k)

    def matrix(self) -> torch.Tensor:
        """``bool [n, n]``: query coordinate x key coordinate."""
        idx = torch.arange(self.n)
        return self.attends(idx[:, None], idx[None, :])


def _per_axis(value, name: str, allow_none: bool) -> tuple:
    values = value if isinstance(value, (tuple, list)) else (value,)
    if len(values) == 0 or len(values) > 3:
        raise ValueError(f"SlidingWindow {name} must be an int or a tuple of 1-3 entries, got {value!r}")
    for i, v in enumerate(values):
        if v is None and allow_none:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            allowed = "a positive int or None (whole axis)" if allow_none else "a positive int"
            raise ValueError(f"SlidingWindow {name}[{i}] must be {allowed}, got {v!r}")
    return tuple(values) if isinstance(value, (tuple, list)) else value


@dataclass(frozen=True)
class SlidingWindow(Pattern):
    """Neighborhood attention on the token grid (NATTEN / GNA semantics, FreeSwim, STA).

    Args:
        window: window size per grid axis: an int (every axis), or a tuple with one entry per
            grid axis ``(H, W)`` / ``(F, H, W)``; ``None`` means the whole axis (FreeSwim's
            spatial-only window is ``(None, kh, kw)``).
        stride: queries in groups of ``stride`` along an axis share one window. Default 1.
        dilation: the window samples every ``dilation``-th token. Default 1.
        tile: ``None`` (default: the kernel runs in raster token order), a tile shape per axis,
            or ``True`` (the tile is the stride). With a tile, the kernel runs on tokens in
            tile-major order, where every block is full or empty (STA); the attended pairs are
            exactly those without it. Needs, per axis: every tile's queries share one window
            that starts and ends on tile boundaries (e.g. stride == tile and window an odd
            multiple of the tile; ``None`` windows are fine), the axis a whole number of tiles, dilation 1,
            and a tile volume that is a multiple of 16 (kernel blocks never straddle tiles).
            ``SlidingWindow.tiled`` builds one from the tile and the window in tiles.

    Valid per axis: ``1 <= window * dilation <= axis length`` and ``stride <= window``.

    >>> import diffattn
    >>> p = diffattn.SlidingWindow((3, 5, 5))
    >>> round(p.attended_fraction(diffattn.TokenLayout((8, 16, 16))), 4)
    0.0366
    >>> sta = diffattn.SlidingWindow.tiled(tile=(6, 8, 8), window_tiles=(3, 3, 3))
    >>> sta
    SlidingWindow(window=(18, 24, 24), stride=(6, 8, 8), dilation=1, tile=(6, 8, 8))
    >>> sta.attended_fraction(diffattn.TokenLayout((30, 48, 80))) == diffattn.SlidingWindow(
    ...     (18, 24, 24), stride=(6, 8, 8)).attended_fraction(diffattn.TokenLayout((30, 48, 80)))
    True
    """

    window: object
    stride: object = 1
    dilation: object = 1
    tile: object = None

    def __post_init__(self):
        object.__setattr__(self, "window", _per_axis(self.window, "window", allow_none=True))
        object.__setattr__(self, "stride", _per_axis(self.stride, "stride", allow_none=False))
        object.__setattr__(self, "dilation", _per_axis(self.dilation, "dilation", allow_none=False))
        if self.tile is True:
            object.__setattr__(self, "tile", self.stride)
        elif self.tile is not None:
            object.__setattr__(self, "tile", _per_axis(self.tile, "tile", allow_none=False))
        lengths = {len(v) for v in (self.window, self.stride, self.dilation, self.tile) if isinstance(v, tuple)}
        if len(lengths) > 1:
            raise ValueError(
                f"SlidingWindow window, stride, dilation and tile tuples must have the same length, "
                f"got window={self.window!r}, stride={self.stride!r}, dilation={self.dilation!r}, tile={self.tile!r}"
            )
        dilations = self.dilation if isinstance(self.dilation, tuple) else (self.dilation,)
        if self.tile is not None and any(r != 1 for r in dilations):
            raise ValueError(f"SlidingWindow tile={self.tile!r} needs dilation 1 on every axis, got dilation={self.dilation!r}")

    @classmethod
    def tiled(cls, tile, window_tiles) -> "SlidingWindow":
        """The tile-aligned window (STA): ``window = tile * window_tiles`` and ``stride = tile`` per
        axis, run in tile-major token order.

        Args:
            tile: tile shape in tokens, one int per grid axis (e.g. ``(6, 8, 8)``).
            window_tiles: the window in tiles per axis, odd (``(3, 3, 3)``: each tile attends a
                3 x 3 x 3 cube of tiles, shifted inward at borders); ``None``: the whole axis.

        >>> SlidingWindow.tiled(tile=(4, 8), window_tiles=(None, 3))
        SlidingWindow(window=(None, 24), stride=(4, 8), dilation=1, tile=(4, 8))
        """
        tile = _per_axis(tile, "tile", allow_none=False)
        if not isinstance(tile, tuple) and isinstance(window_tiles, (tuple, list)):
            tile = (tile,) * len(window_tiles)  # one tile edge for every axis
        tiles = tile if isinstance(tile, tuple) else (tile,)
        counts = window_tiles if isinstance(window_tiles, (tuple, list)) else (window_tiles,) * len(tiles)
        if len(counts) != len(tiles):
            raise ValueError(f"SlidingWindow.tiled window_tiles={window_tiles!r} needs one entry per tile axis {tiles!r}")
        for axis, m in enumerate(counts):
            if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1 or m % 2 == 0):
                raise ValueError(f"SlidingWindow.tiled window_tiles[{axis}] must be an odd positive int (a window "
                                 f"centred on its tile) or None (whole axis), got {m!r}")
        window = tuple(None if m is None else m * t for m, t in zip(counts, tiles))
        if not isinstance(tile, tuple):  # an int tile and an int count: the same on every axis
            return cls(window[0], stride=tile, tile=tile)
        return cls(window, stride=tuple(tiles), tile=tuple(tiles))

    def __repr__(self) -> str:
        tile = "" if self.tile is None else f", tile={self.tile!r}"
        return f"SlidingWindow(window={self.window!r}, stride={self.stride!r}, dilation={self.dilation!r}{tile})"

    def _axis_params(self, axis: int) -> tuple:
        """(window, stride, dilation) of one axis; window None means the whole axis."""
        return tuple(v[axis] if isinstance(v, tuple) else v for v in (self.window, self.stride, self.dilation))

    def axes(self, grid: tuple) -> list[AxisWindow]:
        """The rule on each of the three (F, H, W) axes; images get a trivial F axis."""
        self.validate(grid)
        rules = [] if len(grid) == 3 else [AxisWindow(1, 1)]
        for axis, n in enumerate(grid):
            k, s, r = self._axis_params(axis)
            rules.append(AxisWindow(n, n) if k is None else AxisWindow(n, k, s, r))
        return rules

    def validate(self, grid: tuple) -> None:
        ndim = len(grid)
        for name in ("window", "stride", "dilation"):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != ndim:
                raise ValueError(
                    f"SlidingWindow {name}={value!r} has {len(value)} entries but the grid "
                    f"{tuple(grid)} has {ndim} axes; give one entry per axis or a single int"
                )
        for axis, n in enumerate(grid):
            k, s, r = self._axis_params(axis)
            if k is None:
                if r != 1:
                    raise ValueError(f"SlidingWindow dilation[{axis}]={r} needs a window; where window is None it must be 1")
                continue
            if k * r > n:
                raise ValueError(
                    f"SlidingWindow window[{axis}]={k} with dilation {r} spans {k * r} tokens but grid "
                    f"axis {axis} has {n}; allowed: window * dilation <= {n}"
                )
            if s > k:
                raise ValueError(f"SlidingWindow stride[{axis}]={s} is larger than window[{axis}]={k}; allowed: 1 <= stride <= window")
        if self.tile is not None:
            self._validate_tiles(tuple(grid))

    def tile_shape(self, grid: tuple) -> tuple | None:
        """The tile per axis of ``grid`` (None when the pattern runs in raster order)."""
        if self.tile is None:
            return None
        return self.tile if isinstance(self.tile, tuple) else (self.tile,) * len(grid)

    def _validate_tiles(self, grid: tuple) -> None:
        tile = self.tile_shape(grid)
        check_tile(grid, tile)
        volume = tile_volume(tile)
        if volume % MIN_BLOCK:
            raise ValueError(f"SlidingWindow tile={tile} holds {volume} tokens; kernel blocks (powers of two >= "
                             f"{MIN_BLOCK}) must not straddle tiles, so allowed tile volumes are multiples of {MIN_BLOCK}")
        for axis, (n, t) in enumerate(zip(grid, tile)):
            k, s, _ = self._axis_params(axis)
            if k is None:
                continue
            if k % t:
                raise ValueError(f"SlidingWindow window[{axis}]={k} is not a multiple of tile[{axis}]={t}; "
                                 f"allowed: windows on tile boundaries, e.g. an odd multiple of the tile "
                                 f"({3 * t}) with stride == tile")
            problem = _tile_alignment(n, k, s, t)
            if problem == "split":
                raise ValueError(f"SlidingWindow stride[{axis}]={s}: queries of one tile ({t} tokens on axis {axis}) "
                                 f"get different windows; allowed: stride == tile[{axis}]={t}")
            if problem == "offset":
                raise ValueError(f"SlidingWindow window[{axis}]={k} with stride {s} starts off the tile boundaries "
                                 f"(tile[{axis}]={t}): every tile's queries must share one window that starts and "
                                 f"ends on tile boundaries; allowed: e.g. stride == tile and window an odd "
                                 f"multiple of the tile ({3 * t})")

    def tile_order(self, layout: TokenLayout) -> TileOrder | None:
        """The token order the kernel runs in for ``layout`` (None: raster order)."""
        return None if self.tile is None else TileOrder(layout, self.tile_shape(layout.grid))

    def kernel_blocks(self, grid: tuple, head_dim: int, block_size=None) -> tuple[int, int]:
        """As ``Pattern.kernel_blocks``; with a tile, blocks whose tile-order layout has no
        partial block (``tile_blocks``)."""
        if self.tile is None:
            return super().kernel_blocks(grid, head_dim, block_size)
        from ..kernels import kernel_block_size

        block_q, block_k = block_size or kernel_block_size(head_dim)
        return self.tile_blocks(tuple(grid), block_q, block_k, fixed=block_size is not None)

    def tile_blocks(self, grid: tuple, block_q: int, block_k: int, fixed: bool = False) -> tuple[int, int]:
        """Kernel blocks for the tile-order layout, which must have no partial block (the kernel
        evaluates no window mask there).

        ``fixed=False``: ``block_k`` becomes the largest power of two <= it that divides the tile
        volume; ``block_q`` the largest power of two <= it whose query blocks see one key set
        each (a multiple of the tile when neighbouring tiles share their keys). ``fixed=True``:
        the blocks are checked and kept, or a ValueError says why they cannot be used.
        """
        return _tile_blocks(self.spec(), tuple(grid), block_q, block_k, fixed)

    def spec(self) -> tuple:
        return ("SlidingWindow", self.window, self.stride, self.dilation, self.tile)

    def visual_mask_mod(self, grid: tuple, device=None) -> MaskMod:
        rules = self.axes(grid)
        _, h_n, w_n = as_grid3(grid)

        def mask(q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
            qc = (q // (h_n * w_n), (q // w_n) % h_n, q % w_n)
            kc = (kv // (h_n * w_n), (kv // w_n) % h_n, kv % w_n)
            out = rules[0].attends(qc[0], kc[0])
            for rule, a, b in zip(rules[1:], qc[1:], kc[1:]):
                out = out & rule.attends(a, b)
            return out

        return mask

    def block_classes(self, grid: tuple, block_q: int, block_k: int) -> torch.Tensor:
        """Block classes over the visual tokens, in raster order, or in tile-major order when the
        pattern has a tile (then every block that does not straddle tiles is full or empty)."""
        matrices = [rule.matrix() for rule in self.axes(grid)]
        tile = self.tile_shape(grid)
        if tile is None:
            return separable_block_classes(matrices, as_grid3(grid), block_q, block_k)
        tile3 = as_grid3(tile)
        return tile_block_classes(self._per_tile(grid), as_grid3(grid), tile3, block_q, block_k)

    def _per_tile(self, grid: tuple) -> list[torch.Tensor]:
        """Per axis, ``bool [n_a / t_a, n_a / t_a]``: query tile attends key tile (whole tiles
        attend whole tiles)."""
        tile3 = as_grid3(self.tile_shape(grid))
        return [rule.matrix()[::t, ::t] for rule, t in zip(self.axes(grid), tile3)]

    def block_lists(self, grid: tuple, block_q: int, block_k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A tiled window's visited blocks straight from its tiles (O(kept blocks)) when no block
        straddles tiles with different keys; None otherwise and for raster-order windows."""
        if self.tile is None:
            return None
        return tile_block_lists(self._per_tile(grid), as_grid3(grid), as_grid3(self.tile_shape(grid)), block_q, block_k)

    def _blocks_all_full_or_empty(self, grid: tuple, block_q: int, block_k: int) -> bool:
        """No partial block in tile order: decided from the tiles in O(tiles) where key blocks lie
        inside tiles, else from the block classes."""
        tile3 = as_grid3(self.tile_shape(grid))
        if tile_volume(tile3) % block_k == 0:
            shared = query_blocks_share_keys(self._per_tile(grid), as_grid3(grid), tile3, block_q)
            if shared is not None:
                return shared
        return not bool((self.block_classes(grid, block_q, block_k) == PARTIAL).any())

    def visual_pairs(self, grid: tuple) -> int:
        pairs = 1
        for rule in self.axes(grid):
            pairs *= int(rule.matrix().sum())
        return pairs

    def kernel_mask(self, grid: tuple) -> tuple[int, tuple[int, ...]]:
        if self.tile is not None:
            return MASK_BOUNDS, ()  # tile order: no partial blocks, nothing to mask
        params = []
        for rule in self.axes(grid):
            params += [rule.n, rule.k, rule.s, rule.r]
        return MASK_WINDOW, tuple(params)


@torch.compiler.assume_constant_result
def _tile_alignment(n: int, k: int, s: int, t: int) -> str:
    """How a window (k, stride s) on an axis of n misses tiles of t: "split" (one tile's queries get
    different windows), "offset" (a window starts off a tile boundary) or "" (aligned). A constant
    for ``torch.compile``, so validation does not branch on tensor data while tracing; cached, as
    every attention call validates its pattern."""
    return _tile_alignment_cached(n, k, s, t)


@functools.lru_cache(maxsize=256)
def _tile_alignment_cached(n: int, k: int, s: int, t: int) -> str:
    starts = AxisWindow(n, k, s).window_start(torch.arange(n))[1].reshape(n // t, t)
    if bool((starts != starts[:, :1]).any()):
        return "split"
    return "offset" if bool((starts[:, 0] % t).any()) else ""


@torch.compiler.assume_constant_result
def _tile_blocks(spec: tuple, grid: tuple, block_q: int, block_k: int, fixed: bool) -> tuple[int, int]:
    """``SlidingWindow.tile_blocks`` of the pattern ``spec`` (plain values, so ``torch.compile`` takes
    the result as a constant instead of tracing the layout builder)."""
    return _tile_blocks_cached(spec, grid, block_q, block_k, fixed)


@functools.lru_cache(maxsize=64)
def _tile_blocks_cached(spec: tuple, grid: tuple, block_q: int, block_k: int, fixed: bool) -> tuple[int, int]:
    pattern = SlidingWindow(*spec[1:])
    pattern.validate(grid)
    if fixed:
        if not pattern._blocks_all_full_or_empty(grid, block_q, block_k):
            volume = tile_volume(pattern.tile_shape(grid))
            raise ValueError(f"block_size=({block_q}, {block_k}) cuts the {volume}-token tiles of {pattern!r} into "
                             f"partial blocks; allowed: powers of two that divide {volume} (at most "
                             f"{largest_block(volume)}), or block_size=None")
        return block_q, block_k
    volume = tile_volume(pattern.tile_shape(grid))
    block_k = largest_block(volume, block_k)
    smallest = largest_block(volume, block_q)  # never straddles a tile
    while block_q > smallest and not pattern._blocks_all_full_or_empty(grid, block_q, block_k):
        block_q //= 2
    return block_q, block_k
