"""Cosmos (``CosmosTransformer3DModel``: Cosmos 1.0 Text2World / Video2World, Cosmos-Predict2
Text2Image / Video2World, Cosmos-Predict2.5 and Transfer2.5): sparse self-attention
(``transformer_blocks.{i}.attn1``); the cross-attention (``attn2``: text, and Cosmos 2.5's image
context through ``CosmosAttnProcessor2_5``) keeps diffusers' processor. Self-attention sees the video
tokens only: there are no text or other non-grid tokens to place.

q/k/v exactly as diffusers' ``CosmosAttnProcessor2_0``: ``to_q/k/v`` split by head, RMS q/k norms,
RoPE (real form, halves rotated) on ``[B, H, S, D]``, attention through ``dispatch_attention_fn``.

Tokens: the latent ``[B, C, F, H, W]`` patchified by ``patch_size`` into an ``(F, H, W)`` grid in
raster order, whatever the resolution and frame count. The padding mask and Video2World's condition
mask are input *channels*, not attention masks; the conditioning frames are latent frames of the same
grid and are attended by the pattern like every other frame. The text attention mask only reaches the
cross-attention.

Timestep: 1-D ``[B]``, or per frame ``[B, 1, F, 1, 1]`` (Video2World: conditioning frames first, at
their own noise level) -- then the last frame's, a generated one. Cosmos 2 / 2.5 pass
``sigma / (sigma + 1)`` or ``sigma`` beside the scheduler's ``1000 * sigma`` timesteps; applied to the
pipeline, the step then comes from the scheduler's ``step_index`` (see ``integration.state``).

``CosmosTransformer3DModel`` has no ``attn_processors`` / ``set_attn_processor`` (and no
``_cp_plan``): ``diffattn.apply`` sets each attention module's processor (``integration.processors``).
"""

from __future__ import annotations

import functools

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_cosmos import CosmosAttnProcessor2_0

from ._calls import call_argument
from ...tokens import TokenLayout
from ..core import SparseAttentionCore
from ..processors import attn_processors

# CosmosTransformer3DModel.forward(hidden_states, timestep, encoder_hidden_states, ...)
_POSITIONS = {"hidden_states": 0, "timestep": 1}


_argument = functools.partial(call_argument, _POSITIONS)


class CosmosSparseProcessor:
    """Cosmos self-attention with diffattn (same projections, norms and RoPE as diffusers'
    ``CosmosAttnProcessor2_0``)."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, core: SparseAttentionCore):
        self.core = core

    # The parameters are exactly CosmosAttnProcessor2_0's.
    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: torch.Tensor | None = None):
        if encoder_hidden_states is not None:
            raise RuntimeError("CosmosSparseProcessor is for the self-attention (attn1); cross-attention keeps "
                               "diffusers' processor")
        query = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        key = attn.to_k(hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, use_real=True, use_real_unbind_dim=-2)
            key = apply_rotary_emb(key, image_rotary_emb, use_real=True, use_real_unbind_dim=-2)
        # (diffusers' grouped-query repeat is the identity here: self-attention keys have the query's heads)
        hidden_states = self.core.attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                         backend=self._attention_backend, parallel_config=self._parallel_config,
                                         attn_mask=attention_mask)
        hidden_states = hidden_states.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](hidden_states))


class CosmosAdapter:
    """How diffattn meets Cosmos' transformer."""

    name = "cosmos"
    transformer_classes = ("CosmosTransformer3DModel",)
    processor_class = CosmosSparseProcessor

    def sparse_processor_names(self, transformer) -> list[str]:
        """Self-attention processors in execution order; each must be diffusers' default."""
        names = [f"transformer_blocks.{i}.attn1.processor" for i in range(len(transformer.transformer_blocks))]
        processors = attn_processors(transformer)
        for name in names:
            if type(processors[name]) is not CosmosAttnProcessor2_0:
                raise ValueError(f"diffattn cannot make {name} sparse: it is a {type(processors[name]).__name__}; "
                                 "diffattn replaces only diffusers' CosmosAttnProcessor2_0")
        return names

    def token_layout(self, transformer, args, kwargs) -> TokenLayout | None:
        hidden = _argument("hidden_states", args, kwargs)
        if hidden is None:
            return None
        _, _, frames, height, width = hidden.shape
        pt, ph, pw = transformer.config.patch_size
        return TokenLayout((frames // pt, height // ph, width // pw))

    def timestep(self, args, kwargs):
        """The call's timestep; per-frame timesteps ``[B, 1, F, 1, 1]`` give the last frame's."""
        t = _argument("timestep", args, kwargs)
        if isinstance(t, torch.Tensor) and t.ndim == 5:
            return t[0, 0, -1, 0, 0]
        return t


ADAPTER = CosmosAdapter()
