"""Motif-Video (``MotifVideoTransformer3DModel``, T2V and I2V): sparse joint attention in the
dual-stream blocks (``transformer_blocks.{i}.attn``) and the *encoder* single-stream blocks
(``single_transformer_blocks.{j}.attn`` for ``j < num_single_layers - num_decoder_layers``). The
optional text cross-attentions (``cross_attn``, their own processor) are untouched.

q/k/v exactly as diffusers' ``MotifVideoAttnProcessor2_0``: video ``to_q/k/v`` (single-stream blocks:
over the joined ``[video; conditions]``), RMS q/k norms, RoPE on the video part only, condition
``add_q/k/v_proj`` in dual-stream blocks, joined as ``[video; conditions]`` (conditions last).

Conditions: I2V's image embedding tokens, then the text; all attended densely, like text. The key
padding mask (``encoder_attention_mask``, image tokens valid) becomes per-row text lengths when the
valid text tokens come first; any other mask runs that call dense (warned once, exact).

Not sparse: the *decoder* single-stream blocks (``num_decoder_layers > 0``). They attend over
``[decoder video; encoder video]`` -- the encoder's output video stands in for the conditions -- a
sequence of another length than the call's token layout; they keep diffusers' processor.

Tokens: the latent ``[B, C, F, H, W]`` patchified by ``(patch_size_t, patch_size, patch_size)``;
``TokenLayout(grid, text_len=T_image + T_text, text_first=False)``.
"""

from __future__ import annotations

import functools

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_motif_video import MotifVideoAttnProcessor2_0

from ._calls import call_argument
from ...tokens import TokenLayout
from ..core import SparseAttentionCore

# MotifVideoTransformer3DModel.forward(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
#                                      image_embeds, ...)
_POSITIONS = {"hidden_states": 0, "timestep": 1, "encoder_hidden_states": 2, "image_embeds": 4}


_argument = functools.partial(call_argument, _POSITIONS)


class MotifVideoSparseProcessor:
    """Motif-Video joint attention with diffattn (same projections, norms, RoPE and
    ``[video; conditions]`` order as diffusers' ``MotifVideoAttnProcessor2_0``)."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, core: SparseAttentionCore):
        self.core = core

    # The parameters are exactly MotifVideoAttnProcessor2_0's.
    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        joined = attn.add_q_proj is None and encoder_hidden_states is not None
        if joined:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        query = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if image_rotary_emb is not None:
            if joined:  # RoPE on the video part only
                split = -encoder_hidden_states.shape[1]
                query = torch.cat([apply_rotary_emb(query[:, :split], image_rotary_emb, sequence_dim=1),
                                   query[:, split:]], dim=1)
                key = torch.cat([apply_rotary_emb(key[:, :split], image_rotary_emb, sequence_dim=1),
                                 key[:, split:]], dim=1)
            else:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        if attn.add_q_proj is not None and encoder_hidden_states is not None:
            encoder_query = attn.add_q_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            encoder_key = attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            encoder_value = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            if attn.norm_added_q is not None:
                encoder_query = attn.norm_added_q(encoder_query)
            if attn.norm_added_k is not None:
                encoder_key = attn.norm_added_k(encoder_key)
            query = torch.cat([query, encoder_query], dim=1)
            key = torch.cat([key, encoder_key], dim=1)
            value = torch.cat([value, encoder_value], dim=1)

        hidden_states = self.core.attend(query, key, value, backend=self._attention_backend,
                                         parallel_config=self._parallel_config, attn_mask=attention_mask)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (hidden_states[:, : -encoder_hidden_states.shape[1]],
                                                    hidden_states[:, -encoder_hidden_states.shape[1] :])
            if attn.to_out is not None:
                hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
            if attn.to_add_out is not None:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
            return hidden_states, encoder_hidden_states
        if attn.to_out is not None:
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return hidden_states


class MotifVideoAdapter:
    """How diffattn meets Motif-Video's transformer."""

    name = "motif_video"
    transformer_classes = ("MotifVideoTransformer3DModel",)
    processor_class = MotifVideoSparseProcessor

    def sparse_processor_names(self, transformer) -> list[str]:
        """Dual-stream, then encoder single-stream attention processors (decoder blocks excluded)."""
        encoder_single = len(transformer.single_transformer_blocks) - transformer.config.num_decoder_layers
        names = [f"transformer_blocks.{i}.attn.processor" for i in range(len(transformer.transformer_blocks))]
        names += [f"single_transformer_blocks.{j}.attn.processor" for j in range(encoder_single)]
        processors = transformer.attn_processors
        for name in names:
            if type(processors[name]) is not MotifVideoAttnProcessor2_0:
                raise ValueError(f"diffattn cannot make {name} sparse: it is a {type(processors[name]).__name__}; "
                                 "diffattn replaces only diffusers' MotifVideoAttnProcessor2_0")
        return names

    def token_layout(self, transformer, args, kwargs) -> TokenLayout | None:
        hidden = _argument("hidden_states", args, kwargs)
        text = _argument("encoder_hidden_states", args, kwargs)
        image = _argument("image_embeds", args, kwargs)
        if hidden is None or text is None:
            return None
        _, _, frames, height, width = hidden.shape
        p, pt = transformer.config.patch_size, transformer.config.patch_size_t
        conditions = text.shape[1] + (image.shape[1] if image is not None else 0)
        return TokenLayout((frames // pt, height // p, width // p), text_len=conditions, text_first=False)

    def timestep(self, args, kwargs):
        return _argument("timestep", args, kwargs)


ADAPTER = MotifVideoAdapter()
