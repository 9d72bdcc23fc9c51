"""Stable Diffusion 3 / 3.5: sparse joint attention (``attn``) and, in SD3.5's MMDiT-X blocks,
sparse image-only self-attention (``attn2``).

Tokens: the latent image ``[B, C, H, W]`` patchified by ``patch_size`` into an (H, W) grid in
raster order (``PatchEmbed`` flattens rows then columns). diffusers' ``JointAttnProcessor2_0``
concatenates ``[image; text]``: the text tokens come **last**. ``attn2`` (SD3.5 blocks listed in
``dual_attention_layers``) attends over the image tokens alone.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import JointAttnProcessor2_0

from ...tokens import TokenLayout
from ..core import SparseAttentionCore
from ._legacy import legacy_qkv_heads


class SD3SparseProcessor:
    """SD3 joint attention with diffattn's sparse attention (same projections and norms as
    diffusers' ``JointAttnProcessor2_0``; image tokens first, text last).

    Called without ``encoder_hidden_states`` (SD3.5's ``attn2``) it is image-only self-attention.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, core: SparseAttentionCore):
        self.core = core

    def __call__(self, attn, hidden_states: torch.FloatTensor, encoder_hidden_states: torch.FloatTensor = None,
                 attention_mask: torch.FloatTensor | None = None, *args, **kwargs) -> torch.FloatTensor:
        residual = hidden_states
        batch_size = hidden_states.shape[0]

        # `sample` projections, [B, H, S, D] as diffusers computes them.
        query, key, value = legacy_qkv_heads(attn, hidden_states)
        head_dim = key.shape[-1]

        # `context` projections: appended after the image tokens.
        if encoder_hidden_states is not None:
            encoder_query = attn.add_q_proj(encoder_hidden_states)
            encoder_key = attn.add_k_proj(encoder_hidden_states)
            encoder_value = attn.add_v_proj(encoder_hidden_states)

            encoder_query = encoder_query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            encoder_key = encoder_key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            encoder_value = encoder_value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

            if attn.norm_added_q is not None:
                encoder_query = attn.norm_added_q(encoder_query)
            if attn.norm_added_k is not None:
                encoder_key = attn.norm_added_k(encoder_key)

            query = torch.cat([query, encoder_query], dim=2)
            key = torch.cat([key, encoder_key], dim=2)
            value = torch.cat([value, encoder_value], dim=2)

        # diffusers' JointAttnProcessor2_0 ignores attention_mask (it calls SDPA without one): so do we.
        out = self.core.attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                               backend=self._attention_backend, parallel_config=self._parallel_config, attn_mask=None,
                               visual_only=encoder_hidden_states is None)
        hidden_states = out.reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : residual.shape[1]],
                hidden_states[:, residual.shape[1]:],
            )
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


def _arg(args, kwargs, name: str, index: int):
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else None


class SD3Adapter:
    """How diffattn meets SD3 / SD3.5's MMDiT."""

    name = "sd3"
    transformer_classes = ("SD3Transformer2DModel",)
    processor_class = SD3SparseProcessor
    replaces = (JointAttnProcessor2_0,)

    def sparse_processor_names(self, transformer) -> list[str]:
        """Joint attention of every block, followed by the block's image-only ``attn2`` when it has
        one (SD3.5), in execution order."""
        names = []
        for i, block in enumerate(transformer.transformer_blocks):
            names.append(f"transformer_blocks.{i}.attn.processor")
            if getattr(block, "attn2", None) is not None:
                names.append(f"transformer_blocks.{i}.attn2.processor")
        processors = transformer.attn_processors
        for name in names:
            if not isinstance(processors[name], self.replaces):
                raise ValueError(
                    f"diffattn's SD3 processor replaces diffusers' JointAttnProcessor2_0, but {name} is "
                    f"{type(processors[name]).__name__} (fused QKV, IP-Adapter or a custom processor); restore "
                    "the default processors (e.g. unfuse_qkv_projections()) before diffattn.apply"
                )
        return names

    def processor_layers(self, transformer) -> list[int]:
        """Block index of each name of ``sparse_processor_names`` (``attn`` and ``attn2`` of one
        block count as one layer for ``dense_layers``)."""
        return [int(name.split(".")[1]) for name in self.sparse_processor_names(transformer)]

    def token_layout(self, transformer, args, kwargs) -> TokenLayout:
        """``[image; text]``: an (H / p, W / p) grid, then the text tokens."""
        hidden = _arg(args, kwargs, "hidden_states", 0)
        encoder = _arg(args, kwargs, "encoder_hidden_states", 1)
        height, width = hidden.shape[-2:]
        p = transformer.config.patch_size
        text_len = 0 if encoder is None else int(encoder.shape[1])
        return TokenLayout((height // p, width // p), text_len=text_len, text_first=False)

    def timestep(self, args, kwargs):
        return _arg(args, kwargs, "timestep", 3)


ADAPTER = SD3Adapter()
