"""Host work per attention call and per transformer layer, and device reads per call.

    TRITON_INTERPRET=1 python benchmarks/host_overhead.py --out host.json     # CPU: kernels stubbed out
    python benchmarks/host_overhead.py --out host.json                        # CUDA: real launches

What it measures, per pattern (Dense, SlidingWindow, tiled SlidingWindow, Radial, BlockTopK,
Piecewise pooled / order 0):

- ``call_us``: median wall time of one ``diffattn.attention(..., impl="triton")`` call on small
  tensors, so the time is the host's: argument checks, plan / layout lookups, selection and block
  list building, the custom-op dispatch and the launch. On a CPU (``TRITON_INTERPRET=1``) every
  Triton kernel is replaced by a no-op for the measurement, so the number is the host work alone
  without Triton's own launch cost (a compiled launch adds roughly 20-40 us on a GPU machine);
  on CUDA the kernels run (on tiny inputs) and the times include their launches.
- ``device_reads``: the operators that read a device value on the host within one call
  (``aten::item``, ``aten::_local_scalar_dense``, ``aten::nonzero``, ``aten::is_nonzero``), counted
  with the torch profiler. Each is a queue stall on a GPU. On CUDA the count also comes from
  ``torch.cuda.set_sync_debug_mode("warn")`` (every synchronizing call, host-to-device copies of
  pageable memory included).
- ``layer_us``: added host time per transformer layer of a tiny Wan transformer (4 layers, grid
  2x8x8, 2 heads of 16: the arithmetic is negligible) with diffattn's processors vs diffusers' own
  (SDPA), forward only: ``(t_diffattn - t_diffusers) / layers``.

Writes JSON with the machine, versions and date.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time

import torch

SYNC_OPS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero")


class _NoLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def kernels_stubbed(enabled: bool):
    """Every Triton kernel of diffattn replaced by a no-op while the block runs (CPU measurement)."""
    if not enabled:
        yield
        return
    import importlib

    from unittest import mock

    patches = []
    for module_name in ("diffattn.kernels.ops", "diffattn.kernels.block_selection"):
        module = importlib.import_module(module_name)
        for name in dir(module):
            if name.endswith("_kernel") and hasattr(getattr(module, name), "run"):
                patches.append(mock.patch.object(module, name, _NoLaunch()))
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        yield


def patterns(small: bool = False):
    """The patterns measured; ``small``: sized for the 2x8x8 grid of the layer measurement."""
    from diffattn import BlockTopK, Dense, Piecewise, Radial, SlidingWindow

    block = 16 if small else 64
    return {
        "dense": Dense(),
        "window": SlidingWindow((1, 5, 5) if small else (3, 7, 7)),
        "tiled window": SlidingWindow.tiled(tile=(1, 4, 4), window_tiles=(1, 1, 1) if small else (3, 3, 3)),
        "radial": Radial(0.2, block=64),
        "topk": BlockTopK(density=0.25, block=block),
        "piecewise pooled": Piecewise(0.25, block=block),
        "piecewise order 0": Piecewise(0.25, block=block, order=0),
    }


def median_us(fn, reps: int, sync) -> float:
    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def device_reads(fn) -> dict:
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts = {name: 0 for name in SYNC_OPS}
    for event in prof.events():
        if event.name in counts:
            counts[event.name] += 1
    return counts


def cuda_syncs(fn) -> int | None:
    """Synchronizing CUDA calls in one ``fn()``, from torch's sync debug mode (None off CUDA)."""
    if not torch.cuda.is_available():
        return None
    import warnings

    fn()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def attention_rows(device, reps: int) -> list[dict]:
    import diffattn

    layout = diffattn.TokenLayout((4, 16, 16), text_len=32)
    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(1, layout.seq_len, 2, 64, generator=gen).to(device, dtype) for _ in range(3))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    for name, pattern in patterns().items():
        fn = lambda: diffattn.attention(q, k, v, pattern, layout=layout, impl="triton")  # noqa: E731
        reads = device_reads(fn)
        rows.append({"pattern": name, "spec": repr(pattern), "call_us": median_us(fn, reps, sync),
                     "device_reads": sum(reads.values()), "device_read_ops": reads, "cuda_syncs": cuda_syncs(fn)})
        print(f"  {name:<18} {rows[-1]['call_us']:8.1f} us per call   device reads {rows[-1]['device_reads']}"
              + ("" if rows[-1]["cuda_syncs"] is None else f"   CUDA syncs {rows[-1]['cuda_syncs']}"))
    return rows


def layer_rows(device, reps: int) -> list[dict]:
    import diffattn
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    layers = 4
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                  out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=layers,
                                  rope_max_seq_len=32).to(device).eval()
    gen = torch.Generator().manual_seed(1)
    inputs = (torch.randn(1, 4, 2, 16, 16, generator=gen).to(device), torch.tensor([500], device=device),
              torch.randn(1, 8, 16, generator=gen).to(device))  # token grid 2x8x8: the compute is negligible
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    @torch.no_grad()
    def forward():
        model(*inputs)

    base = median_us(forward, reps, sync)
    rows = [{"pattern": "diffusers (SDPA)", "forward_us": base, "layer_us": 0.0}]
    print(f"  diffusers' processors: {base:9.1f} us per forward ({layers} layers)")
    for name, pattern in patterns(small=True).items():
        diffattn.apply(model, pattern, impl="triton")
        try:
            t = median_us(forward, reps, sync)
        finally:
            diffattn.remove(model)
        rows.append({"pattern": name, "forward_us": t, "layer_us": (t - base) / layers})
        print(f"  {name:<18} {t:9.1f} us per forward   +{rows[-1]['layer_us']:7.1f} us per layer")
    return rows


def environment() -> dict:
    from diffattn.bench.kernels import environment as versions

    import diffusers

    return {**versions(), "diffusers": diffusers.__version__, "platform": platform.platform(),
            "machine": platform.machine(), "cpu_threads": torch.get_num_threads(),
            "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--reps", type=int, default=50, help="timed repetitions per measurement (median), default 50")
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error(f"--reps must be >= 1, got {args.reps}")
    cuda = torch.cuda.is_available()
    if not cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        print("host_overhead.py needs a CUDA GPU or TRITON_INTERPRET=1 (kernels stubbed out on CPU)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    torch.set_num_threads(1) if not cuda else None
    with kernels_stubbed(not cuda):
        print(f"attention() per call ({device}, {'kernels run' if cuda else 'kernels stubbed out'}):")
        calls = attention_rows(device, args.reps)
        print("per transformer layer, tiny Wan (4 layers, grid 2x8x8, 2 heads x 16):")
        layers = layer_rows(device, max(5, args.reps // 5))
    record = {
        "benchmark": "host work per attention call and per layer, device reads per call",
        "kernels": "run" if cuda else "stubbed out (no-op): host work only, without Triton's launch",
        "environment": environment(),
        "attention_calls": calls,
        "layers": layers,
    }
    with open(args.out, "w") as fh:
        json.dump(record, fh, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
