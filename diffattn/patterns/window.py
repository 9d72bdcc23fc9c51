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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import MASK_WINDOW, MaskMod, Pattern, as_grid3
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

    Valid per axis: ``1 <= window * dilation <= axis length`` and ``stride <= window``.

    >>> import diffattn
    >>> p = diffattn.SlidingWindow((3, 5, 5))
    >>> round(p.density(diffattn.TokenLayout((8, 16, 16))), 4)
    0.0366
    """

    window: object
    stride: object = 1
    dilation: object = 1

    def __post_init__(self):
        object.__setattr__(self, "window", _per_axis(self.window, "window", allow_none=True))
        object.__setattr__(self, "stride", _per_axis(self.stride, "stride", allow_none=False))
        object.__setattr__(self, "dilation", _per_axis(self.dilation, "dilation", allow_none=False))
        lengths = {len(v) for v in (self.window, self.stride, self.dilation) if isinstance(v, tuple)}
        if len(lengths) > 1:
            raise ValueError(
                f"SlidingWindow window, stride and dilation tuples must have the same length, "
                f"got window={self.window!r}, stride={self.stride!r}, dilation={self.dilation!r}"
            )

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

    def spec(self) -> tuple:
        return ("SlidingWindow", self.window, self.stride, self.dilation)

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
        matrices = [rule.matrix() for rule in self.axes(grid)]
        return separable_block_classes(matrices, as_grid3(grid), block_q, block_k)

    def visual_pairs(self, grid: tuple) -> int:
        pairs = 1
        for rule in self.axes(grid):
            pairs *= int(rule.matrix().sum())
        return pairs

    def kernel_mask(self, grid: tuple) -> tuple[int, tuple[int, ...]]:
        params = []
        for rule in self.axes(grid):
            params += [rule.n, rule.k, rule.s, rule.r]
        return MASK_WINDOW, tuple(params)
