"""Z-Image (``ZImageTransformer2DModel``: Z-Image / Turbo text-to-image, img2img, inpaint, ControlNet,
and Z-Image-Omni): sparse self-attention of the main blocks (``layers.{i}.attention``) over the unified
sequence. The refiners keep diffusers' processor: the noise refiner (image tokens and their padding
only, a sequence of another length than the unified one), the caption refiner and Omni's SigLIP
refiner.

q/k/v exactly as diffusers' ``ZSingleStreamAttnProcessor``: ``to_q/k/v`` split by head, RMS q/k norms,
complex RoPE in float32 from ``freqs_cis``, attention through ``dispatch_attention_fn``.

Tokens, per batch row (diffusers pads every image's and caption's tokens to a multiple of 32 and the
rows of a batch to the longest, masking that batch padding as keys):

- basic mode ``[image grid | image padding | caption + caption padding | batch padding]``: the grid
  first, everything after it dense like text: ``TokenLayout(grid, text_len=S - H*W, text_first=False)``;
  the batch padding is a key-padding suffix (per-row text lengths), as diffusers masks it;
- Omni ``[captions | condition images | target grid | target padding | SigLIP tokens | batch padding]``:
  the target image (the last one) is the grid, captions, condition images, padding tokens and SigLIP
  tokens are dense. Dense tokens sit on both sides of the grid and their count differs per row (each
  prompt its own length), so the processor gathers each row into ``[its dense tokens | batch padding |
  grid]`` -- ``TokenLayout(grid, text_len=S - H*W, text_first=True)`` with per-row text lengths --
  attends, and scatters back: the same attention in another key order (``Dense`` then matches diffusers
  to float rounding instead of bit for bit).

The padding tokens (Z-Image's learned pad embeddings) are real, attended tokens, not masked ones. The
grid is ``(H, W)`` for images (``(F, H, W)`` for a latent with several frames), from the latents'
shapes and the call's ``patch_size`` / ``f_patch_size``, whatever the resolution. A batch whose rows'
target images differ in size has no single grid: that call runs dense (warned).

Timestep: Z-Image pipelines pass ``(1000 - t) / 1000``; the adapter gives back ``t`` (scheduler units).

``ZImageTransformer2DModel`` has no ``attn_processors`` / ``set_attn_processor`` (and no ``_cp_plan``):
``diffattn.apply`` sets each attention module's processor (``integration.processors``).
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import torch
from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF, ZSingleStreamAttnProcessor

from ._calls import call_argument
from ...tokens import TokenLayout
from ..core import SparseAttentionCore
from ..processors import attn_processors

# ZImageTransformer2DModel.forward(x, t, cap_feats, return_dict, controlnet_block_samples, siglip_feats,
#                                  image_noise_mask, patch_size, f_patch_size, ...)
_POSITIONS = {"x": 0, "t": 1, "cap_feats": 2, "siglip_feats": 5, "patch_size": 7, "f_patch_size": 8}
_DEFAULTS = {"patch_size": 2, "f_patch_size": 1}


_argument = functools.partial(call_argument, _POSITIONS, defaults=_DEFAULTS)


def _padded(n: int) -> int:
    """Token count after diffusers' padding to a multiple of ``SEQ_MULTI_OF``."""
    return n + (-n) % SEQ_MULTI_OF


@dataclass(frozen=True)
class RowsLayout(TokenLayout):
    """``TokenLayout(grid, text_len, text_first=True)`` -- the order diffattn attends in -- plus, per
    batch row, ``(grid_start, row_len)``: where the grid starts in the model's sequence and how many of
    the ``seq_len`` tokens are the row's own (the rest is batch padding)."""

    rows: tuple = ()

    def __str__(self) -> str:
        starts = ", ".join(f"grid at {start} of {length}" for start, length in self.rows)
        return f"{super().__str__()[:-1]}; rows: {starts})"


@functools.lru_cache(maxsize=32)
def _orders(layout: RowsLayout, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(model_of_layout, layout_of_model)``, ``long [B, S]``: per row, the model position of each
    layout position (``[own dense tokens | batch padding | grid]``) and its inverse."""
    seq, size = layout.seq_len, layout.num_visual
    rows = []
    for start, length in layout.rows:
        rows.append(torch.cat([torch.arange(0, start), torch.arange(start + size, length),
                               torch.arange(length, seq), torch.arange(start, start + size)]))
    to_layout = torch.stack(rows)
    return to_layout.to(device), torch.argsort(to_layout, dim=1).to(device)


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Row-wise ``x[b, index[b]]`` along dim 1 of ``[B, S, ...]``."""
    return torch.take_along_dim(x, index.reshape(*index.shape, *([1] * (x.dim() - 2))), dim=1)


def _apply_rotary(x_in: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    # ZSingleStreamAttnProcessor's RoPE: channel pairs as complex numbers times freqs_cis, in float32.
    with torch.amp.autocast("cuda", enabled=False):
        x = torch.view_as_complex(x_in.float().reshape(*x_in.shape[:-1], -1, 2))
        return torch.view_as_real(x * freqs_cis.unsqueeze(2)).flatten(3).type_as(x_in)


class ZImageSparseProcessor:
    """Z-Image main-block self-attention with diffattn (same projections, norms and RoPE as diffusers'
    ``ZSingleStreamAttnProcessor``)."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, core: SparseAttentionCore):
        self.core = core

    # The parameters are exactly ZSingleStreamAttnProcessor's.
    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, freqs_cis: torch.Tensor | None = None) -> torch.Tensor:
        query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if freqs_cis is not None:
            query = _apply_rotary(query, freqs_cis)
            key = _apply_rotary(key, freqs_cis)
        dtype = query.dtype
        query, key = query.to(dtype), key.to(dtype)
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = attention_mask[:, None, None, :]

        layout = self.core.state.layout
        if isinstance(layout, RowsLayout) and layout.seq_len == query.shape[1]:
            to_layout, to_model = _orders(layout, str(query.device))
            query, key, value = (_gather(x, to_layout) for x in (query, key, value))
            if attention_mask is not None:
                attention_mask = torch.take_along_dim(attention_mask, to_layout[:, None, None, :], dim=-1)
            hidden_states = self.core.attend(query, key, value, backend=self._attention_backend,
                                             parallel_config=self._parallel_config, attn_mask=attention_mask)
            hidden_states = _gather(hidden_states, to_model)
        else:
            hidden_states = self.core.attend(query, key, value, backend=self._attention_backend,
                                             parallel_config=self._parallel_config, attn_mask=attention_mask)
        hidden_states = hidden_states.flatten(2, 3).to(dtype)
        output = attn.to_out[0](hidden_states)
        if len(attn.to_out) > 1:  # dropout
            output = attn.to_out[1](output)
        return output


def _tokens(latent: torch.Tensor, p: int, pf: int) -> tuple[int, int, int]:
    _, frames, height, width = latent.shape
    return frames // pf, height // p, width // p


class ZImageAdapter:
    """How diffattn meets Z-Image's transformer."""

    name = "z_image"
    transformer_classes = ("ZImageTransformer2DModel",)
    processor_class = ZImageSparseProcessor

    def sparse_processor_names(self, transformer) -> list[str]:
        """The main blocks' attention processors in execution order; each must be diffusers' default."""
        names = [f"layers.{i}.attention.processor" for i in range(len(transformer.layers))]
        processors = attn_processors(transformer)
        for name in names:
            if type(processors[name]) is not ZSingleStreamAttnProcessor:
                raise ValueError(f"diffattn cannot make {name} sparse: it is a {type(processors[name]).__name__}; "
                                 "diffattn replaces only diffusers' ZSingleStreamAttnProcessor")
        return names

    def token_layout(self, transformer, args, kwargs) -> TokenLayout | None:
        """The unified sequence's layout, computed as diffusers builds it (see the module docstring)."""
        x, caps = _argument("x", args, kwargs), _argument("cap_feats", args, kwargs)
        p, pf = _argument("patch_size", args, kwargs), _argument("f_patch_size", args, kwargs)
        if not x or not caps:
            return None
        omni = isinstance(x[0], list)
        targets = [row[-1] if omni else row for row in x]
        if any(t is None for t in targets):
            return None  # no target image in a row: diffusers itself cannot unpatchify it
        grids = {_tokens(t, p, pf) for t in targets}
        if len(grids) != 1:
            warnings.warn(f"diffattn: this Z-Image batch mixes target sizes {sorted(grids)} (in tokens); diffattn's "
                          "TokenLayout holds one grid, so this call runs diffusers' dense attention", UserWarning,
                          stacklevel=2)
            return None
        grid3 = grids.pop()
        grid = grid3[1:] if grid3[0] == 1 else grid3
        size = math.prod(grid3)
        if not omni:
            rows = [_padded(size) + _padded(len(cap)) for cap in caps]
            return TokenLayout(grid, text_len=max(rows) - size, text_first=False)
        siglip = _argument("siglip_feats", args, kwargs)
        with_siglip = siglip is not None and siglip[0] is not None and transformer.siglip_embedder is not None
        rows = []
        for b, images in enumerate(x):
            start = sum(_padded(len(cap)) for cap in caps[b])
            start += sum(SEQ_MULTI_OF if image is None else _padded(math.prod(_tokens(image, p, pf)))
                         for image in images[:-1])
            length = start + _padded(size)
            if with_siglip:
                length += sum(SEQ_MULTI_OF if s is None else _padded(s.shape[0] * s.shape[1]) for s in siglip[b])
            rows.append((start, length))
        seq = max(length for _, length in rows)
        return RowsLayout(grid, text_len=seq - size, text_first=True, rows=tuple(rows))

    def timestep(self, args, kwargs):
        """The call's timestep in scheduler units (Z-Image pipelines pass ``(1000 - t) / 1000``)."""
        t = _argument("t", args, kwargs)
        if isinstance(t, torch.Tensor):
            if not t.numel():
                return None
            t = t.reshape(-1)[0]
        return None if t is None else 1000.0 * (1.0 - t)


ADAPTER = ZImageAdapter()
