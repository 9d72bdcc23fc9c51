"""diffattn: sparse attention for diffusers DiT image and video generation.

>>> import torch, diffattn
>>> layout = diffattn.TokenLayout((4, 8, 8))
>>> q = k = v = torch.randn(1, layout.seq_len, 2, 64)
>>> diffattn.attention(q, k, v, diffattn.Radial(decay=0.2), layout=layout).shape
torch.Size([1, 256, 2, 64])
"""

from .attention import attention, choose_impl, select_blocks
from .block_layout import BlockLayout, build_block_layout
from .patterns import BlockTopK, Dense, Pattern, Piecewise, Radial, SlidingWindow, parse_pattern
from .reference import masked_attention_reference
from .tokens import TokenLayout

__version__ = "0.1.0"

_LAZY = {name: "integration" for name in ("apply", "remove", "sparse_processors", "SparseHandle", "Schedule", "StepCache")}


def __getattr__(name):
    # diffusers is imported only when the integration is used.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'diffattn' has no attribute {name!r}")

__all__ = [
    "BlockLayout",
    "BlockTopK",
    "Schedule",
    "SparseHandle",
    "StepCache",
    "apply",
    "remove",
    "sparse_processors",
    "Dense",
    "Pattern",
    "Piecewise",
    "Radial",
    "SlidingWindow",
    "TokenLayout",
    "attention",
    "build_block_layout",
    "choose_impl",
    "masked_attention_reference",
    "parse_pattern",
    "select_blocks",
]
