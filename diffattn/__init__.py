"""diffattn: sparse attention for diffusers DiT image and video generation.

>>> import torch, diffattn
>>> layout = diffattn.TokenLayout((4, 8, 8))
>>> q = k = v = torch.randn(1, layout.seq_len, 2, 64)
>>> diffattn.attention(q, k, v, diffattn.Radial(decay=0.2), layout=layout).shape
torch.Size([1, 256, 2, 64])
"""

from .attention import attention, choose_impl
from .block_layout import BlockLayout, build_block_layout
from .patterns import Dense, Pattern, Radial, SlidingWindow, parse_pattern
from .reference import masked_attention_reference
from .tokens import TokenLayout

__version__ = "0.1.0"

__all__ = [
    "BlockLayout",
    "Dense",
    "Pattern",
    "Radial",
    "SlidingWindow",
    "TokenLayout",
    "attention",
    "build_block_layout",
    "choose_impl",
    "masked_attention_reference",
    "parse_pattern",
]
