"""LTX-Video: sparse self-attention (``attn1``); the text cross-attention (``attn2``) is untouched.

Tokens: the pipeline packs the latent video ``[B, C, F, H, W]`` by ``patch_size_t`` /
``patch_size`` into ``[B, S, C']`` (frame-major, then row, then column: raster order) and passes
the grid as ``num_frames``, ``height``, ``width`` (or as ``video_coords``, LTXConditionPipeline).
LTX's self-attention sees no text.

LTX-2 (``LTX2VideoTransformer3DModel``, audio + video) is not covered: its video self-attention
takes a self-attention mask (IC-LoRA), a per-model processor class (``LTX2PerturbedAttnProcessor``
for STG) and two RoPE layouts; it needs its own adapter.
"""

from __future__ import annotations

import logging

import torch
from diffusers.models.transformers.transformer_ltx import LTXVideoAttnProcessor, apply_rotary_emb

from ...tokens import TokenLayout
from ..core import SparseAttentionCore

logger = logging.getLogger("diffattn")


class LTXSparseProcessor:
    """LTX-Video self-attention with diffattn's sparse attention (same projections, norms and RoPE
    as diffusers' ``LTXVideoAttnProcessor``)."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, core: SparseAttentionCore):
        self.core = core

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: torch.Tensor | None = None) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise RuntimeError(
                "LTXSparseProcessor is for self-attention (attn1); cross-attention keeps diffusers' processor"
            )
        batch_size, sequence_length, _ = hidden_states.shape

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)

        query = attn.norm_q(query)
        key = attn.norm_k(key)

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb)
            key = apply_rotary_emb(key, image_rotary_emb)

        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

        out = self.core.attend(query, key, value, backend=self._attention_backend,
                               parallel_config=self._parallel_config, attn_mask=attention_mask)
        out = out.flatten(2, 3)
        out = out.to(query.dtype)

        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        return out


# LTXVideoTransformer3DModel.forward(hidden_states, encoder_hidden_states, timestep, encoder_attention_mask,
#                                    num_frames, height, width, rope_interpolation_scale, video_coords, ...)
_POSITIONS = {"hidden_states": 0, "timestep": 2, "num_frames": 4, "height": 5, "width": 6, "video_coords": 8}
_warned: set = set()


def _arg(args, kwargs, name: str):
    if name in kwargs:
        return kwargs[name]
    index = _POSITIONS[name]
    return args[index] if len(args) > index else None


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


def _grid_from_coords(coords: torch.Tensor, seq_len: int) -> tuple[int, int, int] | None:
    """The (F, H, W) grid of ``video_coords`` ``[B, 3, S]`` when its tokens are exactly one grid in
    raster order (no extra conditioning tokens), else None."""
    if coords.dim() != 3 or coords.shape[1] != 3 or coords.shape[2] != seq_len:
        return None
    c = coords[0]
    axes = [torch.unique(c[i]) for i in range(3)]  # sorted
    sizes = tuple(int(a.numel()) for a in axes)
    if sizes[0] * sizes[1] * sizes[2] != seq_len:
        return None
    expected = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0).reshape(3, -1)
    return sizes if torch.equal(expected, c) else None


class LTXAdapter:
    """How diffattn meets LTX-Video's transformer."""

    name = "ltx"
    transformer_classes = ("LTXVideoTransformer3DModel",)
    processor_class = LTXSparseProcessor
    replaces = (LTXVideoAttnProcessor,)

    def sparse_processor_names(self, transformer) -> list[str]:
        """Self-attention processors in execution order (block 0 first)."""
        names = [f"transformer_blocks.{i}.attn1.processor" for i in range(len(transformer.transformer_blocks))]
        processors = transformer.attn_processors
        for name in names:
            if not isinstance(processors[name], self.replaces):
                raise ValueError(
                    f"diffattn's LTX processor replaces diffusers' LTXVideoAttnProcessor, but {name} is "
                    f"{type(processors[name]).__name__}; restore the default processors before diffattn.apply"
                )
        return names

    def token_layout(self, transformer, args, kwargs) -> TokenLayout | None:
        """The (F, H, W) token grid of the call, from ``num_frames``/``height``/``width`` (in tokens,
        or in latent pixels when ``patch_size_t``/``patch_size`` > 1), else from ``video_coords``.

        None (the call stays dense, with a warning) when the sequence is not one grid, e.g.
        LTXConditionPipeline's extra conditioning tokens.
        """
        hidden = _arg(args, kwargs, "hidden_states")
        seq_len = int(hidden.shape[1])
        frames, height, width = (_arg(args, kwargs, n) for n in ("num_frames", "height", "width"))
        if frames is not None and height is not None and width is not None:
            frames, height, width = int(frames), int(height), int(width)
            pt, p = transformer.config.patch_size_t, transformer.config.patch_size
            for grid in ((frames, height, width), (frames // pt, height // p, width // p)):
                if min(grid) > 0 and grid[0] * grid[1] * grid[2] == seq_len:
                    return TokenLayout(grid)
            raise ValueError(
                f"LTX transformer call: num_frames={frames}, height={height}, width={width} (patch_size_t={pt}, "
                f"patch_size={p}) do not describe the {seq_len} tokens of hidden_states"
            )
        coords = _arg(args, kwargs, "video_coords")
        grid = None if coords is None else _grid_from_coords(coords, seq_len)
        if grid is None:
            _warn_once("no-grid", (
                f"diffattn: this LTX transformer call's {seq_len} tokens are not one (F, H, W) grid (no num_frames/"
                "height/width, and video_coords are not a single raster grid, e.g. extra conditioning tokens); "
                "its attention stays dense"
            ))
            return None
        return TokenLayout(grid)

    def timestep(self, args, kwargs):
        """The call's timestep. LTX image-to-video passes per-token timesteps ``[B, S]`` that are 0 on
        the conditioning frame's tokens: the largest value is the denoising step's timestep."""
        t = _arg(args, kwargs, "timestep")
        if isinstance(t, torch.Tensor) and t.numel() > 1:
            return t.amax()
        return t


ADAPTER = LTXAdapter()
