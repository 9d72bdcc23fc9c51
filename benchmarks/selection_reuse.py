"""Selection reuse across steps (apply(..., selection_every=k)) vs per-step selection, on CPU.

    python benchmarks/selection_reuse.py > benchmarks/results/selection-reuse-cpu.md

Embedded tiny Wan pipeline at 256x256x33 (grid 9x16x16, 2,304 tokens), 12 steps, guidance 5:
per k, the output's PSNR against per-step selection (k=1), the time spent selecting blocks and
the number of selections.
"""

import time

import torch

import diffattn
from diffattn import BlockTopK, Piecewise
from diffattn.metrics import psnr
from diffattn.pipelines import build_embedded_wan_pipeline

SETTINGS = dict(height=256, width=256, num_frames=33, num_inference_steps=12, guidance_scale=5.0,
                max_sequence_length=32, output_type="np")


STATS = {"n": 0, "t": 0.0}


def timed(cls):
    """A subclass of the pattern whose ``select`` is counted and timed."""

    class Timed(cls):
        def select(self, q_vis, k_vis, scale):
            t0 = time.perf_counter()
            out = super().select(q_vis, k_vis, scale)
            STATS["n"] += 1
            STATS["t"] += time.perf_counter() - t0
            return out

    Timed.__name__ = cls.__name__
    return Timed


def main():
    torch.set_num_threads(2)
    pipe = build_embedded_wan_pipeline(seed=0, random_weights=True)
    dense = pipe("a fox", generator=torch.Generator().manual_seed(0), **SETTINGS).frames[0]
    print("| pattern | selection_every | selections | selection time (s) | generation time (s) | PSNR vs k=1 (dB) | PSNR vs dense (dB) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for pattern in (timed(BlockTopK)(density=0.25), timed(Piecewise)(0.25)):
        base = None
        for k in (1, 2, 3, 6):
            STATS.update(n=0, t=0.0)
            diffattn.apply(pipe, pattern, selection_every=k, impl="reference")
            t0 = time.perf_counter()
            out = pipe("a fox", generator=torch.Generator().manual_seed(0), **SETTINGS).frames[0]
            gen_t = time.perf_counter() - t0
            diffattn.remove(pipe)
            base = out if base is None else base
            name = f"{type(pattern).__name__}(0.25)"
            print(f"| {name} | {k} | {STATS['n']} | {STATS['t']:.3f} | {gen_t:.2f} | {psnr(out, base):.2f} | {psnr(out, dense):.2f} |")


if __name__ == "__main__":
    main()
