"""Attention time of the step cache's steps at full-size shapes on a CUDA GPU; writes JSON.

    python3 benchmarks/step_cache_bench.py --out step-cache-bench.json

Per shape and pattern (bf16, batch 1), the median time in ms (``triton.testing.do_bench``) of:

- ``sparse``: ``diffattn.attention(..., impl="triton", return_lse=True)``, a step without the cache;
- ``reuse``: sparse plus ``merge_partials`` with a stored external partial, a cached step
  (target: at most 1.1x ``sparse``);
- ``refresh_one_pass``: ``attention_partials`` (the one-pass kernel) plus the merge, a refresh step;
- ``refresh_two_passes``: the same from two launches, ``attention`` and ``external_attention``;
- ``partials_one_pass`` / ``partials_two_passes``: the partials alone, without the merge;
- ``merge``: ``merge_partials`` alone (the fused Triton kernel); ``merge_torch``: its torch version;
- ``dense_sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` on ``[B, H, S, D]``
  (the transposes are done before timing).

Each case also checks the merged one-pass partials against SDPA (relative L2 error) and records
the pattern's attended and computed fractions. Shapes: Wan 2.1 480p (token grid 21x30x52,
S = 32,760, 12 heads) and HunyuanVideo 768x1280x117 (grid 30x48x80 plus 256 text tokens last,
24 heads), head dim 128; patterns from the presets ``configs/{wan,hunyuan_video}-{window,radial}.yaml``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import diffattn
from diffattn import Radial, SlidingWindow, TokenLayout, build_block_layout
from diffattn.partials import attention_partials, external_attention, kernel_blocks, merge_partials


@dataclass(frozen=True)
class Case:
    shape: str
    layout: TokenLayout
    heads: int
    patterns: dict  # name -> Pattern
    head_dim: int = 128


CASES = {
    "wan-480p": Case("wan-480p", TokenLayout((21, 30, 52)), 12,
                     {"window": SlidingWindow((9, 15, None)), "radial": Radial(0.2, sink=True)}),
    "hunyuan-768p-117f": Case("hunyuan-768p-117f", TokenLayout((30, 48, 80), text_len=256, text_first=False), 24,
                              {"window": SlidingWindow((18, 24, 24)), "radial": Radial(0.95, sink=False)}),
}


def cuda_timer(warmup_ms: int = 25, rep_ms: int = 200):
    """``fn -> median ms`` by ``triton.testing.do_bench``."""
    import triton.testing

    return lambda fn: float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def run_pattern(q, k, v, layout: TokenLayout, pattern, q_t, k_t, v_t, timer) -> dict:
    """Times and checks of one pattern on ``q, k, v [B, S, H, D]`` (``*_t``: ``[B, H, S, D]``)."""
    attend = lambda: diffattn.attention(q, k, v, pattern, layout=layout, impl="triton", return_lse=True)  # noqa: E731
    one_pass = lambda: attention_partials(q, k, v, pattern, layout=layout, impl="triton")  # noqa: E731

    def two_passes():
        out_in, lse_in = attend()
        return (out_in, lse_in, *external_attention(q, k, v, pattern, layout=layout, impl="triton"))

    out_in, lse_in, out_ex, lse_ex = one_pass()  # also builds and caches the layouts before timing
    two_passes()
    stored_out, stored_lse = out_ex.clone(), lse_ex.clone()  # the cache's external partial

    def reuse():
        o, lse = attend()
        return merge_partials(o, lse, stored_out, stored_lse)

    dense = F.scaled_dot_product_attention(q_t, k_t, v_t).transpose(1, 2)
    merged = merge_partials(out_in, lse_in, out_ex, lse_ex)[0]
    times = {
        "sparse": timer(attend),
        "reuse": timer(reuse),
        "merge": timer(lambda: merge_partials(out_in, lse_in, stored_out, stored_lse)),
        "merge_torch": timer(lambda: merge_partials(out_in, lse_in, stored_out, stored_lse, impl="reference")),
        "partials_one_pass": timer(one_pass),
        "partials_two_passes": timer(two_passes),
        "refresh_one_pass": timer(lambda: merge_partials(*one_pass())),
        "refresh_two_passes": timer(lambda: merge_partials(*two_passes())),
    }
    blocks = build_block_layout(pattern, layout.grid, *kernel_blocks(pattern, q.shape[-1]), str(q.device))
    return {
        "pattern": repr(pattern),
        "attended_fraction": float(pattern.attended_fraction(layout)),
        "computed_fraction": blocks.block_density,
        "ms": times,
        "reuse_over_sparse": times["reuse"] / times["sparse"],
        "refresh_two_over_one_pass": times["refresh_two_passes"] / times["refresh_one_pass"],
        "check": {
            "merged_one_pass_vs_sdpa_rel_l2": rel_l2(merged, dense),
            "sparse_vs_sdpa_rel_l2": rel_l2(out_in, dense),
            "external_rows_empty": int(torch.isneginf(lse_ex).sum()),
        },
    }


def run_case(case: Case, patterns: list[str], timer, device="cuda", dtype=torch.bfloat16, log=print) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (1, case.layout.seq_len, case.heads, case.head_dim)
    q, k, v = (torch.randn(shape, generator=gen, device=device, dtype=dtype) for _ in range(3))
    q_t, k_t, v_t = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    dense_ms = timer(lambda: F.scaled_dot_product_attention(q_t, k_t, v_t))
    rows = []
    for name in patterns:
        row = {"shape": case.shape, "token_grid": list(case.layout.grid), "text_len": case.layout.text_len,
               "seq_len": case.layout.seq_len, "heads": case.heads, "head_dim": case.head_dim,
               "dtype": str(dtype).replace("torch.", ""), "name": name,
               **run_pattern(q, k, v, case.layout, case.patterns[name], q_t, k_t, v_t, timer)}
        row["ms"]["dense_sdpa"] = dense_ms
        rows.append(row)
        ms = row["ms"]
        log(f"{case.shape:18} {name:7} sparse {ms['sparse']:8.2f}  reuse {ms['reuse']:8.2f} "
            f"({row['reuse_over_sparse']:.3f}x)  refresh 1-pass {ms['refresh_one_pass']:8.2f}  "
            f"2-pass {ms['refresh_two_passes']:8.2f}  dense SDPA {dense_ms:8.2f} ms  "
            f"(merged vs SDPA rel L2 {row['check']['merged_one_pass_vs_sdpa_rel_l2']:.2e})")
    del q, k, v, q_t, k_t, v_t
    return rows


def environment() -> dict:
    from diffattn.bench.kernels import environment as versions

    return {**versions(), "platform": platform.platform(), "machine": platform.machine()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="step-cache-bench.json", help="JSON file to write")
    parser.add_argument("--shapes", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--patterns", nargs="+", choices=["window", "radial"], default=["window", "radial"])
    parser.add_argument("--rep-ms", type=int, default=200, help="do_bench repetition time per measurement")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("step_cache_bench.py needs a CUDA GPU", file=sys.stderr)
        return 2
    timer = cuda_timer(rep_ms=args.rep_ms)
    rows = []
    with torch.no_grad():
        for name in args.shapes:
            rows += run_case(CASES[name], args.patterns, timer)
            torch.cuda.empty_cache()
    record = {
        "benchmark": "step cache: sparse, reuse (sparse + merge), refresh (one pass vs two passes), dense SDPA",
        "environment": environment(),
        "timing": f"triton.testing.do_bench median, warmup 25 ms, rep {args.rep_ms} ms; batch 1",
        "results": rows,
    }
    with open(args.out, "w") as fh:
        json.dump(record, fh, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
