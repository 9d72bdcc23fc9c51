"""Where tokens sit in a DiT sequence: a visual grid in raster order plus optional text."""

from __future__ import annotations

from dataclasses import dataclass


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


@dataclass(frozen=True)
class TokenLayout:
    """The token order of one attention call.

    Args:
        grid: ``(H, W)`` for images or ``(F, H, W)`` for video, in tokens (after patchify).
            Visual tokens are in raster order: frame-major, then row, then column.
        text_len: number of text tokens in the same sequence (0 when self-attention sees
            no text, as in Wan). Default 0.
        text_first: text sits before the grid (Flux, CogVideoX) when True, after it
            (HunyuanVideo, SD3) when False. Default True.

    Text tokens are attended densely in both directions by every pattern.

    >>> layout = TokenLayout((21, 30, 52))
    >>> layout.seq_len
    32760
    >>> TokenLayout((64, 64), text_len=512).visual_start
    512
    """

    grid: tuple
    text_len: int = 0
    text_first: bool = True

    def __post_init__(self):
        grid = self.grid
        if isinstance(grid, int) or not hasattr(grid, "__len__") or len(grid) not in (2, 3):
            raise ValueError(f"grid must be (H, W) or (F, H, W), got {grid!r}")
        grid = tuple(_positive_int(g, f"grid[{i}]") for i, g in enumerate(grid))
        object.__setattr__(self, "grid", grid)
        if isinstance(self.text_len, bool) or not isinstance(self.text_len, int) or self.text_len < 0:
            raise ValueError(f"text_len must be an int >= 0, got {self.text_len!r}")
        if not isinstance(self.text_first, bool):
            raise TypeError(f"text_first must be a bool, got {self.text_first!r}")

    @property
    def grid3(self) -> tuple[int, int, int]:
        """The grid as ``(F, H, W)``; images have ``F == 1``."""
        return self.grid if len(self.grid) == 3 else (1, *self.grid)

    @property
    def num_visual(self) -> int:
        f, h, w = self.grid3
        return f * h * w

    @property
    def seq_len(self) -> int:
        return self.num_visual + self.text_len

    @property
    def visual_start(self) -> int:
        """Index of the first visual token in the sequence."""
        return self.text_len if self.text_first else 0

    @property
    def text_start(self) -> int:
        """Index of the first text token in the sequence."""
        return 0 if self.text_first else self.num_visual

    def __str__(self) -> str:
        grid = "x".join(map(str, self.grid))
        if not self.text_len:
            return f"TokenLayout(grid={grid})"
        where = "first" if self.text_first else "last"
        return f"TokenLayout(grid={grid}, text_len={self.text_len} {where})"
