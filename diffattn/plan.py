"""Attention plans: what the kernels need at one call site, built once.

A call site is (pattern, token layout, head dim, device, kernel block size). Its first Triton
call builds a plan: the pattern checked against the grid, the kernel's block sizes, the token
order (a tile order, or raster), the in-kernel mask parameters, the geometry, and for a static
pattern its block layout tensors on the device. Later calls find the plan in a dictionary and
launch; nothing is validated, looked up or rebuilt per call. Each pattern says which plan it
needs (``Pattern.make_plan``): a new pattern is one module that knows how to make its plan, and
``diffattn.attention`` and the partials only execute plans.

- ``StaticPlan``: layouts that depend on geometry only (windows, Radial). The step cache's
  external part needs no layout of its own: the kernels walk the complement of the pattern's.
- ``DensePlan``: every row dense, no layout.
- ``SelectedPlan``: BlockTopK; the kept blocks come from q and k on every call (or the caller's
  ``selection``), turned into fixed-width block lists on the device without a host read.
- ``PiecewisePlan``: Piecewise (``diffattn.patterns.piecewise``), exact critical blocks plus
  the Taylor-approximated rest; it has no external part.

>>> import diffattn
>>> from diffattn.plan import get_plan
>>> plan = get_plan(diffattn.SlidingWindow((3, 5, 5)), diffattn.TokenLayout((4, 8, 8), text_len=8), 64, "cpu")
>>> (plan.block_q, plan.block_k, plan.mask_kind)
(128, 64, 1)
>>> get_plan(diffattn.SlidingWindow((3, 5, 5)), diffattn.TokenLayout((4, 8, 8), text_len=8), 64, "cpu") is plan
True
"""

from __future__ import annotations

import torch

from .block_layout import BlockLayout, layout_tensors
from .patterns.base import MASK_BOUNDS, Pattern, as_grid3
from .tile_order import TileOrder
from .tokens import TokenLayout

PLANS: dict = {}
MAX_PLANS = 512  # call sites kept; the dictionary is emptied when it fills (plans rebuild on demand)


def plan_key(pattern: Pattern, layout: TokenLayout, head_dim: int, device, block_size=None) -> tuple:
    """Plain values naming a call site (torch.compile can trace the lookup)."""
    return (pattern.spec(), layout.grid, layout.text_len, layout.text_first, head_dim, str(device),
            None if block_size is None else tuple(block_size))


def get_plan(pattern: Pattern, layout: TokenLayout, head_dim: int, device, block_size=None) -> "AttentionPlan":
    """The plan of a call site, built on first use (``pattern.make_plan``) and kept."""
    key = plan_key(pattern, layout, head_dim, device, block_size)
    plan = PLANS.get(key)
    if plan is None:
        if len(PLANS) >= MAX_PLANS:
            PLANS.clear()
        pattern.validate(layout.grid)
        plan = pattern.make_plan(layout, head_dim, torch.device(device), block_size)
        PLANS[key] = plan
    return plan


def in_kernel_order(order: TileOrder | None, *tensors: torch.Tensor) -> tuple:
    """``[B, S, ...]`` tensors in the kernel's token order (unchanged when ``order`` is None)."""
    return tensors if order is None else tuple(order.to_tiles(t) for t in tensors)


def in_raster_order(order: TileOrder | None, *tensors: torch.Tensor) -> tuple:
    """The kernel's ``[B, S, ...]`` results back in raster token order."""
    return tensors if order is None else tuple(order.from_tiles(t) for t in tensors)


class AttentionPlan:
    """The block-sparse kernels' launch for one call site.

    Attributes:
        pattern, layout: what it was built for.
        block_q, block_k: kernel block sizes.
        order: the token order the kernel runs in (TileOrder), or None (raster).
        geometry: ``[visual_start, num_visual, text_start, text_len, grid_h, grid_w]``.
        window: the in-kernel mask parameters (12 ints), ``mask_kind``: MASK_BOUNDS / MASK_WINDOW.
    """

    covers_every_key = False  # True: no external part (Piecewise)

    def __init__(self, pattern: Pattern, layout: TokenLayout, head_dim: int, device: torch.device, block_size=None):
        self.pattern, self.layout, self.device = pattern, layout, torch.device(device)
        self.block_q, self.block_k = pattern.kernel_blocks(layout.grid, head_dim, block_size)
        self.order = pattern.tile_order(layout)
        _, grid_h, grid_w = as_grid3(layout.grid)
        self.geometry = [layout.visual_start, layout.num_visual, layout.text_start, layout.text_len, grid_h, grid_w]
        self.mask_kind, params = pattern.kernel_mask(layout.grid)
        self.window = list(params) + [1] * (12 - len(params))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.pattern!r}, {self.layout}, blocks={self.block_q}x{self.block_k}, "
                f"tile_order={self.order is not None}, device={self.device})")

    # the block lists of each kernel launch
    def internal_blocks(self, q, k, scale: float, selection) -> tuple:
        """``(full_num, full_idx, part_num, part_idx)`` of the pattern's keys."""
        raise NotImplementedError

    def check_external(self) -> None:
        """Raise if the kernels cannot walk this layout's complement (see ``StaticPlan``)."""

    # launches
    def attention(self, q, k, v, scale: float, text_lens=None, selection=None) -> tuple:
        from .kernels import block_sparse_attention, launch

        tensors = self.internal_blocks(q, k, scale, selection)
        q, k, v = in_kernel_order(self.order, q, k, v)
        out, lse = launch(block_sparse_attention, q, k, v, *tensors, self.geometry, self.window, self.mask_kind, scale,
                          self.block_q, self.block_k, text_lens)
        return in_raster_order(self.order, out, lse)

    def external(self, q, k, v, scale: float, selection=None) -> tuple:
        from .kernels import block_sparse_attention, launch

        self.check_external()  # the kernel walks the complement of the pattern's own layout
        tensors = self.internal_blocks(q, k, scale, selection)
        q, k, v = in_kernel_order(self.order, q, k, v)
        out, lse = launch(block_sparse_attention, q, k, v, *tensors, self.geometry, self.window, self.mask_kind, scale,
                          self.block_q, self.block_k, None, True)
        return in_raster_order(self.order, out, lse)

    def partials(self, q, k, v, scale: float, text_lens=None, selection=None) -> tuple:
        from .kernels import block_sparse_partials, launch

        self.check_external()
        internal = self.internal_blocks(q, k, scale, selection)
        q, k, v = in_kernel_order(self.order, q, k, v)
        partials = launch(block_sparse_partials, q, k, v, *internal, self.geometry, self.window, self.mask_kind,
                          scale, self.block_q, self.block_k, text_lens)
        return in_raster_order(self.order, *partials)


class DensePlan(AttentionPlan):
    """Every row attends every key: the kernel's dense rows, no layout."""

    def __init__(self, pattern, layout, head_dim, device, block_size=None):
        super().__init__(pattern, layout, head_dim, device, block_size)
        self.geometry = [0, 0] + self.geometry[2:]  # no visual block: every row is a dense row
        empty = torch.zeros((1, 1, 1), dtype=torch.int32, device=self.device)
        empty_idx = torch.zeros((1, 1, 1, 1), dtype=torch.int32, device=self.device)
        self._blocks = (empty, empty_idx, empty, empty_idx)

    def internal_blocks(self, q, k, scale, selection):
        return self._blocks


class StaticPlan(AttentionPlan):
    """A pattern whose block layout depends on the geometry only; its layouts live on the device."""

    def __init__(self, pattern, layout, head_dim, device, block_size=None):
        super().__init__(pattern, layout, head_dim, device, block_size)
        self._args = (pattern.spec(), layout.grid, self.block_q, self.block_k, str(self.device))
        self._internal = layout_tensors(*self._args)
        self._external_checked = False

    def internal_blocks(self, q, k, scale, selection):
        return self._internal

    def check_external(self) -> None:
        if self._external_checked or torch.compiler.is_compiling():
            return
        from .partials import max_partial_blocks

        if self.mask_kind == MASK_BOUNDS and max_partial_blocks(*self._args[:4]) > 1:
            # without a window mask the kernels take a partial block for the short last one
            raise ValueError(f"{self.pattern!r} has partial blocks that only sequence bounds mask; the partials "
                             "kernels cannot run it (use impl='reference')")
        self._external_checked = True


class SelectedPlan(AttentionPlan):
    """A pattern that keeps whole blocks chosen from q and k on every call (BlockTopK)."""

    def __init__(self, pattern, layout, head_dim, device, block_size=None):
        super().__init__(pattern, layout, head_dim, device, block_size)
        n, block = layout.num_visual, pattern.block
        # kernel block -> selection block, once: the layout of a call is one gather
        self._rows = torch.arange(-(-n // self.block_q), device=self.device) * self.block_q // block
        self._cols = torch.arange(-(-n // self.block_k), device=self.device) * self.block_k // block

    def kept(self, q, k, scale, selection) -> torch.Tensor:
        """``bool [B, H, NQ, NK]`` at the kernel's blocks."""
        from .attention import _select

        keep = _select(self.pattern, q, k, self.layout, scale, selection, "triton")
        return keep[:, :, self._rows[:, None], self._cols[None, :]]

    def _blocks(self, kept: torch.Tensor) -> tuple:
        from .patterns.base import EMPTY, FULL

        classes = kept.to(torch.int8) * (FULL - EMPTY) + EMPTY
        blocks = BlockLayout.from_classes(classes, self.block_q, self.block_k, self.layout.num_visual, fixed_width=True)
        return blocks.full_num, blocks.full_idx, blocks.part_num, blocks.part_idx

    def internal_blocks(self, q, k, scale, selection):
        return self._blocks(self.kept(q, k, scale, selection))


class PiecewisePlan(AttentionPlan):
    """Piecewise: the critical blocks exact, the rest by its Taylor terms, one kernel; no external part."""

    covers_every_key = True

    def __init__(self, pattern, layout, head_dim, device, block_size=None):
        super().__init__(pattern, layout, head_dim, device, block_size)
        self.first_order = pattern.first_order if pattern.order == 1 else None
        if self.first_order == "exact":
            raise ValueError("Piecewise first_order='exact' has no kernel: its per-block term costs as much as dense "
                             "attention (O(S * NK * d^2)); use impl='reference', or first_order='pooled', 'shared' "
                             "or 'lowrank'")
        self.kind = {None: 0, "pooled": 1, "shared": 2, "lowrank": 3}[self.first_order]

    def attention(self, q, k, v, scale, text_lens=None, selection=None):
        from .attention import _select
        from .kernels import launch, piecewise_attention
        from .patterns.piecewise import block_statistics
        from .patterns.topk import selected_classes

        layout, blk = self.layout, self.pattern.block
        vs, nv = layout.visual_start, layout.num_visual
        q_vis, k_vis, v_vis = q[:, vs : vs + nv], k[:, vs : vs + nv], v[:, vs : vs + nv]
        keep = _select(self.pattern, q, k, layout, scale, selection, "triton")
        blocks = BlockLayout.from_classes(selected_classes(keep, blk, blk, blk, nv), blk, blk, nv, fixed_width=True)
        stats = block_statistics(k_vis, v_vis, blk, self.first_order, self.pattern.rank)
        out, lse, share = launch(
            piecewise_attention, q, k, v, blocks.full_num, blocks.full_idx, blocks.part_num, blocks.part_idx, keep.to(torch.int8),
            stats["k_mean"], stats["v_sum"], stats["size"], [vs, nv, layout.text_start, layout.text_len], scale, blk,
            self.kind, text_lens, stats.get("u"), stats.get("w"))
        if self.first_order in ("pooled", "shared"):
            out[:, vs : vs + nv] += first_order_term(q_vis, share[:, vs : vs + nv], keep, stats, self.first_order,
                                                     blk, scale).to(out.dtype)
        return out, lse

    def _no_external(self, *args, **kwargs):
        raise ValueError("Piecewise already covers every key (exactly or approximately): it has no external part")

    external = partials = _no_external


def first_order_term(q_vis, share, keep, stats: dict, first_order: str, block: int, scale: float) -> torch.Tensor:
    """The pooled / shared first-order numerator term divided by each row's denominator:
    ``scale * (share / norm) * (q @ H)`` ``[B, N, H, D]`` float32, with ``share = l_approx / l`` from
    the kernel, ``H`` the query block's pooled matrix (``norm`` its pooled size) or the head's sum
    over all blocks (``norm = N``). A batched matrix product outside the kernel (O(S d^2))."""
    from .patterns.piecewise import pooled_first_order

    b, n, h, d = q_vis.shape
    if first_order == "shared":
        qh = torch.einsum("bnhd,bhde->bnhe", q_vis.float(), stats["h_sum"])
        return (scale / n) * share[..., None] * qh
    pooled_h, pooled_size = pooled_first_order(q_vis, keep, stats, block, scale)  # [B, H, NQ, D, D], [B, H, NQ]
    nq = pooled_h.shape[2]
    q_blocks = torch.nn.functional.pad(q_vis.float(), (0, 0, 0, 0, 0, nq * block - n)).view(b, nq, block, h, d)
    qh = torch.einsum("bnthd,bhnde->bnthe", q_blocks, pooled_h).reshape(b, nq * block, h, d)[:, :n]
    norm = pooled_size.transpose(1, 2).repeat_interleave(block, dim=1)[:, :n]  # [B, N, H]
    return scale * (share / norm)[..., None] * qh
