"""Inputs for measuring attention methods: q/k/v whose attention looks like a video DiT's.

Random q and k give near-uniform attention, under which every sparse method looks alike. Real
DiT attention is local with smooth spatiotemporal decay; ``structured_qkv`` builds q and k from
random Fourier features of each token's (f, h, w) position, so ``scale * q . k`` approximates
``sharpness * exp(-|x - y|^2 / (2 l^2))`` (a Gaussian kernel in grid coordinates, per-head length
scales), plus content noise.
"""

from __future__ import annotations

import math

import torch

from .patterns.base import as_grid3
from .tokens import TokenLayout


def grid_coordinates(grid: tuple, device=None) -> torch.Tensor:
    """``float32 [N, 3]``: (f, h, w) of every visual token in raster order."""
    f_n, h_n, w_n = as_grid3(grid)
    f, h, w = torch.meshgrid(torch.arange(f_n), torch.arange(h_n), torch.arange(w_n), indexing="ij")
    return torch.stack([f, h, w], -1).reshape(-1, 3).float().to(device)


def structured_qkv(
    layout: TokenLayout,
    batch: int = 1,
    heads: int = 4,
    head_dim: int = 64,
    *,
    length_scale: tuple[float, float, float] = (1.5, 3.0, 3.0),
    sharpness: float = 10.0,
    noise: float = 0.5,
    dtype: torch.dtype = torch.float32,
    device=None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``[batch, S, heads, head_dim]`` with local, smoothly decaying attention.

    Args:
        layout: where visual and text tokens sit (text tokens get random q/k).
        length_scale: Gaussian length scale per (f, h, w) axis in tokens; head ``i`` uses
            ``length_scale * (1 + i / heads)`` so heads differ.
        sharpness: logit difference between a token and a far-away one.
        noise: content noise added to q and k (relative to the positional part's norm).

    >>> layout = TokenLayout((4, 8, 8))
    >>> q, k, v = structured_qkv(layout, heads=2, head_dim=32)
    >>> q.shape
    torch.Size([1, 256, 2, 32])
    """
    gen = torch.Generator().manual_seed(seed)
    coords = grid_coordinates(layout.grid)  # [N, 3]
    n, s = layout.num_visual, layout.seq_len
    d = head_dim
    q = torch.randn(batch, s, heads, d, generator=gen)
    k = torch.randn(batch, s, heads, d, generator=gen)
    v = torch.randn(batch, s, heads, d, generator=gen)
    amplitude = math.sqrt(sharpness * math.sqrt(d))
    scales = torch.tensor(length_scale, dtype=torch.float32)
    vs = layout.visual_start
    for h in range(heads):
        omega = torch.randn(3, d, generator=gen) / (scales * (1 + h / heads))[:, None]
        phase = torch.rand(d, generator=gen) * 2 * math.pi
        features = math.sqrt(2.0 / d) * torch.cos(coords @ omega + phase)  # [N, D], |phi| ~ 1
        for t in (q, k):
            content = t[:, vs : vs + n, h] * (noise / math.sqrt(d))
            t[:, vs : vs + n, h] = amplitude * (features[None] + content)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def relative_l1(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref||_1 / ||ref||_1``."""
    return float((out.double() - ref.double()).abs().sum() / ref.double().abs().sum())
