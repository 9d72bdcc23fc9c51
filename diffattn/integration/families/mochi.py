"""Mochi 1 (``MochiTransformer3DModel``, T2V): sparse joint attention of every block
(``transformer_blocks.{i}.attn1``), the only attention Mochi has.

q/k/v exactly as diffusers' ``MochiAttnProcessor2_0``: video ``to_q/k/v`` and text ``add_q/k/v_proj``
split by head, Mochi's RMS norms per stream, Mochi's interleaved RoPE (computed in float32) on the
video part, joined as ``[video; text]`` (text last).

Text: attended densely (``TokenLayout(grid, text_len=T, text_first=False)``). diffusers drops each
batch row's padded text tokens (``encoder_attention_mask`` False) before attention and returns zeros
for their rows; diffattn keeps them as masked keys -- per-row text lengths when the valid tokens come
first, as the T5 tokenizer pads -- and zeroes their rows the same way. Any other mask runs that call
dense (warned once; the same attention). An all-padding row (Mochi's zeroed empty negative prompt)
is the video alone, as in diffusers.

Dense calls (the ``Dense`` pattern, dense warm-up steps and layers) run diffusers' own per-row
attention, so they are bit-identical to ``MochiAttnProcessor2_0``; sparse calls go through the shared
core with the text key-padding mask. (The core never warms the step cache in a dense call with a
mask, so doing the dense calls here changes nothing else.)

Tokens: the latent ``[B, C, F, H, W]`` patchified per frame by ``patch_size`` into an
``(F, H / p, W / p)`` grid in raster order.

``MochiTransformer3DModel`` has no ``attn_processors`` / ``set_attn_processor`` (and no ``_cp_plan``):
``diffattn.apply`` sets each ``MochiAttention``'s ``processor`` (see ``integration.processors``).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import MochiAttnProcessor2_0

from ._calls import call_argument
from ...tokens import TokenLayout
from ..core import SparseAttentionCore
from ..processors import attn_processors

# MochiTransformer3DModel.forward(hidden_states, encoder_hidden_states, timestep, encoder_attention_mask, ...)
_POSITIONS = {"hidden_states": 0, "encoder_hidden_states": 1, "timestep": 2}


_argument = functools.partial(call_argument, _POSITIONS)


def _apply_rotary(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    # MochiAttnProcessor2_0's RoPE: even/odd channel pairs rotated in float32, interleaved back.
    x_even, x_odd = x[..., 0::2].float(), x[..., 1::2].float()
    cos = (x_even * freqs_cos - x_odd * freqs_sin).to(x.dtype)
    sin = (x_even * freqs_sin + x_odd * freqs_cos).to(x.dtype)
    return torch.stack([cos, sin], dim=-1).flatten(-2)


def _dense_per_row(query, key, value, text_valid) -> torch.Tensor:
    """diffusers' attention: per batch row, ``[video; valid text]`` with plain SDPA, zeros for the
    padded text rows. ``[B, S, H, D]`` in and out (``S = video + text``)."""
    total = query.shape[1]
    video = total - text_valid.shape[1]
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # [B, H, S, D], as diffusers attends
    outputs = []
    for row in range(q.shape[0]):
        keep = torch.cat([torch.arange(video, device=q.device),
                          video + torch.nonzero(text_valid[row].flatten(), as_tuple=False).flatten()])
        out = F.scaled_dot_product_attention(q[row : row + 1, :, keep], k[row : row + 1, :, keep],
                                             v[row : row + 1, :, keep], dropout_p=0.0, is_causal=False)
        outputs.append(F.pad(out, (0, 0, 0, total - out.shape[2])))
    return torch.cat(outputs, dim=0).transpose(1, 2)


class MochiSparseProcessor:
    """Mochi joint attention with diffattn (same projections, norms, RoPE and ``[video; text]``
    order as diffusers' ``MochiAttnProcessor2_0``)."""

    def __init__(self, core: SparseAttentionCore):
        self.core = core

    def _dense_now(self) -> bool:
        """Whether the core would attend densely in this call (as ``SparseAttentionCore.attend`` decides)."""
        core = self.core
        return core.state.layout is None or core.pattern.is_dense or core.schedule.is_dense(core.state, core.layer)

    # The parameters are exactly MochiAttnProcessor2_0's.
    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor, image_rotary_emb: torch.Tensor | None = None):
        query = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        encoder_query = attn.add_q_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
        encoder_key = attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
        encoder_value = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
        if attn.norm_added_q is not None:
            encoder_query = attn.norm_added_q(encoder_query)
        if attn.norm_added_k is not None:
            encoder_key = attn.norm_added_k(encoder_key)

        if image_rotary_emb is not None:
            query = _apply_rotary(query, *image_rotary_emb)
            key = _apply_rotary(key, *image_rotary_emb)

        video_len, text_len = query.shape[1], encoder_query.shape[1]
        query = torch.cat([query, encoder_query], dim=1)
        key = torch.cat([key, encoder_key], dim=1)
        value = torch.cat([value, encoder_value], dim=1)
        text_valid = attention_mask.reshape(query.shape[0], text_len).bool()

        if self._dense_now():
            hidden_states = _dense_per_row(query, key, value, text_valid)
        else:
            valid = F.pad(text_valid, (video_len, 0), value=True)  # [B, S]: video always valid
            hidden_states = self.core.attend(query, key, value, attn_mask=valid[:, None, None, :])
            hidden_states = hidden_states.masked_fill(~valid[:, :, None, None], 0.0)  # padded rows: zeros
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)

        hidden_states, encoder_hidden_states = hidden_states.split_with_sizes((video_len, text_len), dim=1)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if hasattr(attn, "to_add_out"):
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


class MochiAdapter:
    """How diffattn meets Mochi's transformer."""

    name = "mochi"
    transformer_classes = ("MochiTransformer3DModel",)
    processor_class = MochiSparseProcessor

    def sparse_processor_names(self, transformer) -> list[str]:
        """The blocks' joint attention processors in execution order; each must be diffusers' default."""
        names = [f"transformer_blocks.{i}.attn1.processor" for i in range(len(transformer.transformer_blocks))]
        processors = attn_processors(transformer)
        for name in names:
            if type(processors[name]) is not MochiAttnProcessor2_0:
                raise ValueError(f"diffattn cannot make {name} sparse: it is a {type(processors[name]).__name__}; "
                                 "diffattn replaces only diffusers' MochiAttnProcessor2_0")
        return names

    def token_layout(self, transformer, args, kwargs) -> TokenLayout | None:
        hidden = _argument("hidden_states", args, kwargs)
        text = _argument("encoder_hidden_states", args, kwargs)
        if hidden is None or text is None:
            return None
        _, _, frames, height, width = hidden.shape
        p = transformer.config.patch_size
        return TokenLayout((frames, height // p, width // p), text_len=text.shape[1], text_first=False)

    def timestep(self, args, kwargs):
        return _argument("timestep", args, kwargs)


ADAPTER = MochiAdapter()
