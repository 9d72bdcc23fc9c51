"""Kernel benchmark: diffattn's block-sparse kernel vs SDPA, FlexAttention and xformers.

For each DiT shape and pattern it reports the median time, the TFLOP/s on the (query, key)
pairs the kernel computes, and the speedup over dense SDPA's best backend. Needs a CUDA GPU.

Shapes whose grid can be cut into tiles of a multiple of 128 tokens also run the tile-aligned
window (STA): the same window and stride once in raster order (partial blocks, window mask in
the kernel) and once in tile order (full blocks only), each against FlexAttention with the same
blocks. diffattn's tile-order time includes permuting q, k, v and un-permuting the output; the
FlexAttention tile-order time does not, and ``extra["permute_ms"]`` reports that cost.
"""

from __future__ import annotations

import datetime
import json
import math
import platform
from dataclasses import asdict, dataclass, field

import torch

from ..attention import attention, kernel_blocks, tile_order_of
from ..block_layout import build_block_layout
from ..patterns import Dense, Pattern, Radial, SlidingWindow
from ..tile_order import sequence_permutation
from ..tokens import TokenLayout


@dataclass(frozen=True)
class Shape:
    """A benchmark shape; ``sta``: ``(tile, window_tiles)`` of the tile-aligned window to run, or
    None where no tile of a multiple of 128 tokens divides the grid (Wan 480p 21x30x52: at most
    8-token tiles; HunyuanVideo 720p 33x45x80: at most 16)."""

    name: str
    layout: TokenLayout
    heads: int
    head_dim: int = 128
    batch: int = 1
    sta: tuple | None = None


SHAPES = {
    "wan-1.3b-480p-81f": Shape("wan-1.3b-480p-81f", TokenLayout((21, 30, 52)), heads=12),
    "flux-1024": Shape("flux-1024", TokenLayout((64, 64), text_len=512, text_first=True), heads=24,
                       sta=((8, 16), (3, 3))),
    "hunyuan-720p-129f": Shape("hunyuan-720p-129f", TokenLayout((33, 45, 80), text_len=256, text_first=False), heads=24),
    # NATTEN's and STA's HunyuanVideo shape (768x1280, 117 frames)
    "hunyuan-768p-117f": Shape("hunyuan-768p-117f", TokenLayout((30, 48, 80), text_len=256, text_first=False), heads=24,
                               sta=((6, 8, 8), (3, 3, 3))),
}

TARGET_DENSITIES = (0.5, 0.25, 0.1)


@dataclass
class Result:
    shape: str
    pattern: str
    target_density: float | None
    block_density: float
    element_density: float
    impl: str
    ms: float
    tflops: float
    speedup_vs_sdpa: float
    extra: dict = field(default_factory=dict)


def window_for_density(layout: TokenLayout, target: float, block_size: tuple[int, int]) -> SlidingWindow:
    """The window, from a small family, whose computed block fraction is closest to ``target``."""
    grid = layout.grid
    best, best_err = None, math.inf
    fractions = (1.0, 0.75, 0.6, 0.5, 0.4, 0.3, 0.2)
    temporal = sorted({max(1, math.ceil(grid[0] * f)) for f in (1.0, 0.75, 0.5, 0.25, 0.125)}) if len(grid) == 3 else [None]
    for kf in temporal:
        for frac in fractions:
            spatial = tuple(max(1, round(n * frac)) for n in grid[-2:])
            window = spatial if kf is None else (kf, *spatial)
            pattern = SlidingWindow(window)
            density = build_block_layout(pattern, grid, *block_size).block_density
            err = abs(density - target)
            if err < best_err:
                best, best_err = pattern, err
    return best


def patterns_for(shape: Shape, block_size: tuple[int, int]) -> list[tuple[str, Pattern, float | None]]:
    out: list[tuple[str, Pattern, float | None]] = [("dense", Dense(), None)]
    for target in TARGET_DENSITIES:
        w = window_for_density(shape.layout, target, block_size)
        out.append((f"window {'x'.join(map(str, w.window))}", w, target))
    if len(shape.layout.grid) == 3 and shape.layout.grid[0] > 1:
        radial = Radial(0.95, sink=False) if shape.name.startswith("hunyuan") else Radial(0.2)
        out.append((f"radial decay={radial.decay} sink={radial.sink}", radial, None))
    out += sta_patterns(shape)
    return out


def sta_patterns(shape: Shape) -> list[tuple[str, Pattern, None]]:
    """The shape's tile-aligned window in tile order and the same window in raster order."""
    if shape.sta is None:
        return []
    tiled = SlidingWindow.tiled(*shape.sta)
    raster = SlidingWindow(tiled.window, stride=tiled.stride)
    name = f"window {'x'.join(map(str, tiled.window))} stride {'x'.join(map(str, tiled.stride))}"
    return [(f"{name} raster", raster, None), (f"{name} tile order (STA)", tiled, None)]


def computed_pairs(pattern: Pattern, layout: TokenLayout, head_dim: int) -> int:
    """(query, key) pairs the kernel multiplies: visited visual blocks (at the kernel's blocks for
    ``head_dim``) plus dense text."""
    n, t, s = layout.num_visual, layout.text_len, layout.seq_len
    if pattern.is_dense:
        return s * s
    blocks = kernel_blocks(pattern, head_dim, None, layout.grid)
    visual = int(build_block_layout(pattern, layout.grid, *blocks).visited_tokens().max())
    return visual + n * t + t * s


def _median_ms(fn, warmup: int = 25, rep: int = 100) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def sdpa_best(q, k, v) -> tuple[float, str]:
    """Dense SDPA, the fastest of its backends on this machine."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    best = (math.inf, "none")
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel(backend):
                torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)
                ms = _median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt))
        except RuntimeError:
            continue
        if ms < best[0]:
            best = (ms, backend.name.lower())
    return best


FLEX_BLOCK = 128


def flex_block_mask(pattern: Pattern, layout: TokenLayout, device):
    """FlexAttention BlockMask with the same blocks as diffattn's layout (128 x 128).

    Built from diffattn's analytic block classes (``create_block_mask`` materialises S x S
    and does not fit at 119k tokens). Text blocks are full; blocks that mix visual and text
    tokens, and the short last block, are partial and use the pattern's mask_mod.
    Needs the visual tokens to start on a block boundary.
    """
    from torch.nn.attention.flex_attention import BlockMask

    from ..patterns.base import FULL, PARTIAL

    b = FLEX_BLOCK
    if layout.visual_start % b:
        raise ValueError(f"flex comparison needs visual tokens starting at a multiple of {b}")
    s = layout.seq_len
    nbs = -(-s // b)
    classes = torch.full((nbs, nbs), FULL, dtype=torch.int8)
    first = layout.visual_start // b
    visual = pattern.block_classes(layout.grid, b, b)
    nv = visual.shape[0]
    classes[first : first + nv, first : first + nv] = visual  # tile order for a tiled pattern
    mixed = {first + nv - 1} if layout.num_visual % b else set()
    if s % b:
        mixed.add(nbs - 1)
    for i in mixed:
        for view in (classes[i, :], classes[:, i]):
            view[view == FULL] = PARTIAL
            if layout.text_len:
                view[:] = torch.where(view == 0, torch.tensor(PARTIAL, dtype=torch.int8), view)
    def indices(selected):  # flex wants one index slot per key block
        order = torch.argsort(selected.to(torch.int8), dim=-1, descending=True, stable=True)
        return selected.sum(-1, dtype=torch.int32), order.to(torch.int32)

    part_num, part_idx = indices(classes == PARTIAL)
    full_num, full_idx = indices(classes == FULL)
    mask = pattern.mask_mod(layout, device)
    mask_mod = lambda b_, h, q_idx, kv_idx: mask(q_idx, kv_idx)  # noqa: E731
    order = tile_order_of(pattern, layout)
    if order is not None:  # the mask of tile-order positions: the raster mask of their tokens
        raster_of = sequence_permutation(layout, order.tile, str(torch.device(device)))[0]
        mask_mod = lambda b_, h, q_idx, kv_idx: mask(raster_of[q_idx], raster_of[kv_idx])  # noqa: E731
    return BlockMask.from_kv_blocks(
        part_num[None, None].to(device), part_idx[None, None].to(device),
        full_num[None, None].to(device), full_idx[None, None].to(device),
        BLOCK_SIZE=b, mask_mod=mask_mod, seq_lengths=(s, s),
    )


def flex_ms(q, k, v, pattern: Pattern, layout: TokenLayout) -> tuple[float, float]:
    """FlexAttention compiled, with the same block mask: (ms, flex computed block fraction). A
    tiled pattern runs on q, k, v already in tile order (the permutation is not timed)."""
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.config.recompile_limit = max(64, torch._dynamo.config.recompile_limit)
    compiled = torch.compile(flex_attention, dynamic=False)
    order = tile_order_of(pattern, layout)
    if order is not None:
        q, k, v = (order.to_tiles(t) for t in (q, k, v))
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    if pattern.is_dense:
        fn = lambda: compiled(qt, kt, vt)  # noqa: E731
        fn()
        return _median_ms(fn), 1.0
    block_mask = flex_block_mask(pattern, layout, q.device)
    computed = 1.0 - float(block_mask.sparsity()) / 100.0
    fn = lambda: compiled(qt, kt, vt, block_mask=block_mask)  # noqa: E731
    fn()
    return _median_ms(fn), computed


def permute_ms(q, k, v, pattern: Pattern, layout: TokenLayout) -> float | None:
    """Time of a tiled pattern's token permutation per call (q, k, v to tile order, the output
    back), or None for a pattern that runs in raster order."""
    order = tile_order_of(pattern, layout)
    if order is None:
        return None
    return _median_ms(lambda: (order.to_tiles(q), order.to_tiles(k), order.from_tiles(order.to_tiles(v))))


def xformers_ms(q, k, v) -> float | None:
    try:
        import xformers.ops as xops
    except Exception:
        return None
    fn = lambda: xops.memory_efficient_attention(q, k, v)  # noqa: E731
    fn()
    return _median_ms(fn)


def environment() -> dict:
    import triton

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        try:
            import subprocess

            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20,
            ).stdout.strip()
        except Exception:
            info["driver"] = "unknown"
    return info


def run_kernel_benchmark(
    shapes: list[str] | None = None,
    dtype: torch.dtype = torch.bfloat16,
    with_flex: bool = True,
    log=print,
) -> dict:
    """Run the benchmark on the current CUDA device; returns a JSON-ready dict."""
    if not torch.cuda.is_available():
        raise RuntimeError("the kernel benchmark needs a CUDA GPU; none is available here")
    from ..kernels import kernel_block_size

    results: list[Result] = []
    for name in shapes or list(SHAPES):
        shape = SHAPES[name]
        layout = shape.layout
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (
            torch.randn(shape.batch, layout.seq_len, shape.heads, shape.head_dim, device="cuda", dtype=dtype, generator=gen)
            for _ in range(3)
        )
        block = kernel_block_size(shape.head_dim)
        sdpa, backend = sdpa_best(q, k, v)
        dense_flops = 4.0 * shape.batch * shape.heads * shape.head_dim * layout.seq_len**2
        log(f"{name}: S={layout.seq_len} H={shape.heads} D={shape.head_dim}  SDPA best ({backend}) {sdpa:.2f} ms "
            f"= {dense_flops / sdpa / 1e9:.0f} TFLOP/s")
        results.append(Result(name, "dense", None, 1.0, 1.0, f"sdpa/{backend}", sdpa, dense_flops / sdpa / 1e9, 1.0))
        xf = xformers_ms(q, k, v)
        if xf is not None:
            results.append(Result(name, "dense", None, 1.0, 1.0, "xformers", xf, dense_flops / xf / 1e9, sdpa / xf))
        for label, pattern, target in patterns_for(shape, block):
            pairs = computed_pairs(pattern, layout, shape.head_dim)
            flops = 4.0 * shape.batch * shape.heads * shape.head_dim * pairs
            bdens = pairs / layout.seq_len**2
            edens = pattern.attended_fraction(layout)
            fn = lambda: attention(q, k, v, pattern, layout=layout, impl="triton")  # noqa: E731
            fn()
            ms = _median_ms(fn)
            permute = permute_ms(q, k, v, pattern, layout)
            extra = {} if permute is None else {"permute_ms": permute}
            results.append(Result(name, label, target, bdens, edens, "diffattn", ms, flops / ms / 1e9, sdpa / ms, extra))
            log(f"  {label:<34} computed {bdens:6.1%}  diffattn {ms:8.2f} ms {flops / ms / 1e9:6.0f} TFLOP/s "
                f"x{sdpa / ms:5.2f} vs SDPA" + ("" if permute is None else f"  (permutation {permute:.2f} ms of it)"))
            if with_flex:
                try:
                    fms, fdens = flex_ms(q, k, v, pattern, layout)
                    results.append(Result(name, label, target, fdens, edens, "flex", fms, 4.0 * shape.batch * shape.heads * shape.head_dim * fdens * layout.seq_len**2 / fms / 1e9, sdpa / fms, extra))
                    log(f"  {'':<34} flex blocks {fdens:6.1%}  flex     {fms:8.2f} ms  x{sdpa / fms:5.2f} vs SDPA")
                except Exception as exc:  # flex is a comparison, not a requirement
                    log(f"  flex failed: {type(exc).__name__}: {exc}"[:300])
            torch.cuda.empty_cache()
        del q, k, v
        torch.cuda.empty_cache()
    return {"environment": environment(), "dtype": str(dtype).replace("torch.", ""), "results": [asdict(r) for r in results]}


def write_json(data: dict, path) -> None:
    with open(path, "w") as fh:
        json.dump(data, fh, indent=1)
