"""Why are partial blocks slow? Time one window layout three ways (bf16, H100):
as is; with its partial blocks computed without the window mask (bounds only); and with
its partial blocks moved to the unmasked full-block loop. Results are not all correct:
this isolates costs only."""

import torch
import triton.testing

import diffattn
import diffattn.kernels  # registers torch.ops.diffattn
from diffattn import SlidingWindow, TokenLayout
from diffattn.block_layout import build_block_layout

layout = TokenLayout((21, 30, 52))
q, k, v = (torch.randn(1, layout.seq_len, 12, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
for window in [(21, 12, 21), (3, 18, 31)]:
    pattern = SlidingWindow(window)
    blocks = build_block_layout(pattern, layout.grid, 128, 64, device="cuda")
    kind, params = pattern.kernel_mask(layout.grid)
    geometry = [0, layout.num_visual, 0, 0, 30, 52]
    op = torch.ops.diffattn.block_sparse_attention
    runs = {
        "as is": lambda: op(q, k, v, blocks.full_num, blocks.full_idx, blocks.part_num, blocks.part_idx, geometry, list(params), kind, 0.088, 128, 64),
        "partial, bounds only": lambda: op(q, k, v, blocks.full_num, blocks.full_idx, blocks.part_num, blocks.part_idx, geometry, list(params), 0, 0.088, 128, 64),
        "partial as full": lambda: op(q, k, v, blocks.part_num, blocks.part_idx, blocks.full_num, blocks.full_idx, geometry, list(params), 0, 0.088, 128, 64),
    }
    for name, fn in runs.items():
        fn()
        ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        print(f"window {window} {blocks.block_density:.1%} {name:22}: {ms:7.2f} ms")
