"""Dense attention: every query attends every key. The reference for every other pattern."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import FULL, MaskMod, Pattern, as_grid3, num_blocks


@dataclass(frozen=True)
class Dense(Pattern):
    """Full softmax attention.

    >>> import diffattn
    >>> diffattn.Dense().attended_fraction(diffattn.TokenLayout((4, 8, 8)))
    1.0
    """

    @property
    def is_dense(self) -> bool:
        return True

    def spec(self) -> tuple:
        return ("Dense",)

    def make_plan(self, layout, head_dim: int, device, block_size=None):
        from ..plan import DensePlan

        return DensePlan(self, layout, head_dim, device, block_size)

    def visual_mask_mod(self, grid: tuple, device=None) -> MaskMod:
        def mask(q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
            return torch.ones(torch.broadcast_shapes(q.shape, kv.shape), dtype=torch.bool, device=q.device)

        return mask

    def block_classes(self, grid: tuple, block_q: int, block_k: int) -> torch.Tensor:
        f_n, h_n, w_n = as_grid3(grid)
        n = f_n * h_n * w_n
        return torch.full((num_blocks(n, block_q), num_blocks(n, block_k)), FULL, dtype=torch.int8)

    def visual_pairs(self, grid: tuple) -> int:
        f_n, h_n, w_n = as_grid3(grid)
        return (f_n * h_n * w_n) ** 2
