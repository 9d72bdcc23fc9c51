"""HunyuanVideo 1.5 (``HunyuanVideo15Transformer3DModel``, T2V and I2V): sparse joint attention in
every dual-stream block (``transformer_blocks.{i}.attn``); the token refiner keeps its own processor.

q/k/v exactly as diffusers' ``HunyuanVideo15AttnProcessor2_0``: video ``to_q/k/v`` and condition
``add_q/k/v_proj`` split by head, RMS q/k norms per stream, RoPE on the video part, joined as
``[video; conditions]`` (conditions last).

Conditions: the transformer packs, per batch row, the *valid* tokens of the SigLIP image embedding,
the ByT5 glyph text and the MLLM text first, then the padding of each (``[valid image, valid byt5,
valid mllm, invalid image, invalid byt5, invalid mllm]``), and passes that row's mask. All of them are
attended densely, like text; the padding is a suffix, so the mask becomes per-row text lengths and
the padded keys stay masked in the sparse kernels. (In T2V the image embedding is all zeros and
entirely padding.)

diffusers turns the mask into a full ``[B, 1, S, S]`` query-and-key mask (it materialises S x S), so a
padded condition token attends nothing and torch's SDPA returns zeros for its row. diffattn masks keys
only and sets those rows to zero afterwards: the same output, without the S x S mask. Padded rows
never reach a valid token (they are masked as keys), so the video output is the same either way.

Tokens: the latent ``[B, C, F, H, W]`` patchified by ``(patch_size_t, patch_size, patch_size)`` into an
(F, H, W) grid, conditions after it: ``TokenLayout(grid, text_len=T_mllm + T_byt5 + T_image,
text_first=False)``. I2V conditions on the first frame through extra input channels, not tokens.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15AttnProcessor2_0

from ._calls import call_argument
from ...tokens import TokenLayout
from ..core import SparseAttentionCore

# HunyuanVideo15Transformer3DModel.forward(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
#                                          timestep_r, encoder_hidden_states_2, encoder_attention_mask_2, image_embeds)
_POSITIONS = {"hidden_states": 0, "timestep": 1, "encoder_hidden_states": 2, "encoder_hidden_states_2": 5,
              "image_embeds": 7}


_argument = functools.partial(call_argument, _POSITIONS)


class HunyuanVideo15SparseProcessor:
    """HunyuanVideo 1.5 joint attention with diffattn (same projections, norms, RoPE and
    ``[video; conditions]`` order as diffusers' ``HunyuanVideo15AttnProcessor2_0``)."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, core: SparseAttentionCore):
        self.core = core

    # The parameters are exactly HunyuanVideo15AttnProcessor2_0's.
    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        query = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        if encoder_hidden_states is not None:
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

        valid = None
        if attention_mask is not None:
            # diffusers: pad the condition mask to the joint sequence (video valid); it then masks queries and
            # keys. Here: keys through the mask, query rows of padding zeroed below.
            seq_len = query.shape[1]
            valid = F.pad(attention_mask, (seq_len - attention_mask.shape[1], 0), value=True).bool()
        hidden_states = self.core.attend(query, key, value, backend=self._attention_backend,
                                         parallel_config=self._parallel_config,
                                         attn_mask=None if valid is None else valid[:, None, None, :])
        if valid is not None:
            hidden_states = hidden_states.masked_fill(~valid[:, :, None, None], 0.0)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (hidden_states[:, : -encoder_hidden_states.shape[1]],
                                                    hidden_states[:, -encoder_hidden_states.shape[1] :])
            if getattr(attn, "to_out", None) is not None:
                hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
            if getattr(attn, "to_add_out", None) is not None:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


class HunyuanVideo15Adapter:
    """How diffattn meets HunyuanVideo 1.5's transformer."""

    name = "hunyuan_video15"
    transformer_classes = ("HunyuanVideo15Transformer3DModel",)
    processor_class = HunyuanVideo15SparseProcessor

    def sparse_processor_names(self, transformer) -> list[str]:
        """Dual-stream attention processors in execution order; each must be diffusers' default."""
        names = [f"transformer_blocks.{i}.attn.processor" for i in range(len(transformer.transformer_blocks))]
        processors = transformer.attn_processors
        for name in names:
            if type(processors[name]) is not HunyuanVideo15AttnProcessor2_0:
                raise ValueError(f"diffattn cannot make {name} sparse: it is a {type(processors[name]).__name__}; "
                                 "diffattn replaces only diffusers' HunyuanVideo15AttnProcessor2_0")
        return names

    def token_layout(self, transformer, args, kwargs) -> TokenLayout | None:
        hidden = _argument("hidden_states", args, kwargs)
        texts = [_argument(n, args, kwargs) for n in ("encoder_hidden_states", "encoder_hidden_states_2", "image_embeds")]
        if hidden is None or any(t is None for t in texts):
            return None  # the transformer itself will complain about the missing argument
        _, _, frames, height, width = hidden.shape
        p, pt = transformer.config.patch_size, transformer.config.patch_size_t
        return TokenLayout((frames // pt, height // p, width // p), text_len=sum(t.shape[1] for t in texts),
                           text_first=False)

    def timestep(self, args, kwargs):
        return _argument("timestep", args, kwargs)


ADAPTER = HunyuanVideo15Adapter()
