"""BlockTopK: dynamic block-sparse attention selected from block-mean scores (METHODS section 4;
SpargeAttn, Rectified SpaAttn, PSA).

Per call and per (batch, head), q and k are mean-pooled over blocks of ``block`` visual tokens
(q̄_I, k̄_J); pooled scores ``P_IJ = softmax_J(scale * q̄_I . k̄_J)``. Each query block keeps the
top ``ceil(density * NK)`` key blocks, or the fewest whose cumulative P reaches ``cdf`` (at
least one). Guards: the diagonal block and the first (sink) block are always kept; with
``similarity`` set, a key block whose tokens are not self-similar (mean pairwise cosine below
it) is kept for every query block, and a query block that is not self-similar keeps every key
block (their means are poor proxies). Text tokens stay dense. Kept blocks are computed whole.

Ties: blocks with equal scores are ranked by increasing key-block index (a stable descending
sort), so a tie at the top-k boundary or at the cdf boundary keeps the lower-indexed blocks.
The top-k mode ranks the logits ``scale * q̄_I . k̄_J`` rather than P (the same order, since
softmax is monotone, without the ties that rounding in exp can create). The Triton selection
kernel (``diffattn.kernels.block_selection``) follows the same rules; this torch code is its
reference.

Non-finite pooled scores (NaN or +-inf, from NaN / inf in q or k) are kept, in addition to the
top-k / cdf choice made among the finite scores (where they rank last): a key block holding a
NaN key is then attended by every query block, and a query block holding a NaN query attends
every key block. So a NaN in q or k makes exactly the rows NaN that dense attention makes NaN
(never silently finite because the poisoned block was dropped), and the other rows stay exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import EMPTY, FULL, MaskMod, Pattern, num_blocks


def block_means(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean over blocks of ``block`` tokens: ``[B, N, H, D] -> [B, H, NB, D]`` (float32); the
    last block may be short."""
    b, n, h, d = x.shape
    nb = num_blocks(n, block)
    pad = nb * block - n
    xf = x.float()
    if pad:
        xf = torch.cat([xf, xf.new_zeros(b, pad, h, d)], 1)
    sums = xf.view(b, nb, block, h, d).sum(2)  # [B, NB, H, D]
    counts = torch.full((nb,), float(block), device=x.device)
    counts[-1] = block - pad
    return (sums / counts[None, :, None, None]).transpose(1, 2)


def block_self_similarity(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean pairwise cosine similarity of the tokens of each block: ``[B, H, NB]`` (a block of
    one token counts as similar, 1.0)."""
    b, n, h, d = x.shape
    nb = num_blocks(n, block)
    pad = nb * block - n
    unit = torch.nn.functional.normalize(x.float(), dim=-1)
    if pad:
        unit = torch.cat([unit, unit.new_zeros(b, pad, h, d)], 1)
    s = unit.view(b, nb, block, h, d).sum(2)  # [B, NB, H, D]
    counts = torch.full((nb,), float(block), device=x.device)
    counts[-1] = block - pad
    pairs = (s * s).sum(-1) - counts[None, :, None]  # sum over i != j of cos
    sim = pairs / (counts * (counts - 1)).clamp(min=1)[None, :, None]
    sim = torch.where(counts[None, :, None] > 1, sim, torch.ones_like(sim))
    return sim.transpose(1, 2)


@dataclass(frozen=True)
class BlockTopK(Pattern):
    """Dynamic block selection from pooled scores.

    Args:
        density: fraction of key blocks kept per query block, in (0, 1]; or
        cdf: keep the fewest key blocks whose pooled softmax mass reaches this, in (0, 1].
            Exactly one of density / cdf.
        block: selection block size in tokens, a power of two >= 16. Default 64.
        keep_diagonal: always keep the query block's own key block. Default True.
        keep_sink: always keep the first key block. Default True.
        similarity: keep blocks whose mean pairwise cosine is below this (None: off). Default None.

    >>> import torch, diffattn
    >>> layout = diffattn.TokenLayout((4, 16, 16))
    >>> q = k = v = torch.randn(1, layout.seq_len, 2, 32)
    >>> diffattn.attention(q, k, v, diffattn.BlockTopK(density=0.25), layout=layout).shape
    torch.Size([1, 1024, 2, 32])
    """

    density: float | None = None
    cdf: float | None = None
    block: int = 64
    keep_diagonal: bool = True
    keep_sink: bool = True
    similarity: float | None = None

    static = False

    def __post_init__(self):
        if (self.density is None) == (self.cdf is None):
            raise ValueError(f"BlockTopK needs exactly one of density and cdf, got density={self.density!r}, cdf={self.cdf!r}")
        for name in ("density", "cdf"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                    raise ValueError(f"BlockTopK {name} must be in (0, 1], got {value!r}")
                object.__setattr__(self, name, float(value))
        b = self.block
        if isinstance(b, bool) or not isinstance(b, int) or b < 16 or b & (b - 1):
            raise ValueError(f"BlockTopK block must be a power of two >= 16, got {b!r}")
        for name in ("keep_diagonal", "keep_sink"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"BlockTopK {name} must be a bool, got {getattr(self, name)!r}")
        if self.similarity is not None and (isinstance(self.similarity, bool) or not isinstance(self.similarity, (int, float)) or not -1 <= self.similarity <= 1):
            raise ValueError(f"BlockTopK similarity must be None or in [-1, 1], got {self.similarity!r}")

    def spec(self) -> tuple:
        return ("BlockTopK", self.density, self.cdf, self.block, self.keep_diagonal, self.keep_sink, self.similarity)

    def make_plan(self, layout, head_dim: int, device, block_size=None):
        from ..plan import SelectedPlan

        return SelectedPlan(self, layout, head_dim, device, block_size)

    def kernel_block_limit(self) -> int | None:
        return self.block

    @property
    def selector(self) -> "BlockTopK":
        """The selection rule (the pattern itself; Piecewise has one too)."""
        return self

    def keep_count(self, num_key_blocks: int) -> int:
        """Key blocks kept per query block in the density mode (``ceil(density * NK)``, at least
        one); 0 in the cdf mode, where the count depends on the scores."""
        if self.density is None:
            return 0
        return min(num_key_blocks, max(1, math.ceil(self.density * num_key_blocks)))

    def select(self, q_vis: torch.Tensor, k_vis: torch.Tensor, scale: float) -> torch.Tensor:
        """Kept key blocks per query block: ``bool [B, H, NQ, NK]`` from visual q, k ``[B, N, H, D]``
        (the torch reference of the selection kernel)."""
        qm = block_means(q_vis, self.block)
        km = block_means(k_vis, self.block)
        logits = torch.matmul(qm, km.transpose(-1, -2)) * scale  # [B, H, NQ, NK]
        nq, nk = logits.shape[-2:]
        non_finite = ~torch.isfinite(logits)  # kept below; ranked last (-inf) in the choice
        logits = logits.masked_fill(non_finite, float("-inf"))
        if self.density is not None:
            ranked = logits.sort(dim=-1, descending=True, stable=True).indices  # ties: lower index first
            keep = torch.zeros_like(logits, dtype=torch.bool)
            keep.scatter_(-1, ranked[..., : self.keep_count(nk)], True)
        else:
            sorted_p, order = torch.softmax(logits, dim=-1).sort(dim=-1, descending=True, stable=True)
            before = torch.nn.functional.pad(sorted_p.cumsum(-1)[..., :-1], (1, 0))  # mass ranked above
            chosen = before < self.cdf  # the first block always; then until cdf is reached
            keep = torch.zeros_like(chosen).scatter_(-1, order, chosen)
        keep |= non_finite
        if self.keep_diagonal:
            idx = torch.arange(min(nq, nk), device=keep.device)
            keep[..., idx, idx] = True
        if self.keep_sink:
            keep[..., 0] = True
        if self.similarity is not None:
            keep |= (block_self_similarity(k_vis, self.block) < self.similarity)[:, :, None, :]
            keep |= (block_self_similarity(q_vis, self.block) < self.similarity)[:, :, :, None]
        return keep

    # Static-pattern methods do not apply: the layout depends on the data.
    def visual_mask_mod(self, grid: tuple, device=None) -> MaskMod:
        raise ValueError("BlockTopK selects blocks from q and k; use diffattn.attention (or selected_mask_mod)")

    def block_classes(self, grid: tuple, block_q: int, block_k: int) -> torch.Tensor:
        raise ValueError("BlockTopK selects blocks from q and k per call; it has no static layout")

    def visual_pairs(self, grid: tuple) -> int:
        raise ValueError("BlockTopK's density depends on the data; see the selected layout's block_density")


def selected_mask_mod(keep: torch.Tensor, block: int) -> MaskMod:
    """Element mask of a selection ``keep [B, H, NQ, NK]`` on visual indices -> ``[B, H, *idx]``."""

    def mask(q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return keep[:, :, q // block, kv // block]

    return mask


def selected_classes(keep: torch.Tensor, block: int, block_q: int, block_k: int, n: int) -> torch.Tensor:
    """FULL / EMPTY classes at kernel block sizes (dividing ``block``): ``int8 [B, H, NQk, NKk]``."""
    rows = torch.arange(num_blocks(n, block_q), device=keep.device) * block_q // block
    cols = torch.arange(num_blocks(n, block_k), device=keep.device) * block_k // block
    kept = keep[:, :, rows[:, None], cols[None, :]]
    return kept.to(torch.int8) * (FULL - EMPTY) + EMPTY  # no scalar tensor copied to the device

