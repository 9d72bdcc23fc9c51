"""Dynamic block selection on the GPU: its share of BlockTopK attention time, and Piecewise vs BlockTopK.

    python3 benchmarks/selection_bench.py --out selection.json          # CUDA GPU
    python3 benchmarks/selection_bench.py --dry-run --out dry.json      # tiny CPU run of the same path

Per shape (bf16, batch 1, head dim 128) and selection block 64:

- ``select_ms``: the selection kernel (``select_blocks(impl="triton")``: pooling, pooled scores,
  top-k) and ``select_reference_ms``: the torch selection on the same GPU;
- ``blocktopk_ms``: ``attention(BlockTopK(density=0.25))`` end to end (selection included) and
  ``sparse_only_ms`` the same with the selection passed in; ``selection_share`` =
  ``select_ms / blocktopk_ms`` (target <= 10%);
- ``piecewise_ms`` for Piecewise at the same density (order 0, shared, pooled), and their ratio
  to ``blocktopk_ms`` (target <= 1.15);
- ``selection_mismatch``: the fraction of (query block, key block) entries where the kernel and
  the torch selection differ (rounding near the top-k threshold only; 0 expected mostly).

Writes JSON with the machine, torch / triton versions and the date.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import diffattn
from diffattn import BlockTopK, Piecewise, TokenLayout
from diffattn.bench.kernels import environment, sdpa_best

SHAPES = {
    # Wan 2.1 480p, 81 frames: latent grid 21 x 30 x 52 = 32,760 tokens, 12 heads (1.3B)
    "wan-480p-81f": (TokenLayout((21, 30, 52)), 12),
    # HunyuanVideo 720p, 129 frames: 33 x 45 x 80 = 118,800 video tokens + 256 text tokens (last), 24 heads
    "hunyuan-720p-129f": (TokenLayout((33, 45, 80), text_len=256, text_first=False), 24),
}
DRY_SHAPES = {"tiny": (TokenLayout((2, 8, 12), text_len=8), 2)}
DENSITY = 0.25
BLOCK = 64


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES),
                        help="shapes to run (default: all)")
    parser.add_argument("--density", type=float, default=DENSITY, help="BlockTopK / Piecewise density (default 0.25)")
    parser.add_argument("--dry-run", action="store_true",
                        help="a tiny shape on CPU through the torch reference: checks the script, measures nothing useful")
    args = parser.parse_args(argv)
    if not 0 < args.density <= 1:
        parser.error(f"--density must be in (0, 1], got {args.density}")
    return args


def timer(device: torch.device):
    """Median milliseconds of a callable: Triton's do_bench on CUDA, perf_counter elsewhere."""
    if device.type == "cuda":
        import triton.testing

        return lambda fn: float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))

    def cpu_ms(fn, reps: int = 3) -> float:
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return cpu_ms


def bench_shape(name: str, layout: TokenLayout, heads: int, density: float, device: torch.device, impl: str,
                head_dim: int, log=print) -> dict:
    ms = timer(device)
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(1, layout.seq_len, heads, head_dim, device=device, dtype=dtype, generator=gen) for _ in range(3))
    topk = BlockTopK(density=density, block=BLOCK)
    row = {"shape": name, "seq_len": layout.seq_len, "visual_tokens": layout.num_visual, "text_tokens": layout.text_len,
           "heads": heads, "head_dim": head_dim, "dtype": str(dtype).replace("torch.", ""), "block": BLOCK, "density": density}

    keep = diffattn.select_blocks(q, k, topk, layout, impl=impl)
    reference = diffattn.select_blocks(q, k, topk, layout, impl="reference")
    row["kept_fraction"] = float(keep.float().mean())
    row["selection_mismatch"] = float((keep != reference).float().mean())
    del reference
    row["select_ms"] = ms(lambda: diffattn.select_blocks(q, k, topk, layout, impl=impl))
    row["select_reference_ms"] = ms(lambda: diffattn.select_blocks(q, k, topk, layout, impl="reference"))
    row["sparse_only_ms"] = ms(lambda: diffattn.attention(q, k, v, topk, layout=layout, impl=impl, selection=keep))
    row["blocktopk_ms"] = ms(lambda: diffattn.attention(q, k, v, topk, layout=layout, impl=impl))
    row["selection_share"] = row["select_ms"] / row["blocktopk_ms"]
    if device.type == "cuda":  # dense yardstick: SDPA's fastest backend on the same q, k, v
        row["sdpa_ms"], row["sdpa_backend"] = sdpa_best(q, k, v)
        row["blocktopk_speedup_vs_sdpa"] = row["sdpa_ms"] / row["blocktopk_ms"]
    log(f"{name}: S={layout.seq_len} H={heads}  selection {row['select_ms']:.3f} ms (torch {row['select_reference_ms']:.3f} ms)"
        f"  BlockTopK {row['blocktopk_ms']:.3f} ms (sparse part {row['sparse_only_ms']:.3f} ms)"
        f"  share {row['selection_share']:.1%}  kept {row['kept_fraction']:.1%}  mismatch {row['selection_mismatch']:.2e}")
    for label, pattern in (("order0", Piecewise(density, block=BLOCK, order=0)),
                           ("shared", Piecewise(density, block=BLOCK, first_order="shared")),
                           ("pooled", Piecewise(density, block=BLOCK, first_order="pooled"))):
        t = ms(lambda: diffattn.attention(q, k, v, pattern, layout=layout, impl=impl))
        row[f"piecewise_{label}_ms"] = t
        row[f"piecewise_{label}_vs_blocktopk"] = t / row["blocktopk_ms"]
        if "sdpa_ms" in row:
            row[f"piecewise_{label}_speedup_vs_sdpa"] = row["sdpa_ms"] / t
        log(f"  Piecewise {label:<7} {t:.3f} ms  x{t / row['blocktopk_ms']:.3f} of BlockTopK")
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        device, impl, shapes, head_dim = torch.device("cpu"), "reference", DRY_SHAPES, 32
    else:
        if not torch.cuda.is_available():
            print("selection_bench needs a CUDA GPU (or --dry-run for a tiny CPU check)", file=sys.stderr)
            return 2
        device, impl, head_dim = torch.device("cuda"), "triton", 128
        shapes = {name: SHAPES[name] for name in args.shapes}
    rows = []
    for name, (layout, heads) in shapes.items():
        rows.append(bench_shape(name, layout, heads, args.density, device, impl, head_dim))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    data = {"environment": environment(), "dry_run": args.dry_run, "impl": impl, "results": rows}
    with open(args.out, "w") as fh:
        json.dump(data, fh, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
