"""BlockLayout: which key blocks each query block visits, split into full and partial blocks.

FlexAttention's ``BlockMask`` vocabulary: per (batch, head, query block) the kernel reads
``full_num`` / ``full_idx`` (blocks computed without an element mask) and ``part_num`` /
``part_idx`` (blocks that need the pattern's mask, or the sequence bounds, inside the kernel).

A layout covers the visual tokens of a TokenLayout only: block 0 starts at the first visual
token. Text tokens are dense in both directions and the kernel handles them without a layout,
so the same layout serves any text length.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .patterns.base import EMPTY, FULL, PARTIAL, Pattern, as_grid3, block_sizes, num_blocks, pattern_from_spec


def _indices(selected: torch.Tensor, fixed_width: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """bool ``[..., NQ, NK]`` -> (count ``int32 [..., NQ]``, ascending indices ``int32 [..., NQ, W]``)
    with ``W = max(1, count)``, or ``W = NK`` with ``fixed_width`` (no device value read on the host)."""
    count = selected.sum(-1, dtype=torch.int32)
    if fixed_width:
        width = max(1, selected.shape[-1])
    else:
        width = max(1, int(count.max()) if count.numel() else 1)
    order = torch.argsort(selected.to(torch.int8), dim=-1, descending=True, stable=True)
    return count, order[..., :width].to(torch.int32).contiguous()


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """Visited key blocks per (batch, head, query block) over the visual tokens.

    Attributes:
        block_q, block_k: block sizes in tokens.
        num_tokens: visual tokens covered (rows and columns).
        full_num: ``int32 [Z, Hz, NQ]`` number of full blocks; Z and Hz are 1 for static
            patterns (broadcast over batch and heads).
        full_idx: ``int32 [Z, Hz, NQ, max_full]`` key block indices, ascending; entries past
            ``full_num`` are padding.
        part_num, part_idx: the same for partial blocks.
    """

    block_q: int
    block_k: int
    num_tokens: int
    full_num: torch.Tensor
    full_idx: torch.Tensor
    part_num: torch.Tensor
    part_idx: torch.Tensor

    @classmethod
    def from_classes(cls, classes: torch.Tensor, block_q: int, block_k: int, num_tokens: int,
                     fixed_width: bool = False) -> "BlockLayout":
        """From EMPTY/PARTIAL/FULL classes ``int8 [NQ, NK]`` or ``[Z, Hz, NQ, NK]``.

        A non-empty last key block shorter than ``block_k`` is made partial: the kernel must
        mask the keys past the end. ``fixed_width``: index lists ``NK`` wide instead of as wide as
        the longest list, so building reads nothing back from the device (layouts of dynamic
        patterns, built on every call; the kernel reads the counts).
        """
        if classes.dim() == 2:
            classes = classes[None, None]
        expected = (num_blocks(num_tokens, block_q), num_blocks(num_tokens, block_k))
        if tuple(classes.shape[-2:]) != expected:
            raise ValueError(f"classes have {tuple(classes.shape[-2:])} blocks, expected {expected}")
        if num_tokens % block_k:
            last = classes[..., -1]
            classes = classes.clone()
            classes[..., -1] = torch.where(last == FULL, torch.full_like(last, PARTIAL), last)
        full_num, full_idx = _indices(classes == FULL, fixed_width)
        part_num, part_idx = _indices(classes == PARTIAL, fixed_width)
        return cls(block_q, block_k, num_tokens, full_num, full_idx, part_num, part_idx)

    @property
    def num_q_blocks(self) -> int:
        return self.full_num.shape[-1]

    @property
    def num_k_blocks(self) -> int:
        return num_blocks(self.num_tokens, self.block_k)

    @property
    def device(self) -> torch.device:
        return self.full_num.device

    def to(self, device) -> "BlockLayout":
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return BlockLayout(
            self.block_q, self.block_k, self.num_tokens,
            move(self.full_num), move(self.full_idx), move(self.part_num), move(self.part_idx),
        )

    def classes(self) -> torch.Tensor:
        """EMPTY/PARTIAL/FULL per block pair, ``int8 [Z, Hz, NQ, NK]`` (for tests and drawing)."""
        z, h, nq = self.full_num.shape
        out = torch.full((z, h, nq, self.num_k_blocks + 1), EMPTY, dtype=torch.int8)
        for num, idx, value in ((self.part_num, self.part_idx, PARTIAL), (self.full_num, self.full_idx, FULL)):
            num, idx = num.cpu().long(), idx.cpu().long()
            valid = torch.arange(idx.shape[-1]) < num[..., None]
            target = torch.where(valid, idx, torch.full_like(idx, self.num_k_blocks))  # padding -> spare column
            out.scatter_(-1, target, torch.full_like(target, value, dtype=torch.int8))
        return out[..., :-1]

    def visited_tokens(self) -> torch.Tensor:
        """(query, key) token pairs computed per (batch, head): ``int64 [Z, Hz]``, from the block
        lists (no ``[NQ, NK]`` matrix)."""
        rows = block_sizes(self.num_tokens, self.block_q)
        cols = block_sizes(self.num_tokens, self.block_k)
        total = torch.zeros(self.full_num.shape[:2], dtype=torch.int64)
        for num, idx in ((self.full_num, self.full_idx), (self.part_num, self.part_idx)):
            num, idx = num.cpu().long(), idx.cpu().long()
            valid = torch.arange(idx.shape[-1]) < num[..., None]
            keys = torch.where(valid, cols[idx.clamp(max=len(cols) - 1)], 0).sum(-1)  # [Z, Hz, NQ]
            total += (keys * rows).sum(-1)
        return total

    @property
    def block_density(self) -> float:
        """Fraction of the visual score matrix the kernel computes (full + partial blocks)."""
        return float(self.visited_tokens().double().mean()) / self.num_tokens**2

    def __repr__(self) -> str:
        full, part = int(self.full_num.sum()), int(self.part_num.sum())
        z, h = self.full_num.shape[:2]
        total = z * h * self.num_q_blocks * self.num_k_blocks
        return (
            f"BlockLayout(tokens={self.num_tokens}, blocks={self.block_q}x{self.block_k}, "
            f"grid={self.num_q_blocks}x{self.num_k_blocks}, batch x heads={z}x{h}, "
            f"full={full / total:.1%}, partial={part / total:.1%}, "
            f"computed={self.block_density:.1%}, device={self.device})"
        )

    def render(self, batch: int = 0, head: int = 0, max_blocks: int = 96) -> str:
        """Text picture of one head's layout: ``#`` full, ``+`` partial, ``.`` skipped."""
        classes = self.classes()[batch, head]
        if max(classes.shape) > max_blocks:
            return f"{self!r} (too large to render as text: use draw())"
        chars = {EMPTY: ".", PARTIAL: "+", FULL: "#"}
        return "\n".join("".join(chars[int(c)] for c in row) for row in classes)

    def draw(self, path, batch: int = 0, head: int = 0, title: str | None = None) -> None:
        """Save one head's layout as a PNG (needs matplotlib)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap

        classes = self.classes()[batch, head].numpy()
        nq, nk = classes.shape
        fig, ax = plt.subplots(figsize=(7, 7 * nq / max(nk, 1) + 0.6), dpi=150)
        cmap = ListedColormap(["#f4f4f4", "#f0a030", "#2060c0"])
        ax.imshow(classes, cmap=cmap, vmin=0, vmax=2, interpolation="nearest", aspect="auto")
        ax.set_xlabel(f"key block ({self.block_k} tokens)")
        ax.set_ylabel(f"query block ({self.block_q} tokens)")
        ax.set_title(title or f"{self.num_tokens} visual tokens, computed {self.block_density:.1%}")
        handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in cmap.colors]
        ax.legend(handles, ["skipped", "partial (masked)", "full"], loc="upper right", fontsize=7)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)


@functools.lru_cache(maxsize=64)
def _build_cached(pattern: Pattern, grid: tuple, block_q: int, block_k: int, device: str) -> BlockLayout:
    f_n, h_n, w_n = as_grid3(grid)
    n = f_n * h_n * w_n
    lists = None if n % block_k else pattern.block_lists(grid, block_q, block_k)
    if lists is not None:  # all visited blocks full, built without the [NQ, NK] class matrix
        count, idx = lists
        empty = torch.zeros_like(count)
        layout = BlockLayout(block_q, block_k, n, count[None, None], idx[None, None], empty[None, None],
                             empty[None, None, :, None])
    else:
        classes = pattern.block_classes(grid, block_q, block_k)
        layout = BlockLayout.from_classes(classes, block_q, block_k, n)
    return layout if device == "cpu" else layout.to(device)


def check_block_sizes(block_q, block_k) -> None:
    """Kernel block sizes must be powers of two in [16, 256]."""
    for name, size in (("block_q", block_q), ("block_k", block_k)):
        if isinstance(size, bool) or not isinstance(size, int) or not 16 <= size <= 256 or size & (size - 1):
            raise ValueError(f"{name} must be a power of two between 16 and 256, got {size!r}")


@torch.compiler.assume_constant_result
def layout_tensors(spec: tuple, grid: tuple, block_q: int, block_k: int, device: str) -> tuple:
    """``(full_num, full_idx, part_num, part_idx)`` of the cached layout of the pattern
    ``pattern_from_spec(spec)``.

    ``torch.compile`` calls this once while tracing and keeps the tensors as constants, so a
    compiled model does not trace the layout builder (and has no graph break there). It takes
    the pattern's plain ``spec`` because dynamo cannot pass frozen dataclasses to such calls.
    """
    blocks = build_block_layout(pattern_from_spec(spec), grid, block_q, block_k, device)
    return blocks.full_num, blocks.full_idx, blocks.part_num, blocks.part_idx


def build_block_layout(pattern: Pattern, grid: tuple, block_q: int, block_k: int, device="cpu") -> BlockLayout:
    """The BlockLayout of a static ``pattern`` on ``grid`` at the given block sizes, cached per
    (pattern, grid, block sizes, device). (The keys a pattern does not attend need no layout: the
    kernels walk the complement of this one.)

    >>> import diffattn
    >>> layout = build_block_layout(diffattn.SlidingWindow(3), (8, 8), 16, 16)
    >>> print(layout.render())
    ++..
    +++.
    .+++
    ..++
    """
    if not pattern.static:
        raise ValueError(f"{type(pattern).__name__} selects blocks from the data; it has no static layout")
    check_block_sizes(block_q, block_k)
    pattern.validate(tuple(grid))
    return _build_cached(pattern, tuple(grid), block_q, block_k, str(torch.device(device)))
