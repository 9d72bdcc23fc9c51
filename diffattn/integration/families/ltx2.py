"""LTX-2 (``LTX2VideoTransformer3DModel``: LTX-2 / 2.3 audio + video): sparse **video**
self-attention (``transformer_blocks.{i}.attn1``). The audio self-attention (``audio_attn1``, a 1-D
sequence of audio latents: no grid), the text cross-attentions (``attn2``, ``audio_attn2``) and the
audio-to-video / video-to-audio cross-attentions (``audio_to_video_attn``, ``video_to_audio_attn``)
keep diffusers' processors: audio tokens never enter the video self-attention.

q/k/v exactly as diffusers' ``LTX2AudioVideoAttnProcessor`` / ``LTX2PerturbedAttnProcessor`` (the
checkpoint's ``perturbed_attn`` picks one): RMS q/k norms across heads, RoPE in the checkpoint's
``rope_type`` (``interleaved`` or ``split``, applied before the head split), the optional per-head
output gate (``to_gate_logits``, LTX-2.3), and spatio-temporal guidance (``perturbation_mask`` /
``all_perturbed``: perturbed rows take the value projection instead of attention). diffattn's
processor declares the perturbed processor's parameters, a superset of the plain one's.

Tokens: the packed latent video ``[B, S, C]`` in raster order; the grid is ``num_frames`` x ``height``
x ``width`` (latent sizes, as the pipelines pass them) divided by ``patch_size_t`` / ``patch_size``,
else read from ``video_coords`` (``[B, 3, S, 2]`` patch bounds). Tokens after the grid --
LTX2ConditionPipeline's / IC-LoRA's appended keyframe and reference tokens -- are attended densely,
like text: ``TokenLayout(grid, text_len=extra, text_first=False)``. Calls with a video self-attention
mask (IC-LoRA's ``video_self_attention_mask``, an additive bias) run dense (the core warns once:
the mask is not text padding). Under context parallelism, calls with such extra tokens run dense too
(diffusers splits grid and extra tokens as one sequence; warned once).

Timestep: per-token ``[B, S]`` timesteps (0 on conditioning tokens) give the step by their largest
value, as for LTX-Video.
"""

from __future__ import annotations

import logging
import warnings

import torch
from diffusers.models.transformers.transformer_ltx2 import (
    LTX2AudioVideoAttnProcessor,
    LTX2PerturbedAttnProcessor,
    apply_interleaved_rotary_emb,
    apply_split_rotary_emb,
)

from ...tokens import TokenLayout
from ..core import SparseAttentionCore
from ..parallel import context_parallel_config

logger = logging.getLogger("diffattn")

# LTX2VideoTransformer3DModel.forward(hidden_states, audio_hidden_states, encoder_hidden_states,
#     audio_encoder_hidden_states, timestep, audio_timestep, sigma, audio_sigma, encoder_attention_mask,
#     audio_encoder_attention_mask, num_frames, height, width, fps, audio_num_frames, video_coords, ...)
_POSITIONS = {"hidden_states": 0, "timestep": 4, "num_frames": 10, "height": 11, "width": 12, "video_coords": 15}
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


class LTX2SparseProcessor:
    """LTX-2 video self-attention with diffattn (same projections, norms, RoPE, output gate and STG
    perturbation as diffusers' ``LTX2PerturbedAttnProcessor``; without a perturbation it is
    ``LTX2AudioVideoAttnProcessor``)."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, core: SparseAttentionCore):
        self.core = core

    # The parameters are exactly LTX2PerturbedAttnProcessor's (LTX2AudioVideoAttnProcessor's plus the two STG ones).
    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        query_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        key_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        perturbation_mask: torch.Tensor | None = None,
        all_perturbed: bool | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise RuntimeError("LTX2SparseProcessor is for the video self-attention (attn1); cross-attention keeps "
                               "diffusers' processor")
        batch_size, sequence_length, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.to_gate_logits is not None:
            gate_logits = attn.to_gate_logits(hidden_states)

        value = attn.to_v(hidden_states)
        if all_perturbed is None:
            all_perturbed = torch.all(perturbation_mask == 0) if perturbation_mask is not None else False

        if all_perturbed:
            hidden_states = value  # STG: skip attention, use the value projection
        else:
            query = attn.norm_q(attn.to_q(hidden_states))
            key = attn.norm_k(attn.to_k(hidden_states))
            if query_rotary_emb is not None:
                rotary = apply_interleaved_rotary_emb if attn.rope_type == "interleaved" else (
                    apply_split_rotary_emb if attn.rope_type == "split" else None)
                if rotary is not None:
                    query = rotary(query, query_rotary_emb)
                    key = rotary(key, key_rotary_emb if key_rotary_emb is not None else query_rotary_emb)
            query = query.unflatten(2, (attn.heads, -1))
            key = key.unflatten(2, (attn.heads, -1))
            value = value.unflatten(2, (attn.heads, -1))

            hidden_states = self._attend(query, key, value, attention_mask)
            hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
            if perturbation_mask is not None:
                hidden_states = torch.lerp(value.flatten(2, 3), hidden_states, perturbation_mask)

        if attn.to_gate_logits is not None:
            hidden_states = hidden_states.unflatten(2, (attn.heads, -1))
            gates = 2.0 * torch.sigmoid(gate_logits)
            hidden_states = (hidden_states * gates.unsqueeze(-1)).flatten(2, 3)

        return attn.to_out[1](attn.to_out[0](hidden_states))

    def _attend(self, query, key, value, attention_mask):
        layout = self.core.state.layout
        if (layout is not None and layout.text_len
                and context_parallel_config(self._parallel_config) is not None):
            _warn_once("cp-extra", "diffattn: LTX-2 tokens after the grid (keyframe / reference tokens) under context "
                                   "parallelism: diffusers splits them with the grid as one sequence; this call runs dense")
            return self.core._dispatch(query, key, value, attention_mask, self._attention_backend,
                                       self._parallel_config)
        return self.core.attend(query, key, value, backend=self._attention_backend,
                                parallel_config=self._parallel_config, attn_mask=attention_mask)


def grid_from_coords(coords: torch.Tensor, seq_len: int) -> tuple[tuple[int, int, int], int] | None:
    """``((F, H, W), n_grid)`` of the leading raster grid in ``video_coords`` (``[B, 3, S, 2]`` patch
    bounds, or ``[B, 3, S]``), or None."""
    if not isinstance(coords, torch.Tensor) or coords.dim() not in (3, 4) or coords.shape[1] != 3:
        return None
    c = coords[0, :, :, 0] if coords.dim() == 4 else coords[0]
    if c.shape[1] != seq_len or seq_len == 0:
        return None
    first = c[:, 0]
    w = int((c[1] == first[1]).logical_and(c[0] == first[0]).long().cumprod(0).sum())
    if w == 0:
        return None
    h = int(((c[0] == first[0]).long().cumprod(0).sum())) // w
    if h == 0:
        return None
    frame_len = h * w
    f = 1
    while (f + 1) * frame_len <= seq_len:
        nxt = c[:, f * frame_len : (f + 1) * frame_len]
        if not (bool((nxt[0] == nxt[0, 0]).all()) and torch.equal(nxt[1:], c[1:, :frame_len])
                and bool(nxt[0, 0] > c[0, (f - 1) * frame_len])):
            break
        f += 1
    n = f * frame_len
    rows, cols = c[1, :frame_len].reshape(h, w), c[2, :frame_len].reshape(h, w)
    raster = (bool((rows == rows[:, :1]).all()) and bool((cols == cols[:1, :]).all())
              and bool((rows[1:, 0] > rows[:-1, 0]).all()) and bool((cols[0, 1:] > cols[0, :-1]).all()))
    return ((f, h, w), n) if raster else None


class LTX2Adapter:
    """How diffattn meets LTX-2's transformer."""

    name = "ltx2"
    transformer_classes = ("LTX2VideoTransformer3DModel",)
    processor_class = LTX2SparseProcessor
    replaces = (LTX2AudioVideoAttnProcessor, LTX2PerturbedAttnProcessor)

    def sparse_processor_names(self, transformer) -> list[str]:
        """Video self-attention processors in execution order; each must be one of diffusers' defaults."""
        names = [f"transformer_blocks.{i}.attn1.processor" for i in range(len(transformer.transformer_blocks))]
        processors = transformer.attn_processors
        for name in names:
            if type(processors[name]) not in self.replaces:
                raise ValueError(f"diffattn cannot make {name} sparse: it is a {type(processors[name]).__name__}; "
                                 "diffattn replaces only diffusers' LTX2AudioVideoAttnProcessor / "
                                 "LTX2PerturbedAttnProcessor")
        return names

    def token_layout(self, transformer, args, kwargs) -> TokenLayout | None:
        """The (F, H, W) grid of the call, with any tokens after it dense; None (dense, warned) when
        neither the sizes nor ``video_coords`` describe a grid at the start of the sequence."""
        hidden = _arg(args, kwargs, "hidden_states")
        seq_len = int(hidden.shape[1])
        frames, height, width = (_arg(args, kwargs, n) for n in ("num_frames", "height", "width"))
        grid = None
        if frames is not None and height is not None and width is not None:
            pt, p = transformer.config.patch_size_t, transformer.config.patch_size
            grid = (-(-int(frames) // pt), -(-int(height) // p), -(-int(width) // p))  # as prepare_video_coords
            if min(grid) < 1 or grid[0] * grid[1] * grid[2] > seq_len:
                raise ValueError(f"LTX-2 transformer call: num_frames={frames}, height={height}, width={width} "
                                 f"(patch_size_t={pt}, patch_size={p}) describe more tokens than the {seq_len} of "
                                 "hidden_states")
        else:
            found = grid_from_coords(_arg(args, kwargs, "video_coords"), seq_len)
            if found is not None:
                grid = found[0]
        if grid is None:
            warnings.warn(f"diffattn: this LTX-2 call's {seq_len} video tokens do not start with one (F, H, W) grid (no "
                          "num_frames/height/width, and video_coords are not a raster grid); it runs dense",
                          UserWarning, stacklevel=2)
            return None
        extra = seq_len - grid[0] * grid[1] * grid[2]
        return TokenLayout(grid, text_len=extra, text_first=False) if extra else TokenLayout(grid)

    def timestep(self, args, kwargs):
        """The call's timestep: the largest of per-token timesteps ``[B, S]`` (conditioning tokens carry 0)."""
        t = _arg(args, kwargs, "timestep")
        if isinstance(t, torch.Tensor) and t.numel() > 1:
            return t.amax()
        return t


ADAPTER = LTX2Adapter()
