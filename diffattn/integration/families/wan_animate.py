"""Wan 2.2 Animate (``WanAnimateTransformer3DModel``): sparse self-attention (``blocks.{i}.attn1``);
the text / CLIP-image cross-attention (``attn2``) and the face adapter (``face_adapter.{k}``, a
per-frame cross-attention to motion tokens with its own processor) are untouched.

Shares Wan's processor: diffusers' ``transformer_wan_animate.WanAttnProcessor`` is a copy of Wan's
(same projections, RMS q/k norms across heads and interleaved RoPE).

Tokens: the latent ``[B, C, T + 1, H, W]`` patchified by ``patch_size`` into a ``(T + 1, H', W')``
grid. Latent frame 0 is the **reference (character) image**, not a video frame: diffusers adds the
pose latents to frames ``1 ..`` only. diffattn attends the reference frame's ``H' * W'`` tokens
densely in both directions, like text (every query sees the whole reference image, its tokens see
everything), and applies the pattern to the ``(T, H', W')`` grid of the video frames behind it:
``TokenLayout((T, H', W'), text_len=H' * W', text_first=True)``. Self-attention sees no text.
"""

from __future__ import annotations

from ...tokens import TokenLayout
from .wan import WanAdapter, WanSparseProcessor


class WanAnimateAdapter(WanAdapter):
    """How diffattn meets Wan Animate's transformer."""

    name = "wan"
    transformer_classes = ("WanAnimateTransformer3DModel",)
    processor_class = WanSparseProcessor

    def token_layout(self, transformer, args, kwargs) -> TokenLayout:
        """The video frames' grid, with the reference frame's tokens first and dense."""
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        _, _, frames, height, width = hidden.shape
        pt, ph, pw = transformer.config.patch_size
        f, h, w = frames // pt, height // ph, width // pw
        if f < 2 or pt != 1:
            return TokenLayout((f, h, w))  # no video frame behind the reference, or frames merged by the patch
        return TokenLayout((f - 1, h, w), text_len=h * w, text_first=True)


ADAPTER = WanAnimateAdapter()
