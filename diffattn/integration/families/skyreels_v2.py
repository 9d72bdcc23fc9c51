"""SkyReels-V2 (``SkyReelsV2Transformer3DModel``: T2V, I2V, diffusion forcing): sparse
self-attention (``blocks.{i}.attn1``); cross-attention (``attn2``) untouched.

Shares Wan's processor: diffusers' ``SkyReelsV2AttnProcessor`` builds q/k/v exactly as Wan's (same
projections, RMS q/k norms across heads, interleaved RoPE from ``SkyReelsV2RotaryPosEmbed``, which
equals Wan's), and its self-attention sees no text.

Tokens: the latent video ``[B, C, F, H, W]`` patchified by ``patch_size`` into an (F, H, W) grid.

Diffusion forcing: with ``num_frame_per_block > 1`` (``SkyReelsV2DiffusionForcingPipeline(...,
causal_block_size=k)`` sets it) diffusers passes a block-causal self-attention mask (a frame attends
only to frames of its own and earlier blocks). A sparse pattern does not combine with that mask, so
such calls run diffusers' dense masked attention (exact output, no speed-up) and say so in a
``UserWarning``. Without it (``causal_block_size=1``, the synchronous mode) the per-frame timesteps ``[B, F]``
change only the modulation, and the pattern applies; the step index is read from the largest frame
timestep (the least denoised frame; prefix frames carry 0).
"""

from __future__ import annotations

import warnings

import torch

from ...tokens import TokenLayout
from .wan import WanAdapter, WanSparseProcessor


class SkyReelsV2Adapter(WanAdapter):
    """How diffattn meets SkyReels-V2's transformer."""

    name = "wan"
    transformer_classes = ("SkyReelsV2Transformer3DModel",)
    processor_class = WanSparseProcessor

    def token_layout(self, transformer, args, kwargs) -> TokenLayout | None:
        """The (F, H, W) token grid, or None (dense, warned once) under a block-causal mask."""
        block = getattr(transformer.config, "num_frame_per_block", 1) or 1
        if block > 1:
            warnings.warn(
                f"diffattn: SkyReels-V2 with num_frame_per_block={block} (diffusion forcing with causal_block_size > 1) "
                "attends through a block-causal mask, which a sparse pattern does not combine with; these calls run "
                "diffusers' dense masked attention", UserWarning, stacklevel=2)
            return None
        return super().token_layout(transformer, args, kwargs)

    def timestep(self, args, kwargs):
        """The call's timestep: the largest of diffusion forcing's per-frame timesteps ``[B, F]``."""
        t = super().timestep(args, kwargs)
        if isinstance(t, torch.Tensor) and t.numel() > 1:
            return t.amax()
        return t


ADAPTER = SkyReelsV2Adapter()
