"""The shared part of every diffattn processor: choose dense or sparse, then attend."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

from ..attention import attention, select_blocks
from ..partials import attention_partials, external_attention, merge_partials
from ..patterns.base import Pattern
from ..tokens import TokenLayout
from .parallel import context_parallel_config, ulysses_shard
from .state import GenerationState
from .step_cache import CacheEntry, StepCache, drifted_heads, light_merge, stored

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

    def is_dense(self, state: GenerationState, layer: int, step: int | None = None) -> bool:
        """Whether ``layer`` is dense at ``step`` (default: the state's current step)."""
        step = state.step if step is None else step
        if layer < self.dense_layers or step < self.dense_steps:
            return True
        if self.dense_last_steps and state.num_steps is not None:
            return step >= state.num_steps - self.dense_last_steps
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

    def __init__(self, pattern: Pattern, schedule: Schedule, layer: int, state: GenerationState, impl: str,
                 cache: StepCache | None = None, slot: int | None = None):
        self.pattern = pattern
        self.schedule = schedule
        self.layer = layer  # for the schedule (dense_layers)
        # the key of this attention's step-cache entry and selection: SD3.5 blocks hold two
        # sparse attentions of one layer, which must not share them
        self.slot = layer if slot is None else slot
        self.state = state
        self.impl = impl
        self.cache = cache
        self._warned_mask = False

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend=None, parallel_config=None,
               attn_mask: torch.Tensor | None = None, visual_only: bool = False) -> torch.Tensor:
        """``[B, S, H, D]`` in, ``[B, S, H, D]`` out.

        ``visual_only``: this attention sees the visual tokens alone (e.g. SD3.5's image-only
        ``attn2``), not the text of the transformer call's layout.

        Under diffusers' Ulysses context parallelism (``parallel_config``) q/k/v hold this rank's
        ``S / N`` tokens; sparse calls exchange them for all tokens of ``H / N`` heads, attend,
        and exchange back (see ``diffattn.integration.parallel``).
        """
        layout = self.state.layout
        if visual_only and layout is not None:
            layout = TokenLayout(layout.grid)
        if layout is None or self.pattern.is_dense or self.schedule.is_dense(self.state, self.layer):
            return self._attend_dense(q, k, v, layout, attn_mask, backend, parallel_config)
        if attn_mask is not None and context_parallel_config(parallel_config) is not None:
            if not self._warned_mask:
                logger.warning("diffattn: an attention mask under context parallelism; this call runs dense")
                self._warned_mask = True
            return self._dispatch(q, k, v, attn_mask, backend, parallel_config)
        shard = ulysses_shard(parallel_config, layout, q)
        if shard is None:
            return self._attend_sparse(q, k, v, layout, attn_mask, (0, q.shape[2]), backend)
        q, k, v = (shard.to_heads(x) for x in (q, k, v))
        return shard.to_sequence(self._attend_sparse(q, k, v, layout, None, shard.heads, backend))

    @staticmethod
    def _dispatch(q, k, v, attn_mask, backend, parallel_config) -> torch.Tensor:
        return dispatch_attention_fn(q, k, v, attn_mask=attn_mask, dropout_p=0.0, is_causal=False,
                                     backend=backend, parallel_config=parallel_config)

    def _attend_dense(self, q, k, v, layout, attn_mask, backend, parallel_config) -> torch.Tensor:
        if not self._warm_cache_now(layout, attn_mask):
            return self._dispatch(q, k, v, attn_mask, backend, parallel_config)
        # the next step is sparse: have its external part ready
        # The two partials merged are this step's dense output: no separate dense pass (and under
        # Ulysses one exchange, not two).
        shard = ulysses_shard(parallel_config, layout, q)
        if shard is None:
            if layout.seq_len != q.shape[1]:
                return self._dispatch(q, k, v, attn_mask, backend, parallel_config)
            return self._refresh(q, k, v, layout, None, None, (0, q.shape[2]))
        q, k, v = (shard.to_heads(x) for x in (q, k, v))
        return shard.to_sequence(self._refresh(q, k, v, layout, None, None, shard.heads))

    def _attend_sparse(self, q, k, v, layout: TokenLayout, attn_mask, heads: tuple[int, int], backend) -> torch.Tensor:
        """Sparse attention of ``q, k, v [B, S, H, D]`` over the whole sequence; ``heads`` are the
        global indices of the H heads (all of them without context parallelism)."""
        if layout.seq_len != q.shape[1]:
            raise RuntimeError(
                f"diffattn: the transformer call's token layout {layout} has {layout.seq_len} tokens but "
                f"attention received {q.shape[1]}"
            )
        text_lens = None
        if attn_mask is not None:
            text_lens = self._text_lens(attn_mask, layout)
            if text_lens is None:
                if not self._warned_mask:
                    logger.warning("diffattn: an attention mask that is not text padding; this call runs dense")
                    self._warned_mask = True
                return self._dispatch(q, k, v, attn_mask, backend, None)
        if self.cache is not None:
            return self._attend_cached(q, k, v, layout, text_lens, heads)
        selection = None
        if not self.pattern.static and self.schedule.selection_every > 1:
            selection = self._reused_selection(q, k, layout, heads)
        return attention(q, k, v, self.pattern, layout=layout, impl=self.impl, text_lens=text_lens, selection=selection)

    def _text_lens(self, attn_mask: torch.Tensor, layout: TokenLayout) -> torch.Tensor | None:
        """``text_lens_from_mask``, once per transformer call: every block receives the same mask
        tensor, and the check reads it on the host."""
        cached = self.state.mask_lens
        if cached is not None and cached[0] is attn_mask and cached[1] == layout:
            return cached[2]
        lens = text_lens_from_mask(attn_mask, layout)
        self.state.mask_lens = (attn_mask, layout, lens)
        return lens

    # --- cross-step cache ------------------------------------------------------------

    def _cache_key(self, q: torch.Tensor, layout: TokenLayout, heads: tuple[int, int]) -> tuple:
        return (tuple(q.shape), q.dtype, q.device, layout, heads)

    def _warm_cache_now(self, layout, attn_mask) -> bool:
        """At a dense step whose next step is sparse (the end of the warm-up), with a cache."""
        if self.cache is None or layout is None or self.pattern.is_dense or attn_mask is not None:
            return False
        if self.layer < self.schedule.dense_layers:
            return False
        return not self.schedule.is_dense(self.state, self.layer, self.state.step + 1)

    def _refresh(self, q, k, v, layout, text_lens, selection, heads):
        """Compute both partials, store the external one, return the merged (dense) output."""
        if not self.pattern.static and selection is None:
            selection = self._reused_selection(q, k, layout, heads)
        out_in, lse_in, out_ex, lse_ex = attention_partials(q, k, v, self.pattern, layout=layout, impl=self.impl,
                                                            text_lens=text_lens, selection=selection)
        config = self.cache
        self.state.cache[(self.slot, self.state.branch)] = CacheEntry(
            step=self.state.step, key=self._cache_key(q, layout, heads), heads=heads,
            out_ext=None if config.light else stored(out_ex, config), lse_ext=stored(lse_ex, config, torch.float32),
            lse_in=stored(lse_in, config, torch.float32) if config.lse_gate is not None else None,
            out_in=stored(out_in, config) if config.cosine_gate is not None else None,
            selection=selection,
        )
        return merge_partials(out_in, lse_in, out_ex, lse_ex, impl=self.impl)[0]

    def _attend_cached(self, q, k, v, layout, text_lens, heads):
        state, config = self.state, self.cache
        entry = state.cache.get((self.slot, state.branch))
        stale = (entry is None or entry.key != self._cache_key(q, layout, heads)
                 or not 0 <= state.step - entry.step < config.refresh_every)
        if stale:
            return self._refresh(q, k, v, layout, text_lens, None, heads)
        # A dynamic pattern keeps the selection of the refresh until the next one: the stored
        # external partial is the complement of exactly those blocks, so a fresh selection would
        # count some keys twice and drop others.
        selection = entry.selection
        out_in, lse_in = attention(q, k, v, self.pattern, layout=layout, impl=self.impl, return_lse=True,
                                   text_lens=text_lens, selection=selection)
        if config.lse_gate is not None or config.cosine_gate is not None:
            # The gates flag heads on the device; the flags of every layer are read in one go before
            # the next transformer forward (GenerationState.read_host_values, with the timestep), and the flagged heads
            # are refreshed at the layer's next call: no host read inside the forward.
            key = (self.slot, state.branch)
            flagged = state.drift_heads.pop(key, None)
            if flagged is not None and flagged[0] is entry:
                self._refresh_heads(entry, flagged[1], q, k, v, layout, selection, out_in, lse_in)
            state.drift_flags[key] = (entry, drifted_heads(entry, out_in, lse_in, config))
        lse_ex = entry.lse_ext.to(q.device, non_blocking=True)
        if entry.out_ext is None:
            return light_merge(out_in, lse_in, lse_ex)
        out_ex = entry.out_ext.to(q.device, q.dtype, non_blocking=True)
        return merge_partials(out_in, lse_in, out_ex, lse_ex, impl=self.impl)[0]

    def _refresh_heads(self, entry: CacheEntry, idx: torch.Tensor, q, k, v, layout, selection, out_in, lse_in):
        """Recompute the external part of the drifted heads ``idx`` (``int64 [n]`` on the CPU, local to q) only."""
        sel = selection[:, idx] if selection is not None else None
        out_ex, lse_ex = external_attention(q[:, :, idx], k[:, :, idx], v[:, :, idx], self.pattern, layout=layout,
                                            impl=self.impl, selection=sel)
        cpu_idx = idx.to(entry.lse_ext.device)
        if entry.out_ext is not None:
            entry.out_ext[:, :, cpu_idx] = out_ex.to(entry.out_ext.device, entry.out_ext.dtype)
        entry.lse_ext[:, :, cpu_idx] = lse_ex.to(entry.lse_ext.device)
        if entry.lse_in is not None:
            entry.lse_in[:, :, cpu_idx] = lse_in[:, :, idx].to(entry.lse_in.device)
        if entry.out_in is not None:
            entry.out_in[:, :, cpu_idx] = out_in[:, :, idx].to(entry.out_in.device, entry.out_in.dtype)
        self.state.head_refreshes += int(idx.numel())

    def _reused_selection(self, q: torch.Tensor, k: torch.Tensor, layout: TokenLayout,
                          heads: tuple[int, int]) -> torch.Tensor:
        """The layer's block selection for global heads ``heads``, recomputed every
        ``selection_every`` steps per CFG branch and whenever the shapes change."""
        state = self.state
        key = (self.slot, state.branch)
        shape = (tuple(q.shape), layout, heads)
        cached = state.selections.get(key)
        if cached is not None and cached[1] == shape and 0 <= state.step - cached[0] < self.schedule.selection_every:
            return cached[2]
        scale = q.shape[-1] ** -0.5
        keep = select_blocks(q, k, self.pattern, layout, scale, impl=self.impl)
        state.selections[key] = (state.step, shape, keep)
        return keep
