"""Triton kernels of diffattn and their launchers (installed as ``diffattn.kernels``).

Importing this package imports ``triton``; the rest of diffattn imports it only when a
kernel is launched.
"""

from .ops import (
    MAX_HEAD_DIM,
    block_sparse_attention,
    block_sparse_partials,
    interpreting,
    kernel_block_size,
    launch_config,
    merge_partials,
    piecewise_attention,
)

__all__ = ["MAX_HEAD_DIM", "block_sparse_attention", "block_sparse_partials", "interpreting", "kernel_block_size", "launch_config",
           "merge_partials", "piecewise_attention"]
