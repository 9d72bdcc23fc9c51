"""Error vs dense and time of window / radial attention with and without the step cache (CPU).

    python benchmarks/step_cache.py > benchmarks/results/step-cache-cpu.md

Embedded tiny Wan pipeline at 256x256x33 (grid 9x16x16 = 2,304 tokens), 12 steps, CFG, 2 dense
warm-up steps; error = mean |frames - dense frames| and PSNR against dense; attention time =
time inside the self-attention modules (forward hooks), median of 3 runs.
"""

import statistics
import time

import numpy as np
import torch

import diffattn
from diffattn.metrics import psnr
from diffattn import Radial, SlidingWindow, StepCache
from diffattn.pipelines import build_embedded_wan_pipeline

SETTINGS = dict(height=256, width=256, num_frames=33, num_inference_steps=12, guidance_scale=5.0,
                max_sequence_length=32, output_type="np")


def attention_timer(pipe):
    spent = {"t": 0.0}
    starts = {}

    def pre(module, args):
        starts[id(module)] = time.perf_counter()

    def post(module, args, out):
        spent["t"] += time.perf_counter() - starts.pop(id(module))

    handles = []
    for block in pipe.transformer.blocks:
        handles += [block.attn1.register_forward_pre_hook(pre), block.attn1.register_forward_hook(post)]
    return spent, handles


def run(pipe):
    spent, hooks = attention_timer(pipe)
    times, out = [], None
    for _ in range(3):
        spent["t"] = 0.0
        out = pipe("a fox", generator=torch.Generator().manual_seed(0), **SETTINGS).frames[0]
        times.append(spent["t"])
    for h in hooks:
        h.remove()
    return out, statistics.median(times)


def main():
    torch.set_num_threads(2)
    pipe = build_embedded_wan_pipeline(seed=0, random_weights=True)
    dense, dense_t = run(pipe)
    print("| pattern | cache | mean abs error vs dense | PSNR vs dense (dB) | error / plain pattern's | self-attention time (s) | time / plain pattern's | peak cache bytes |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    print(f"| dense | - | 0 | inf | - | {dense_t:.3f} | - | 0 |")
    for pattern in (SlidingWindow((3, 5, 5)), Radial(0.2, block=64)):
        base_err = base_t = None
        for cache in (None, StepCache(refresh_every=1), StepCache(refresh_every=3), StepCache(refresh_every=3, store_dtype=torch.bfloat16),
                      StepCache(refresh_every=3, lse_gate=0.05, cosine_gate=0.85), StepCache(refresh_every=6),
                      StepCache(refresh_every=3, light=True)):
            handle = diffattn.apply(pipe, pattern, dense_steps=2, cache=cache, impl="reference")
            out, t = run(pipe)
            peak = handle.peak_cache_bytes()
            diffattn.remove(pipe)
            e = float(np.abs(out - dense).mean())
            if cache is None:
                base_err, base_t = e, t
            label = "none" if cache is None else (f"k={cache.refresh_every}" + (f", {str(cache.store_dtype).replace('torch.', '')}" if cache.store_dtype else "")
                                                   + (", gates 0.05 / 0.85" if cache.lse_gate else "")
                                                   + (", light" if cache.light else ""))
            print(f"| {pattern} | {label} | {e:.2e} | {psnr(out, dense):.2f} | {e / base_err:.3f} | {t:.3f} | {t / base_t:.2f} | {peak} |")


if __name__ == "__main__":
    main()
