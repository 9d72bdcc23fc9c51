"""What every attention pattern provides.

A pattern says which keys each query attends to. It is a frozen (hashable) dataclass so
block layouts can be cached per pattern. Every pattern offers

Methods take ``grid``, the TokenLayout's ``(H, W)`` or ``(F, H, W)``.

- ``visual_mask_mod(grid)``: ``(q_idx, kv_idx) -> bool`` on visual token indices, the
  element-level definition (FlexAttention's ``mask_mod`` vocabulary);
- ``block_classes(grid, block_q, block_k)``: ``int8 [NQ, NK]`` with EMPTY / PARTIAL / FULL
  per (query block, key block), built analytically (never from an S x S mask);
- ``visual_pairs(grid)``: the exact number of attended (query, key) visual pairs;
- ``kernel_mask(grid)``: what the kernel computes inside PARTIAL blocks.

Text tokens are handled here, once, for every pattern: dense in both directions.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..tokens import TokenLayout

MaskMod = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

EMPTY, PARTIAL, FULL = 0, 1, 2

# Values of the kernel's MASK_KIND: what is computed inside a partial block.
MASK_BOUNDS = 0  # only sequence bounds (block-granular patterns)
MASK_WINDOW = 1  # neighborhood window on the (F, H, W) grid, plus bounds


class Pattern:
    """Base class of attention patterns (see the module docstring)."""

    #: True for patterns whose layout depends only on geometry, not on q/k values.
    static: bool = True
    #: True for patterns that account for every key (exactly or approximately): no external part.
    covers_every_key: bool = False

    def validate(self, grid: tuple) -> None:
        """Raise ValueError if this pattern cannot be applied to ``grid``."""

    def visual_mask_mod(self, grid: tuple, device=None) -> MaskMod:
        raise NotImplementedError

    def block_classes(self, grid: tuple, block_q: int, block_k: int) -> torch.Tensor:
        raise NotImplementedError

    def visual_pairs(self, grid: tuple) -> int:
        raise NotImplementedError

    def kernel_mask(self, grid: tuple) -> tuple[int, tuple[int, ...]]:
        """``(mask_kind, params)`` for the kernel's partial blocks."""
        return MASK_BOUNDS, ()

    @property
    def is_dense(self) -> bool:
        return False

    def spec(self) -> tuple:
        """``(class name, *field values)``: plain values that rebuild the pattern
        (``pattern_from_spec``), so compiled code can key caches without the object."""
        raise NotImplementedError

    def block_lists(self, grid: tuple, block_q: int, block_k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The visited key blocks as ``(count int32 [NQ], indices int32 [NQ, W])``, all of them
        full, built without the ``[NQ, NK]`` class matrix; None (the default) when the pattern has
        no such builder for these blocks and ``block_classes`` is used."""
        return None

    def kernel_block_limit(self) -> int | None:
        """Largest kernel block size this pattern supports (None: any)."""
        return None

    # --- how the kernels run it (diffattn.plan) -------------------------------------

    def kernel_blocks(self, grid: tuple, head_dim: int, block_size=None) -> tuple[int, int]:
        """The kernel's ``(block_q, block_k)`` on ``grid``: ``block_size`` or the head dim's
        default, capped by ``kernel_block_limit``."""
        from ..kernels import kernel_block_size

        block_q, block_k = block_size or kernel_block_size(head_dim)
        limit = self.kernel_block_limit()
        if block_size is None and limit is not None:
            block_q, block_k = min(block_q, limit), min(block_k, limit)
        if limit is not None and (limit % block_q or limit % block_k):
            raise ValueError(f"block_size (block_q, block_k) = {(block_q, block_k)!r}: {type(self).__name__} keeps "
                             f"whole blocks of {limit} tokens, so kernel blocks must divide {limit}")
        return block_q, block_k

    def tile_order(self, layout: TokenLayout):
        """The token order the kernel runs in for ``layout``: a ``TileOrder``, or None (raster)."""
        return None

    def make_plan(self, layout: TokenLayout, head_dim: int, device, block_size=None):
        """The kernels' plan at one call site (``diffattn.plan``); called once per call site.
        Static patterns get a ``StaticPlan`` (their layouts built here, on ``device``)."""
        from ..plan import StaticPlan

        if not self.static:
            raise NotImplementedError(f"{type(self).__name__} is dynamic and must define make_plan")
        return StaticPlan(self, layout, head_dim, device, block_size)

    def reference_attention(self, q, k, v, layout: TokenLayout, scale: float, key_padding=None, keep=None):
        """The torch reference (``masked_attention_reference`` under this pattern's mask);
        ``keep``: a dynamic pattern's kept blocks ``bool [B, H, NQ, NK]``."""
        from ..reference import masked_attention_reference

        if self.is_dense:
            mask_mod = None
        elif self.static:
            mask_mod = self.mask_mod(layout, q.device)
        else:
            from .topk import selected_mask_mod

            mask_mod = sequence_mask_mod(selected_mask_mod(keep, self.block), layout)
        return masked_attention_reference(q, k, v, mask_mod, scale=scale, key_padding=key_padding)

    # --- shared, text-aware helpers -------------------------------------------------

    def mask_mod(self, layout: TokenLayout, device=None) -> MaskMod:
        """``(q_idx, kv_idx) -> bool`` over the whole sequence of ``layout``, text included.

        ``device``: where lookup tables live (default CPU; they follow the indices' device
        otherwise, at the cost of a copy per call).

        >>> import diffattn, torch
        >>> mm = diffattn.SlidingWindow(3).mask_mod(diffattn.TokenLayout((4, 4), text_len=2))
        >>> bool(mm(torch.tensor(0), torch.tensor(17)))   # text query sees everything
        True
        """
        self.validate(layout.grid)
        return sequence_mask_mod(self.visual_mask_mod(layout.grid, device), layout)

    def attended_fraction(self, layout: TokenLayout) -> float | None:
        """Fraction of the S x S (query, key) pairs this pattern attends, text included; None for a
        dynamic pattern (BlockTopK, Piecewise), whose kept blocks depend on q and k (see
        :func:`diffattn.select_blocks`)."""
        if not self.static:
            return None
        self.validate(layout.grid)
        n, t = layout.num_visual, layout.text_len
        pairs = self.visual_pairs(layout.grid) + 2 * n * t + t * t
        return pairs / layout.seq_len**2


def sequence_mask_mod(visual: MaskMod, layout: TokenLayout) -> MaskMod:
    """A mask on visual indices extended to the whole sequence: text is attended densely in
    both directions. The visual mask may return extra leading (batch, head) dims."""
    vs, nv = layout.visual_start, layout.num_visual

    def mask(q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        qv, kv = q_idx - vs, kv_idx - vs
        q_vis = (qv >= 0) & (qv < nv)
        k_vis = (kv >= 0) & (kv < nv)
        inside = visual(qv.clamp(0, nv - 1), kv.clamp(0, nv - 1))
        return torch.where(q_vis & k_vis, inside, torch.ones_like(inside))

    return mask


def pattern_from_spec(spec: tuple) -> "Pattern":
    """Inverse of ``Pattern.spec``."""
    from . import BlockTopK, Dense, Piecewise, Radial, SlidingWindow

    classes = {cls.__name__: cls for cls in (BlockTopK, Dense, Piecewise, Radial, SlidingWindow)}
    return classes[spec[0]](*spec[1:])


def as_grid3(grid: tuple) -> tuple[int, int, int]:
    """``(H, W)`` -> ``(1, H, W)``; ``(F, H, W)`` unchanged."""
    return tuple(grid) if len(grid) == 3 else (1, *grid)


def num_blocks(n: int, block: int) -> int:
    return -(-n // block)


def block_sizes(n: int, block: int) -> torch.Tensor:
    """Number of tokens in each of the ``ceil(n / block)`` blocks, ``int64 [NB]``."""
    starts = torch.arange(0, n, block, dtype=torch.int64)
    return torch.clamp(n - starts, max=block)
