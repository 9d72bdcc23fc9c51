"""MiniMax-H3 (``MiniMaxH3Transformer3DModel``, joint video + audio; t2va, fl2va, ref2va): sparse
self-attention of every block (``transformer_blocks.{i}.attn``) over the packed sequence; the text
token refiner keeps diffusers' processor.

q/k/v exactly as diffusers' ``MiniMaxH3AttnProcessor``: separate or fused ``to_qkv`` projections,
per-head RMS q/k norms, rotate-half RoPE on the leading ``rotary_dim`` channels of each head.

Tokens: one packed 1-D sequence that the caller lays out, with ``position_ids`` ``(t, h, w)`` per row.
MiniMax-H3's modular pipeline packs ``[text | keyframes (fl2va) | target audio | target video]`` or
``[text | references (images, videos and their soundtracks, audio) | target audio | target video]``
(ref2va). The **target video** is the longest run of video rows ending the sequence whose
``position_ids`` form one raster grid -- the same ``(h, w)`` grid in every frame (``h`` constant along
a row and increasing across rows, ``w`` increasing along a row), time constant within a frame and
increasing across frames -- and that grid is ``(F, H, W)``, whatever the resolution and length.
Every other row (text, keyframes, references, audio) is attended densely, like text:
``TokenLayout(grid, text_len=S - F*H*W, text_first=True)``. A keyframe anchored at the first frame
repeats its time and so stays out of the grid. A call whose last row is no video row runs dense
(warned). The pipeline always puts the target audio right before the target video; a caller who
packs a conditioning video of the same ``(h, w)`` grid and earlier times directly in front of it
would have that video counted as earlier frames of the grid (attended sparsely, as grid tokens).

Context parallelism: diffusers splits the packed sequence as one tensor (``_cp_plan`` at
``transformer_blocks.0``), not text and video separately; calls with dense rows in front of the grid
then run dense (warned once), calls that are all grid run sparse.

Timestep: the target video rows' timestep (``timestep[timestep_indices[last row]]``), in the
scheduler's units -- MiniMax-H3's ``t = 1 - sigma`` *rises* from 0 (noise) to 1 (clean). The step
index therefore comes from the pipeline's scheduler: apply diffattn to the (modular) pipeline, or
pass ``scheduler=`` to ``diffattn.sparse_processors`` (ref2va's transformer is the pipeline's
``transformer_ref``). Applied to a bare transformer, a rising timestep reads as a new generation at
every call (step 0), so keep ``dense_steps=0`` and ``cache=None`` there.
"""

from __future__ import annotations

import functools
import logging
import warnings

import torch
from diffusers.models.transformers.transformer_minimax_h3 import MiniMaxH3AttnProcessor, _apply_rotary_emb

from ._calls import call_argument
from ...tokens import TokenLayout
from ..core import SparseAttentionCore
from ..parallel import context_parallel_config

logger = logging.getLogger("diffattn")

# MiniMaxH3Transformer3DModel.forward(hidden_states, audio_hidden_states, encoder_hidden_states, timestep,
#                                     timestep_indices, token_tags, position_ids, video_indices, ...)
_POSITIONS = {"timestep": 3, "timestep_indices": 4, "position_ids": 6, "video_indices": 7}
_warned: set = set()


_argument = functools.partial(call_argument, _POSITIONS)


class MiniMaxH3SparseProcessor:
    """MiniMax-H3 self-attention with diffattn (same projections, norms and RoPE as diffusers'
    ``MiniMaxH3AttnProcessor``)."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, core: SparseAttentionCore):
        self.core = core

    # The parameters are exactly MiniMaxH3AttnProcessor's (MiniMaxH3Attention passes them positionally).
    def __call__(self, attn, hidden_states: torch.Tensor, rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = attn.norm_q(query.unflatten(-1, (attn.heads, -1)))
        key = attn.norm_k(key.unflatten(-1, (attn.heads, -1)))
        value = value.unflatten(-1, (attn.heads, -1))
        if rotary_emb is not None:
            query = _apply_rotary_emb(query, *rotary_emb)
            key = _apply_rotary_emb(key, *rotary_emb)

        layout = self.core.state.layout
        if layout is not None and layout.text_len and context_parallel_config(self._parallel_config) is not None:
            if "cp" not in _warned:
                _warned.add("cp")
                logger.warning("diffattn: MiniMax-H3's packed sequence is split as one tensor under context parallelism; "
                               "calls with text / conditioning / audio rows before the target video run dense")
            hidden_states = self.core._dispatch(query, key, value, attention_mask, self._attention_backend,
                                                self._parallel_config)
        else:
            hidden_states = self.core.attend(query, key, value, backend=self._attention_backend,
                                             parallel_config=self._parallel_config, attn_mask=attention_mask)
        hidden_states = hidden_states.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](hidden_states))


def _run(same: torch.Tensor) -> int:
    """Length of the leading run of True in ``same`` (bool ``[n]``)."""
    return int(same.long().cumprod(0).sum())


def trailing_grid(positions: torch.Tensor) -> tuple[int, int, int] | None:
    """``(F, H, W)`` of the longest suffix of ``positions`` (``[n, 3]``: t, h, w) that is one raster
    grid: every frame the same ``(h, w)`` grid -- ``h`` constant along a row and strictly increasing
    across rows, ``w`` strictly increasing along a row and the same in every row -- time constant
    within a frame and strictly increasing across frames. None when not even the last row is one.

    A block in front of the grid that repeats a frame's time (a keyframe anchored at the first frame)
    or restarts its rows (``h`` not below the next row's) is not part of it.
    """
    p = positions.detach().to("cpu", torch.float64)
    n = p.shape[0]
    if n == 0:
        return None
    back = p.flip(0)  # backwards from the last row
    t, h, w = back.unbind(1)
    # the last row: same t and h as the last token, w strictly decreasing going backwards
    width = 1 + _run((t[1:] == t[0]) & (h[1:] == h[0]) & (w[1:] < w[:-1]))
    row_w = p[n - width :, 2]
    rows = 1
    while (rows + 1) * width <= n:  # earlier rows of the last frame
        row = p[n - (rows + 1) * width : n - rows * width]
        later_h = p[n - rows * width, 1]
        if not (bool((row[:, 0] == t[0]).all()) and bool((row[:, 1] == row[0, 1]).all())
                and bool(row[0, 1] < later_h) and torch.equal(row[:, 2], row_w)):
            break
        rows += 1
    frame = rows * width
    last = p[n - frame :]
    frames = 1
    while (frames + 1) * frame <= n:  # earlier frames: the same (h, w) grid at an earlier, constant time
        block = p[n - (frames + 1) * frame : n - frames * frame]
        later_t = p[n - frames * frame, 0]
        if not (torch.equal(block[:, 1:], last[:, 1:]) and bool((block[:, 0] == block[0, 0]).all())
                and bool(block[0, 0] < later_t)):
            break
        frames += 1
    return frames, rows, width


class MiniMaxH3Adapter:
    """How diffattn meets MiniMax-H3's transformer."""

    name = "minimax_h3"
    transformer_classes = ("MiniMaxH3Transformer3DModel",)
    processor_class = MiniMaxH3SparseProcessor

    def sparse_processor_names(self, transformer) -> list[str]:
        """The blocks' self-attention processors in execution order (not the token refiner's)."""
        names = [f"transformer_blocks.{i}.attn.processor" for i in range(len(transformer.transformer_blocks))]
        processors = transformer.attn_processors
        for name in names:
            if type(processors[name]) is not MiniMaxH3AttnProcessor:
                raise ValueError(f"diffattn cannot make {name} sparse: it is a {type(processors[name]).__name__}; "
                                 "diffattn replaces only diffusers' MiniMaxH3AttnProcessor")
        return names

    def token_layout(self, transformer, args, kwargs) -> TokenLayout | None:
        """The target video's grid at the end of the packed sequence, everything before it dense."""
        positions = _argument("position_ids", args, kwargs)
        video = _argument("video_indices", args, kwargs)
        if positions is None or video is None:
            return None
        seq_len = positions.shape[0]
        video = video.detach().reshape(-1).cpu()
        expected = torch.arange(seq_len - 1, seq_len - 1 - video.numel(), -1)  # the sequence's last rows, backwards
        tail = int((video.flip(0) == expected.to(video.dtype)).long().cumprod(0).sum())  # trailing video rows
        grid = trailing_grid(positions[seq_len - tail :]) if tail else None
        if grid is None:
            warnings.warn("diffattn: this MiniMax-H3 call's trailing video rows are not one raster (F, H, W) grid of "
                          "position_ids; it runs dense", UserWarning, stacklevel=2)
            return None
        return TokenLayout(grid, text_len=seq_len - grid[0] * grid[1] * grid[2], text_first=True)

    def timestep(self, args, kwargs):
        """The target video rows' timestep (``t = 1 - sigma``, the scheduler's units)."""
        t = _argument("timestep", args, kwargs)
        indices = _argument("timestep_indices", args, kwargs)
        if isinstance(t, torch.Tensor) and isinstance(indices, torch.Tensor) and indices.numel() and t.numel():
            return t.reshape(-1)[indices.reshape(-1)[-1]]
        return t


ADAPTER = MiniMaxH3Adapter()
