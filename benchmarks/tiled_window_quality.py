"""Tile-aligned (STA) windows vs neighborhood windows in raster order: error vs dense against the
fraction of the score matrix the kernel computes, on CPU.

    python benchmarks/tiled_window_quality.py > benchmarks/results/tiled-window-cpu.md

A stride-1 window in raster token order attends fewer pairs than it computes (window edges cut
the kernel's blocks); a tiled window (stride = tile, tokens in tile-major order) computes exactly
what it attends, but the queries of a tile share one window. The table puts both on the same
axis: relative L1 error against dense attention and the computed fraction at the kernel's
blocks (64 x 64 for D = 64), on structured q/k/v (diffattn.testing.structured_qkv).
"""

import torch

import diffattn
from diffattn import Dense, SlidingWindow, TokenLayout, build_block_layout
from diffattn.testing import relative_l1, structured_qkv

GRID = (8, 16, 32)
TILE = (2, 4, 8)
BLOCK = (64, 64)


def computed(pattern, grid) -> float:
    return build_block_layout(pattern, grid, *BLOCK).block_density


def row(name, pattern, q, k, v, layout, dense):
    err = relative_l1(diffattn.attention(q, k, v, pattern, layout=layout, impl="reference"), dense)
    return f"| {name} | `{pattern}` | {pattern.attended_fraction(layout):.3f} | {computed(pattern, layout.grid):.3f} | {err:.4f} |"


def main() -> None:
    torch.manual_seed(0)
    layout = TokenLayout(GRID)
    print(f"Grid {'x'.join(map(str, GRID))} ({layout.seq_len} tokens), tile {'x'.join(map(str, TILE))}, "
          f"4 heads, D = 64, kernel blocks {BLOCK[0]}x{BLOCK[1]}; torch {torch.__version__}, CPU reference.\n")
    for sharpness in (10.0, 2.0):
        q, k, v = structured_qkv(layout, heads=4, head_dim=64, sharpness=sharpness)
        dense = diffattn.attention(q, k, v, Dense(), layout=layout, impl="reference")
        print(f"### structured inputs, sharpness {sharpness:g}\n")
        print("| execution | pattern | attended | computed | rel. L1 vs dense |")
        print("|---|---|---:|---:|---:|")
        for tiles in ((1, 1, 1), (3, 1, 1), (3, 3, 1), (3, 3, 3)):
            sta = SlidingWindow.tiled(tile=TILE, window_tiles=tiles)
            print(row("tiled (STA)", sta, q, k, v, layout, dense))
            print(row("raster, stride 1", SlidingWindow(sta.window), q, k, v, layout, dense))
            # the raster window that computes about as much as the tiled one
            target = computed(sta, GRID)
            best = min((SlidingWindow((f, h, w)) for f in range(1, GRID[0] + 1) for h in range(1, GRID[1] + 1, 2)
                        for w in range(1, GRID[2] + 1, 2)),
                       key=lambda p: (abs(computed(p, GRID) - target), -p.attended_fraction(layout)))
            print(row("raster, same compute", best, q, k, v, layout, dense))
        print()


if __name__ == "__main__":
    main()
