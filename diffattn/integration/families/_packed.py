"""Sequences whose non-grid tokens are not one block before or after the grid.

diffattn's ``TokenLayout`` is ``[dense; grid]`` (text first) or ``[grid; dense]`` (text last): one
run of densely attended tokens (text, and any other token a pattern cannot place) beside one grid.
Some models put dense tokens on both sides of the grid -- Qwen-Image-Edit ``[text; target;
condition images]``, FLUX.2 ``[text; target; reference images]``, Z-Image ``[grid; pad; caption]``
is fine as it is. For those the adapter returns a ``PackedLayout``: the ``TokenLayout`` diffattn
attends in, plus ``runs``, the model's own sequence as runs of ``("grid" | "dense" | "text", n)``.
The processor moves q/k/v (and a key-padding mask) into layout order, attends, and moves the output
back (``attend_packed``). Attention does not depend on the order of the keys, and each query row is
computed on its own, so this is the same attention, in another order.

Layout order: the dense runs in model order, then the ``"text"`` run (the one that may carry
padding: its valid tokens come first, so the whole dense segment stays "valid prefix, then padding",
which is what a key-padding mask must look like for the sparse kernels), beside the grid.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

from ...tokens import TokenLayout
from ..parallel import context_parallel_config

logger = logging.getLogger("diffattn")

KINDS = ("grid", "dense", "text")


@dataclass(frozen=True)
class PackedLayout(TokenLayout):
    """A ``TokenLayout`` (the order diffattn attends in) plus ``runs``: the model's sequence order
    as ``(kind, length)`` runs, ``kind`` one of ``"grid"``, ``"dense"``, ``"text"``."""

    runs: tuple = ()

    def __post_init__(self):
        super().__post_init__()
        runs = tuple((str(kind), int(n)) for kind, n in self.runs)
        object.__setattr__(self, "runs", runs)
        if any(kind not in KINDS for kind, _ in runs):
            raise ValueError(f"runs kinds must be in {KINDS}, got {runs}")
        if sum(n for kind, n in runs if kind == "grid") != self.num_visual or [k for k, _ in runs].count("grid") != 1:
            raise ValueError(f"runs must hold the {self.num_visual} grid tokens in one run, got {runs}")
        if sum(n for kind, n in runs if kind != "grid") != self.text_len or [k for k, _ in runs].count("text") > 1:
            raise ValueError(f"runs must hold the {self.text_len} dense tokens (at most one 'text' run), got {runs}")

    def __str__(self) -> str:
        runs = ", ".join(f"{kind} {n}" for kind, n in self.runs)
        return f"{super().__str__()[:-1]}; model order: {runs})"


def packed_layout(grid, runs, *, text_first: bool = True) -> TokenLayout:
    """The layout of a model sequence given as ``runs`` (model order): a plain ``TokenLayout`` when
    the model's order already is diffattn's, else a ``PackedLayout``."""
    runs = tuple((kind, int(n)) for kind, n in runs if int(n) > 0)
    dense = sum(n for kind, n in runs if kind != "grid")
    layout = PackedLayout(tuple(grid), text_len=dense, text_first=text_first, runs=runs)
    if _positions(layout) is None:
        return TokenLayout(layout.grid, text_len=dense, text_first=text_first)
    return layout


@functools.lru_cache(maxsize=64)
def _positions(layout: PackedLayout) -> tuple[tuple[int, ...], ...] | None:
    """Model positions of the layout's tokens in layout order, as (start, stop) ranges, or None when
    the orders agree."""
    starts, position = [], 0
    for kind, n in layout.runs:
        starts.append((kind, position, position + n))
        position += n
    dense = [(a, b) for kind, a, b in starts if kind == "dense"] + [(a, b) for kind, a, b in starts if kind == "text"]
    grid = [(a, b) for kind, a, b in starts if kind == "grid"]
    ranges = dense + grid if layout.text_first else grid + dense
    if all(ranges[i][1] == ranges[i + 1][0] for i in range(len(ranges) - 1)):
        return None
    return tuple(ranges)


@functools.lru_cache(maxsize=64)
def _indices(layout: PackedLayout, device: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    ranges = _positions(layout)
    if ranges is None:
        return None
    to_layout = torch.cat([torch.arange(a, b) for a, b in ranges])
    return to_layout.to(device), torch.argsort(to_layout).to(device)


def layout_indices(layout: TokenLayout | None, device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(model_of_layout, layout_of_model)``: ``x.index_select(1, model_of_layout)`` puts a model-order
    sequence in layout order, ``y.index_select(1, layout_of_model)`` puts it back. None: same order."""
    if not isinstance(layout, PackedLayout):
        return None
    return _indices(layout, str(torch.device(device)))


_warned: set = set()


def attend_packed(core, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, backend=None,
                  parallel_config=None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``core.attend`` for q/k/v ``[B, S, H, D]`` in the model's order (and a bool mask ``[B, 1, 1, S]``
    or ``[B, 1, S, S]`` in that order): reordered into the layout's order and back when the
    transformer call's layout is a ``PackedLayout``.

    Under context parallelism each rank holds only its share of the sequence, which cannot be
    reordered locally: a reordered call then runs diffusers' dense attention (warned once)."""
    order = layout_indices(core.state.layout, query.device)
    if order is None:
        return core.attend(query, key, value, backend=backend, parallel_config=parallel_config, attn_mask=attn_mask)
    if context_parallel_config(parallel_config) is not None:
        if "cp" not in _warned:
            _warned.add("cp")
            runs = ", ".join(f"{kind} {n}" for kind, n in core.state.layout.runs)
            logger.warning("diffattn: this call's dense tokens sit on both sides of the grid (model order: %s), which "
                           "cannot be reordered under context parallelism (each rank holds a slice of that order); "
                           "it runs diffusers' dense attention", runs)
        return core._dispatch(query, key, value, attn_mask, backend, parallel_config)
    to_layout, to_model = order
    query, key, value = (x.index_select(1, to_layout) for x in (query, key, value))
    if attn_mask is not None:
        attn_mask = attn_mask.index_select(-1, to_layout)
        if attn_mask.shape[-2] == to_layout.numel() and attn_mask.shape[-2] > 1:
            attn_mask = attn_mask.index_select(-2, to_layout)
    out = core.attend(query, key, value, backend=backend, parallel_config=parallel_config, attn_mask=attn_mask)
    return out.index_select(1, to_model)
