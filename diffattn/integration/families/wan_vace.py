"""Wan VACE (``WanVACETransformer3DModel``, Wan 2.1 / 2.2 VACE): sparse self-attention in the main
blocks and in the VACE control blocks; every cross-attention untouched.

Shares Wan's adapter and processor: diffusers builds both kinds of block with ``WanAttention`` and
``WanAttnProcessor``, so q/k/v, norms and RoPE are exactly Wan's.

What becomes sparse, in execution order: ``vace_blocks.{j}.attn1`` (the control branch runs first,
over the control tokens), then ``blocks.{i}.attn1``. Both see the same (F, H, W) grid: diffusers
patchifies the control latents with the video's patch size and zero-pads them to the video's token
count, and applies the video's RoPE to them. For ``dense_layers`` the control block ``j`` counts as
layer ``vace_layers[j]`` (the main block its hint is added to), so ``dense_layers=1`` keeps both
``blocks.0.attn1`` and ``vace_blocks.0.attn1`` dense.

Tokens: the latent video ``[B, C, F, H, W]`` patchified by ``patch_size``; no text in
self-attention. Reference images (``WanVACEPipeline(reference_images=...)``) are prepended by the
pipeline as extra latent *frames*: they are frames ``0 .. R-1`` of the grid, with frame RoPE
positions, and the transformer call does not say how many there are. A pattern therefore treats them
as frames (``Radial(sink=True)`` attends frame 0 from every frame; a temporal window sees them only
from nearby frames).
"""

from __future__ import annotations

from .wan import WanAdapter, WanSparseProcessor


class WanVACEAdapter(WanAdapter):
    """How diffattn meets Wan VACE's transformer (Wan's processor and token grid)."""

    name = "wan"
    transformer_classes = ("WanVACETransformer3DModel",)
    processor_class = WanSparseProcessor

    def sparse_processor_names(self, transformer) -> list[str]:
        """Self-attention processors in execution order: VACE control blocks, then the main blocks."""
        vace = [f"vace_blocks.{j}.attn1.processor" for j in range(len(transformer.vace_blocks))]
        return vace + [f"blocks.{i}.attn1.processor" for i in range(len(transformer.blocks))]

    def processor_layers(self, transformer) -> list[int]:
        """Control block ``j`` counts as layer ``vace_layers[j]``; main block ``i`` as layer ``i``."""
        return list(transformer.config.vace_layers) + list(range(len(transformer.blocks)))


ADAPTER = WanVACEAdapter()
