"""Kandinsky 5 (``Kandinsky5Transformer3DModel``: Kandinsky 5.0 Video / Image Lite and Pro, T2V, I2V,
T2I, I2I): sparse visual self-attention (``visual_transformer_blocks.{i}.self_attention``). The text
encoder blocks' self-attention (text only) and the visual blocks' cross-attention to text keep
diffusers' processor; visual self-attention sees no text.

q/k/v exactly as diffusers' ``Kandinsky5AttnProcessor``: ``to_query/to_key/to_value`` split by head,
RMS q/k norms computed in float32, and Kandinsky's 2x2-matrix RoPE -- whose result diffusers rounds to
**bfloat16** before casting back to the query dtype (so a float32 run carries bf16-rounded q/k; kept
as is, since that is the model's default output).

Tokens: the latent ``[B, F, H, W, C]`` (channels last) patchified by ``patch_size`` into an
(F, H, W) grid in raster order (images: ``F = 1``).

Refused: checkpoints configured with ``attention_type="nabla"`` (their pipeline passes
``sparse_params``): Kandinsky then runs its own sparse NABLA attention over tokens permuted into 8x8
"fractal" order; diffattn would replace a sparse attention with another and see the tokens in an
order its layout does not describe. Refused at apply time from the config, and at call time when
``sparse_params`` is passed.
"""

from __future__ import annotations

import functools

import torch
from diffusers.models.transformers.transformer_kandinsky import Kandinsky5AttnProcessor

from ._calls import call_argument
from ...tokens import TokenLayout
from ..core import SparseAttentionCore

# Kandinsky5Transformer3DModel.forward(hidden_states, encoder_hidden_states, timestep, pooled_projections,
#                                      visual_rope_pos, text_rope_pos, scale_factor, sparse_params, ...)
_POSITIONS = {"hidden_states": 0, "timestep": 2, "sparse_params": 7}
NABLA = ("Kandinsky 5's own NABLA sparse attention (attention_type='nabla', tokens in 8x8 fractal order) is "
         "configured; diffattn replaces only the regular attention")


_argument = functools.partial(call_argument, _POSITIONS)


def _apply_rotary(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    # Kandinsky5AttnProcessor's RoPE, including its cast to bfloat16.
    x_ = x.reshape(*x.shape[:-1], -1, 1, 2).to(torch.float32)
    x_out = (rope * x_).sum(dim=-1)
    return x_out.reshape(*x.shape).to(torch.bfloat16)


class Kandinsky5SparseProcessor:
    """Kandinsky 5 visual self-attention with diffattn (same projections, norms and RoPE as
    diffusers' ``Kandinsky5AttnProcessor``)."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, core: SparseAttentionCore):
        self.core = core

    # The parameters are exactly Kandinsky5AttnProcessor's.
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, rotary_emb=None, sparse_params=None):
        if encoder_hidden_states is not None:
            raise RuntimeError("Kandinsky5SparseProcessor is for the visual self-attention; cross-attention keeps "
                               "diffusers' processor")
        if sparse_params is not None:
            raise ValueError(f"diffattn cannot run this Kandinsky 5 attention: {NABLA}")
        query = attn.to_query(hidden_states)
        key = attn.to_key(hidden_states)
        value = attn.to_value(hidden_states)
        shape = query.shape[:-1]
        query = query.reshape(*shape, attn.num_heads, -1)
        key = key.reshape(*shape, attn.num_heads, -1)
        value = value.reshape(*shape, attn.num_heads, -1)

        query = attn.query_norm(query.float()).type_as(query)
        key = attn.key_norm(key.float()).type_as(key)
        if rotary_emb is not None:
            query = _apply_rotary(query, rotary_emb).type_as(query)
            key = _apply_rotary(key, rotary_emb).type_as(key)

        hidden_states = self.core.attend(query, key, value, backend=self._attention_backend,
                                         parallel_config=self._parallel_config)
        return attn.out_layer(hidden_states.flatten(-2, -1))


class Kandinsky5Adapter:
    """How diffattn meets Kandinsky 5's transformer."""

    name = "kandinsky5"
    transformer_classes = ("Kandinsky5Transformer3DModel",)
    processor_class = Kandinsky5SparseProcessor

    def sparse_processor_names(self, transformer) -> list[str]:
        """Visual self-attention processors in execution order; refused for NABLA checkpoints."""
        if getattr(transformer.config, "attention_type", "regular") == "nabla":
            raise ValueError(f"diffattn cannot make this Kandinsky5Transformer3DModel sparse: {NABLA}")
        names = [f"visual_transformer_blocks.{i}.self_attention.processor"
                 for i in range(len(transformer.visual_transformer_blocks))]
        processors = transformer.attn_processors
        for name in names:
            if type(processors[name]) is not Kandinsky5AttnProcessor:
                raise ValueError(f"diffattn cannot make {name} sparse: it is a {type(processors[name]).__name__}; "
                                 "diffattn replaces only diffusers' Kandinsky5AttnProcessor")
        return names

    def token_layout(self, transformer, args, kwargs) -> TokenLayout | None:
        if _argument("sparse_params", args, kwargs) is not None:
            raise ValueError(f"diffattn cannot run this Kandinsky 5 call (sparse_params given): {NABLA}")
        hidden = _argument("hidden_states", args, kwargs)
        if hidden is None:
            return None
        _, frames, height, width, _ = hidden.shape
        pt, ph, pw = transformer.config.patch_size
        return TokenLayout((frames // pt, height // ph, width // pw))

    def timestep(self, args, kwargs):
        return _argument("timestep", args, kwargs)


ADAPTER = Kandinsky5Adapter()
