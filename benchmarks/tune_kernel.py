"""Sweep launch configurations of the block-sparse kernel on the GPU (bf16); writes JSON.

    python benchmarks/tune_kernel.py --out tune.json
"""

import argparse
import json

import torch
import triton.testing

import diffattn
import diffattn.kernels.ops as ops
from diffattn import Dense, SlidingWindow, TokenLayout
from diffattn.bench.kernels import environment

CONFIGS = [  # block_q, block_k, num_warps, num_stages
    (128, 64, 8, 3), (128, 64, 4, 3), (128, 64, 8, 4), (128, 128, 8, 3), (128, 128, 8, 2),
    (128, 32, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3), (64, 32, 4, 4),
]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="tune.json")
    args = parser.parse_args()
    layout = TokenLayout((21, 30, 52))
    cases = [("dense D128", Dense(), 12, 128), ("window D128", SlidingWindow((7, 15, 27)), 12, 128),
             ("dense D64", Dense(), 24, 64), ("dense D256", Dense(), 6, 256)]
    rows = []
    for label, pattern, heads, dim in cases:
        q, k, v = (torch.randn(1, layout.seq_len, heads, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        for bq, bk, warps, stages in CONFIGS:
            ops.launch_config = lambda d, dt, w=warps, s=stages: {"num_warps": w, "num_stages": s}
            fn = lambda: diffattn.attention(q, k, v, pattern, layout=layout, impl="triton", block_size=(bq, bk))  # noqa: E731
            try:
                fn()
                ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            except Exception as exc:  # out of shared memory etc.
                print(f"{label} {bq}x{bk} w{warps} s{stages}: {type(exc).__name__}")
                continue
            rows.append({"case": label, "block_q": bq, "block_k": bk, "num_warps": warps, "num_stages": stages, "ms": ms})
            print(f"{label:12} {bq:4}x{bk:<4} w{warps} s{stages}: {ms:7.3f} ms")
        del q, k, v
    with open(args.out, "w") as fh:
        json.dump({"environment": environment(), "results": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
