"""CogVideoX 1.0 / 1.5 (T2V, I2V, V2V, Fun-Control): sparse joint attention (``attn1``).

All of them use diffusers' ``CogVideoXTransformer3DModel``: I2V only widens ``in_channels`` (image
latents concatenated on the channel axis) and, in 1.5, adds the ``ofs`` embedding; 1.5 adds
``patch_size_t``. Every block has one attention, ``attn1``: joint self-attention over
``[text; video]``.

Tokens: the latent video ``[B, F, C, H, W]`` (frames before channels) patchified by ``patch_size``
(and ``patch_size_t`` in 1.5) into an (F, H, W) grid in raster order, after the
``encoder_hidden_states.shape[1]`` text tokens. Rotary embedding (when the pipeline passes
``image_rotary_emb``) covers only the video tokens.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb

from ...tokens import TokenLayout
from ..core import SparseAttentionCore
from ._legacy import legacy_qkv_heads


class CogVideoXSparseProcessor:
    """CogVideoX joint attention with diffattn's sparse attention (same projections, norms, RoPE,
    output projection and text/video split as diffusers' ``CogVideoXAttnProcessor2_0``)."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, core: SparseAttentionCore):
        self.core = core

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        text_seq_length = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch_size, sequence_length, _ = hidden_states.shape

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        # [B, H, S, D], as diffusers builds them (norms and RoPE act on the last axis only)
        query, key, value = legacy_qkv_heads(attn, hidden_states)
        head_dim = key.shape[-1]

        if image_rotary_emb is not None:
            query[:, :, text_seq_length:] = apply_rotary_emb(query[:, :, text_seq_length:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text_seq_length:] = apply_rotary_emb(key[:, :, text_seq_length:], image_rotary_emb)

        # [B, S, H, D] views for diffattn / dispatch_attention_fn (whose native backend transposes
        # them back, so the dense path calls SDPA on exactly diffusers' tensors)
        out = self.core.attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                               backend=self._attention_backend, parallel_config=self._parallel_config,
                               attn_mask=attention_mask)
        hidden_states = out.reshape(batch_size, -1, attn.heads * head_dim)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        encoder_hidden_states, hidden_states = hidden_states.split(
            [text_seq_length, hidden_states.size(1) - text_seq_length], dim=1
        )
        return hidden_states, encoder_hidden_states


def _argument(args, kwargs, name: str, position: int):
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else None


class CogVideoXAdapter:
    """How diffattn meets CogVideoX's transformer."""

    name = "cogvideox"
    transformer_classes = ("CogVideoXTransformer3DModel",)
    processor_class = CogVideoXSparseProcessor

    def sparse_processor_names(self, transformer) -> list[str]:
        """Joint-attention processors in execution order (block 0 first)."""
        return [f"transformer_blocks.{i}.attn1.processor" for i in range(len(transformer.transformer_blocks))]

    def token_layout(self, transformer, args, kwargs) -> TokenLayout:
        hidden = _argument(args, kwargs, "hidden_states", 0)
        text = _argument(args, kwargs, "encoder_hidden_states", 1)
        _, frames, _, height, width = hidden.shape
        p, p_t = transformer.config.patch_size, transformer.config.patch_size_t
        grid_f = frames if p_t is None else frames // p_t  # as CogVideoXPatchEmbed patchifies
        return TokenLayout((grid_f, height // p, width // p), text_len=text.shape[1], text_first=True)

    def timestep(self, args, kwargs):
        return _argument(args, kwargs, "timestep", 2)


ADAPTER = CogVideoXAdapter()
