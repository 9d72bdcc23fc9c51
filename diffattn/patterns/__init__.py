"""Attention patterns: which keys each query attends to."""

from .base import EMPTY, FULL, PARTIAL, MaskMod, Pattern
from .dense import Dense
from .radial import Radial
from .piecewise import Piecewise
from .spec import parse_pattern
from .topk import BlockTopK
from .window import AxisWindow, SlidingWindow

__all__ = [
    "EMPTY",
    "FULL",
    "PARTIAL",
    "AxisWindow",
    "BlockTopK",
    "Dense",
    "MaskMod",
    "Pattern",
    "Piecewise",
    "Radial",
    "SlidingWindow",
    "parse_pattern",
]
