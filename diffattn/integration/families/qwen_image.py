"""Qwen-Image (``QwenImageTransformer2DModel``: text-to-image, Edit / Edit-Plus, Layered,
ControlNet, inpainting): sparse joint attention in every dual-stream block
(``transformer_blocks.{i}.attn``, the model's only attention).

q/k/v exactly as diffusers' ``QwenDoubleStreamAttnProcessor2_0``: image projections ``to_q/k/v``
and text projections ``add_q/k/v_proj`` split by head, RMS q/k norms per stream, complex RoPE
(``apply_rotary_emb_qwen(use_real=False)``) with the image and the text frequencies, joined as
``[text; image]``. A text key-padding mask (``encoder_hidden_states_mask``) becomes per-row text
lengths, so padded text keys stay masked in the sparse kernels; a mask whose valid tokens are not a
prefix runs that call dense (warned once, exact).

Tokens: ``img_shapes`` (the transformer argument that also drives RoPE; batch entry 0 is read, as
diffusers' RoPE does) lists the ``(frames, height, width)`` of every image packed into the image
stream, target first. The target image is the grid, ``(H, W)`` -- or ``(F, H, W)`` when its entry
has ``F > 1``; with ``use_layer3d_rope`` (Qwen-Image-Layered) the leading entries of the target's
size before the final condition image are the target's layers, one grid ``(layers, H, W)`` (their
RoPE frame positions are 0, 1, ...). Every other image (Edit's condition images, Layered's condition
image) is attended densely, like text: the sequence is ``[text; target; conditions]``, which the
processor reorders to ``[conditions; text; target]`` for attention and back (``_packed``). Under
context parallelism such reordered calls run dense (warned once); plain text-to-image calls are
``[text; target]`` and run sparse under Ulysses.

Timestep: Qwen-Image pipelines pass ``timestep / 1000``; ``timestep()`` returns scheduler units.
"""

from __future__ import annotations

import functools
import warnings

import torch
from diffusers.models.transformers.transformer_qwenimage import (
    QwenDoubleStreamAttnProcessor2_0,
    apply_rotary_emb_qwen,
)

from ._calls import call_argument
from ...tokens import TokenLayout
from ..core import SparseAttentionCore
from ._packed import attend_packed, packed_layout

# QwenImageTransformer2DModel.forward(hidden_states, encoder_hidden_states, encoder_hidden_states_mask, timestep,
#                                     img_shapes, ...)
_POSITIONS = {"hidden_states": 0, "encoder_hidden_states": 1, "timestep": 3, "img_shapes": 4}


_argument = functools.partial(call_argument, _POSITIONS)


class QwenImageSparseProcessor:
    """Qwen-Image joint attention with diffattn's sparse attention (same projections, norms, RoPE
    and ``[text; image]`` order as diffusers' ``QwenDoubleStreamAttnProcessor2_0``)."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, core: SparseAttentionCore):
        self.core = core

    # The parameters are exactly QwenDoubleStreamAttnProcessor2_0's: Attention.forward drops keyword
    # arguments a processor does not declare.
    def __call__(
        self,
        attn,
        hidden_states: torch.FloatTensor,
        encoder_hidden_states: torch.FloatTensor = None,
        encoder_hidden_states_mask: torch.FloatTensor = None,
        attention_mask: torch.FloatTensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.FloatTensor:
        if encoder_hidden_states is None:
            raise ValueError("QwenImageSparseProcessor requires encoder_hidden_states (text stream)")
        if attention_mask is not None:
            raise ValueError("QwenImageSparseProcessor does not accept an external attention_mask; pass "
                             "encoder_hidden_states_mask (as diffusers' QwenDoubleStreamAttnProcessor2_0)")
        if encoder_hidden_states_mask is not None:
            image_mask = torch.ones((hidden_states.shape[0], hidden_states.shape[1]), dtype=torch.bool,
                                    device=hidden_states.device)
            attention_mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)[:, None, None, :]

        seq_txt = encoder_hidden_states.shape[1]
        head_dim = attn.inner_dim // attn.heads
        img_query = attn.to_q(hidden_states).unflatten(-1, (-1, head_dim))
        img_key = attn.to_k(hidden_states).unflatten(-1, (-1, head_dim))
        img_value = attn.to_v(hidden_states).unflatten(-1, (-1, head_dim))
        txt_query = attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
        txt_key = attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
        txt_value = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))

        if attn.norm_q is not None:
            img_query = attn.norm_q(img_query)
        if attn.norm_k is not None:
            img_key = attn.norm_k(img_key)
        if attn.norm_added_q is not None:
            txt_query = attn.norm_added_q(txt_query)
        if attn.norm_added_k is not None:
            txt_key = attn.norm_added_k(txt_key)

        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            img_query = apply_rotary_emb_qwen(img_query, img_freqs, use_real=False)
            img_key = apply_rotary_emb_qwen(img_key, img_freqs, use_real=False)
            txt_query = apply_rotary_emb_qwen(txt_query, txt_freqs, use_real=False)
            txt_key = apply_rotary_emb_qwen(txt_key, txt_freqs, use_real=False)

        joint_query = torch.cat([txt_query, img_query], dim=1)
        joint_key = torch.cat([txt_key, img_key], dim=1)
        joint_value = torch.cat([txt_value, img_value], dim=1)

        joint_hidden_states = attend_packed(self.core, joint_query, joint_key, joint_value,
                                            backend=self._attention_backend, parallel_config=self._parallel_config,
                                            attn_mask=attention_mask)
        joint_hidden_states = joint_hidden_states.flatten(2, 3).to(joint_query.dtype)

        txt_attn_output = joint_hidden_states[:, :seq_txt, :]
        img_attn_output = joint_hidden_states[:, seq_txt:, :]
        img_attn_output = attn.to_out[0](img_attn_output.contiguous())
        if len(attn.to_out) > 1:
            img_attn_output = attn.to_out[1](img_attn_output)
        txt_attn_output = attn.to_add_out(txt_attn_output.contiguous())
        return img_attn_output, txt_attn_output


def image_entries(img_shapes) -> list[tuple[int, int, int]] | None:
    """The ``(F, H, W)`` entries of batch item 0 of ``img_shapes``, read as diffusers' Qwen RoPE
    reads them, or None when they are not readable."""
    shapes = img_shapes
    if isinstance(shapes, list):
        if not shapes:
            return None
        shapes = shapes[0]
    if not isinstance(shapes, list):
        shapes = [shapes]
    try:
        return [tuple(int(x) for x in s) for s in shapes if len(s) == 3]
    except (TypeError, ValueError):
        return None


class QwenImageAdapter:
    """How diffattn meets Qwen-Image's transformer."""

    name = "qwen_image"
    transformer_classes = ("QwenImageTransformer2DModel",)
    processor_class = QwenImageSparseProcessor

    def sparse_processor_names(self, transformer) -> list[str]:
        """Joint-attention processors in execution order; each must be diffusers' default."""
        names = [f"transformer_blocks.{i}.attn.processor" for i in range(len(transformer.transformer_blocks))]
        processors = transformer.attn_processors
        for name in names:
            if type(processors[name]) is not QwenDoubleStreamAttnProcessor2_0:
                raise ValueError(f"diffattn cannot make {name} sparse: it is a {type(processors[name]).__name__}; "
                                 "diffattn replaces only diffusers' QwenDoubleStreamAttnProcessor2_0")
        return names

    def token_layout(self, transformer, args, kwargs) -> TokenLayout | None:
        """``[text; target]`` as a TokenLayout, other images dense (a PackedLayout), or None (dense,
        with a warning) when ``img_shapes`` does not describe the image tokens."""
        hidden = _argument("hidden_states", args, kwargs)
        text = _argument("encoder_hidden_states", args, kwargs)
        entries = image_entries(_argument("img_shapes", args, kwargs))
        if hidden is None or text is None or not entries:
            return None
        sizes = [f * h * w for f, h, w in entries]
        if sum(sizes) != hidden.shape[1] or min(sizes) < 1:
            warnings.warn(f"diffattn: Qwen-Image img_shapes {entries} do not describe the {hidden.shape[1]} image tokens; "
                          "this call runs diffusers' dense attention", UserWarning, stacklevel=2)
            return None
        first = entries[0]
        layers = 1
        if getattr(transformer.config, "use_layer3d_rope", False) and first[0] == 1:
            while layers < len(entries) - 1 and entries[layers] == first:
                layers += 1
        f, h, w = first
        frames = f * layers
        grid = (h, w) if frames == 1 else (frames, h, w)
        target = frames * h * w
        runs = [("text", text.shape[1]), ("grid", target), ("dense", hidden.shape[1] - target)]
        return packed_layout(grid, runs, text_first=True)

    def timestep(self, args, kwargs):
        """The call's timestep in scheduler units (Qwen-Image pipelines pass ``t / 1000``)."""
        t = _argument("timestep", args, kwargs)
        if t is None:
            return None
        if isinstance(t, torch.Tensor):
            if not t.numel():
                return None
            t = t.reshape(-1)[0]
        return float(t) * 1000.0


ADAPTER = QwenImageAdapter()
