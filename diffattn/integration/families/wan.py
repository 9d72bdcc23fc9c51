"""Wan 2.1 / 2.2 (T2V and I2V): sparse self-attention (``attn1``); cross-attention untouched.

Tokens: the latent video ``[B, C, F, H, W]`` patchified by ``patch_size`` into an (F, H, W) grid
in raster order; Wan's self-attention sees no text.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_wan import _get_qkv_projections

from ...tokens import TokenLayout
from ..core import SparseAttentionCore


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Wan's interleaved rotary embedding, as diffusers' WanAttnProcessor applies it.
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class WanSparseProcessor:
    """Wan self-attention with diffattn's sparse attention (same projections, norms and RoPE as
    diffusers' ``WanAttnProcessor``)."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, core: SparseAttentionCore):
        self.core = core

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, rotary_emb=None) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise RuntimeError("WanSparseProcessor is for self-attention (attn1); cross-attention keeps diffusers' processor")
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _apply_rotary(query, *rotary_emb)
            key = _apply_rotary(key, *rotary_emb)
        out = self.core.attend(query, key, value, backend=self._attention_backend,
                               parallel_config=self._parallel_config, attn_mask=attention_mask)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


class WanAdapter:
    """How diffattn meets Wan's transformer."""

    name = "wan"
    transformer_classes = ("WanTransformer3DModel",)
    processor_class = WanSparseProcessor

    def sparse_processor_names(self, transformer) -> list[str]:
        """Self-attention processors in execution order (block 0 first)."""
        return [f"blocks.{i}.attn1.processor" for i in range(len(transformer.blocks))]

    def token_layout(self, transformer, args, kwargs) -> TokenLayout:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        _, _, frames, height, width = hidden.shape
        pt, ph, pw = transformer.config.patch_size
        return TokenLayout((frames // pt, height // ph, width // pw))

    def timestep(self, args, kwargs):
        return kwargs["timestep"] if "timestep" in kwargs else (args[1] if len(args) > 1 else None)


ADAPTER = WanAdapter()
