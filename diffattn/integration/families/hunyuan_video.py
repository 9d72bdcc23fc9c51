"""HunyuanVideo: sparse joint attention in the dual-stream and single-stream blocks.

Tokens: ``[video; text]`` (text last), the video grid from the latent ``[B, C, F, H, W]`` and
``(patch_size_t, patch_size, patch_size)``. The prompt is padded to a fixed length; diffusers
passes a key-padding mask ``[B, 1, 1, S]`` that diffattn turns into per-row text lengths, so
padded text keys stay masked in the sparse kernel too. The token refiner keeps its own
processor.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb

from ...tokens import TokenLayout
from ..core import SparseAttentionCore


class HunyuanVideoSparseProcessor:
    """HunyuanVideo joint attention with diffattn (same projections, norms and RoPE as diffusers'
    ``HunyuanVideoAttnProcessor2_0``)."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, core: SparseAttentionCore):
        self.core = core

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: torch.Tensor | None = None):
        single_stream = attn.add_q_proj is None and encoder_hidden_states is not None
        if single_stream:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        query = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            if single_stream:  # RoPE on the video part only
                n_text = encoder_hidden_states.shape[1]
                query = torch.cat([apply_rotary_emb(query[:, :-n_text], image_rotary_emb, sequence_dim=1), query[:, -n_text:]], dim=1)
                key = torch.cat([apply_rotary_emb(key[:, :-n_text], image_rotary_emb, sequence_dim=1), key[:, -n_text:]], dim=1)
            else:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        if attn.add_q_proj is not None and encoder_hidden_states is not None:
            enc_q = attn.add_q_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            enc_k = attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            enc_v = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            if attn.norm_added_q is not None:
                enc_q = attn.norm_added_q(enc_q)
            if attn.norm_added_k is not None:
                enc_k = attn.norm_added_k(enc_k)
            query = torch.cat([query, enc_q], dim=1)
            key = torch.cat([key, enc_k], dim=1)
            value = torch.cat([value, enc_v], dim=1)
        out = self.core.attend(query, key, value, backend=self._attention_backend,
                               parallel_config=self._parallel_config, attn_mask=attention_mask)
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            out, encoder_out = out[:, : -encoder_hidden_states.shape[1]], out[:, -encoder_hidden_states.shape[1] :]
            if getattr(attn, "to_out", None) is not None:
                out = attn.to_out[1](attn.to_out[0](out))
            if getattr(attn, "to_add_out", None) is not None:
                encoder_out = attn.to_add_out(encoder_out)
            return out, encoder_out
        return out


class HunyuanVideoAdapter:
    """How diffattn meets HunyuanVideo's transformer."""

    name = "hunyuan_video"
    transformer_classes = ("HunyuanVideoTransformer3DModel",)
    processor_class = HunyuanVideoSparseProcessor

    def sparse_processor_names(self, transformer) -> list[str]:
        double = [f"transformer_blocks.{i}.attn.processor" for i in range(len(transformer.transformer_blocks))]
        single = [f"single_transformer_blocks.{i}.attn.processor" for i in range(len(transformer.single_transformer_blocks))]
        return double + single

    def token_layout(self, transformer, args, kwargs) -> TokenLayout:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        text = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[2]
        _, _, frames, height, width = hidden.shape
        p, pt = transformer.config.patch_size, transformer.config.patch_size_t
        return TokenLayout((frames // pt, height // p, width // p), text_len=text.shape[1], text_first=False)

    def timestep(self, args, kwargs):
        return kwargs["timestep"] if "timestep" in kwargs else (args[1] if len(args) > 1 else None)


ADAPTER = HunyuanVideoAdapter()
