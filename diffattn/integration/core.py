"""The shared part of every diffattn processor: choose dense or sparse, then attend."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

from ..attention import attention, select_blocks
from ..patterns.base import Pattern
from ..tokens import TokenLayout
from .state import GenerationState

logger = logging.getLogger("diffattn")


@dataclass(frozen=True)
class Schedule:
    """When attention stays dense.

    Args:
        dense_steps: the first N denoising steps are dense. Default 0.
        dense_layers: the first L transformer blocks (execution order) are dense. Default 0.
        dense_last_steps: the last M steps are dense too (needs the step count, known when
            diffattn was applied to a pipeline). Default 0.
        selection_every: dynamic patterns (BlockTopK, Piecewise) select their blocks every k
            steps and reuse the selection in between, per layer and CFG branch (SparseD:
            head-specific patterns are stable across steps). Default 1 (every step).
    """

    dense_steps: int = 0
    dense_layers: int = 0
    dense_last_steps: int = 0
    selection_every: int = 1

    def __post_init__(self):
        for name in ("dense_steps", "dense_layers", "dense_last_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        value = self.selection_every
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"selection_every must be an int >= 1, got {value!r}")

    def is_dense(self, state: GenerationState, layer: int) -> bool:
        if layer < self.dense_layers or state.step < self.dense_steps:
            return True
        if self.dense_last_steps and state.num_steps is not None:
            return state.step >= state.num_steps - self.dense_last_steps
        return False


def text_lens_from_mask(mask: torch.Tensor, layout: TokenLayout) -> torch.Tensor | None:
    """A diffusers key-padding mask (bool ``[B, 1, 1, S]`` or ``[B, S]``, True = attend) as the
    number of real text tokens per batch row, or None when the mask is not "every visual token,
    then a prefix of the text segment" (it then cannot run sparse)."""
    if mask.dtype != torch.bool:
        return None
    if mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1:
        mask = mask[:, 0, 0]
    if mask.dim() != 2 or mask.shape[1] != layout.seq_len:
        return None
    text = mask[:, layout.text_start : layout.text_start + layout.text_len]
    lens = text.sum(1, dtype=torch.int32)
    if not torch.compiler.is_compiling():
        visual = mask[:, layout.visual_start : layout.visual_start + layout.num_visual]
        prefix = torch.arange(layout.text_len, device=mask.device)[None, :] < lens[:, None]
        if not bool(visual.all()) or not torch.equal(text, prefix):
            return None
    return lens


class SparseAttentionCore:
    """Attention of one transformer block's self-attention under a pattern and a schedule.

    Dense calls go through diffusers' ``dispatch_attention_fn`` with the processor's attention
    backend and parallel config, so they are exactly what the default processor computes.
    """

    def __init__(self, pattern: Pattern, schedule: Schedule, layer: int, state: GenerationState, impl: str):
        self.pattern = pattern
        self.schedule = schedule
        self.layer = layer
        self.state = state
        self.impl = impl
        self._warned_mask = False

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend=None, parallel_config=None,
               attn_mask: torch.Tensor | None = None, visual_only: bool = False) -> torch.Tensor:
        """``[B, S, H, D]`` in, ``[B, S, H, D]`` out.

        ``visual_only``: this attention sees the visual tokens alone (e.g. SD3.5's image-only
        ``attn2``), not the text of the transformer call's layout.
        """
        layout = self.state.layout
        if visual_only and layout is not None:
            layout = TokenLayout(layout.grid)
        if layout is None or self.pattern.is_dense or self.schedule.is_dense(self.state, self.layer):
            return dispatch_attention_fn(q, k, v, attn_mask=attn_mask, dropout_p=0.0, is_causal=False,
                                         backend=backend, parallel_config=parallel_config)
        if parallel_config is not None:
            raise NotImplementedError(
                "diffattn's sparse attention does not run under diffusers' context parallelism yet; "
                "disable parallelism or diffattn.remove() the sparse processors"
            )
        if layout.seq_len != q.shape[1]:
            raise RuntimeError(
                f"diffattn: the transformer call's token layout {layout} has {layout.seq_len} tokens but "
                f"attention received {q.shape[1]}"
            )
        text_lens = None
        if attn_mask is not None:
            text_lens = text_lens_from_mask(attn_mask, layout)
            if text_lens is None:
                if not self._warned_mask:
                    logger.warning("diffattn: an attention mask that is not text padding; this call runs dense")
                    self._warned_mask = True
                return dispatch_attention_fn(q, k, v, attn_mask=attn_mask, dropout_p=0.0, is_causal=False,
                                             backend=backend, parallel_config=parallel_config)
        selection = None
        if not self.pattern.static and self.schedule.selection_every > 1:
            selection = self._reused_selection(q, k, layout)
        return attention(q, k, v, self.pattern, layout=layout, impl=self.impl, text_lens=text_lens, selection=selection)

    def _reused_selection(self, q: torch.Tensor, k: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """The layer's block selection, recomputed every ``selection_every`` steps per CFG branch
        and whenever the shapes change."""
        state = self.state
        key = (self.layer, state.branch)
        shape = (tuple(q.shape), layout)
        cached = state.selections.get(key)
        if cached is not None and cached[1] == shape and 0 <= state.step - cached[0] < self.schedule.selection_every:
            return cached[2]
        scale = q.shape[-1] ** -0.5
        keep = select_blocks(q, k, self.pattern, layout, scale)
        state.selections[key] = (state.step, shape, keep)
        return keep
