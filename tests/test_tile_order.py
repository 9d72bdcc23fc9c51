"""The tile-aligned sliding window (STA): tile-major token order, its all-full block layout, the
kernel in tile order against the raster-order reference, and the same through diffattn.apply."""

import math
import os

import pytest
import torch
from diffusers import WanTransformer3DModel

import diffattn
from diffattn import SlidingWindow, StepCache, TokenLayout, build_block_layout
from diffattn.patterns import EMPTY, FULL, PARTIAL
from diffattn.patterns.base import pattern_from_spec
from diffattn.partials import attention_partials, external_attention, merge_partials
from diffattn.tile_order import TileOrder, tile_permutation

requires_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                          reason="runs the kernel on CPU under TRITON_INTERPRET=1")

# (grid, tile, window in tiles): small grids, S <= 512
CASES = [
    ((4, 8, 8), (1, 4, 4), (3, 1, 1)),
    ((4, 8, 8), (2, 2, 4), (1, 3, 1)),
    ((2, 8, 16), (1, 4, 4), (1, 1, 3)),
    ((16, 16), (4, 4), (3, 3)),
    ((3, 8, 16), (1, 4, 8), (None, 1, 1)),
]


@pytest.mark.parametrize("grid, tile", [((4, 8, 8), (2, 4, 4)), ((6, 4, 10), (3, 2, 5)), ((8, 12), (4, 3)), ((2, 3, 4), (1, 1, 1))])
def test_permutation_round_trips_and_is_tile_major(grid, tile):
    to_tiles, from_tiles = tile_permutation(grid, tile)
    n = to_tiles.numel()
    assert torch.equal(to_tiles[from_tiles], torch.arange(n)) and torch.equal(from_tiles[to_tiles], torch.arange(n))
    g3, t3 = (grid if len(grid) == 3 else (1, *grid)), (tile if len(tile) == 3 else (1, *tile))
    nh, nw, volume = g3[1] // t3[1], g3[2] // t3[2], t3[0] * t3[1] * t3[2]
    for p in range(n):  # the position formula of the module docstring
        r = int(to_tiles[p])
        f, h, w = r // (g3[1] * g3[2]), (r // g3[2]) % g3[1], r % g3[2]
        tile_index = ((f // t3[0]) * nh + h // t3[1]) * nw + w // t3[2]
        inside = ((f % t3[0]) * t3[1] + h % t3[1]) * t3[2] + w % t3[2]
        assert p == tile_index * volume + inside
    assert tile_permutation(grid, tile)[0] is to_tiles  # cached


@pytest.mark.parametrize("text_first", [True, False])
def test_tile_order_leaves_text_in_place(text_first):
    layout = TokenLayout((2, 4, 4), text_len=5, text_first=text_first)
    order = TileOrder(layout, (1, 2, 2))
    x = torch.arange(layout.seq_len)[None, :, None].expand(2, -1, 3)
    tiled = order.to_tiles(x)
    text = slice(layout.text_start, layout.text_start + layout.text_len)
    assert torch.equal(tiled[:, text], x[:, text])
    assert not torch.equal(tiled, x)
    assert torch.equal(order.from_tiles(tiled), x)
    with pytest.raises(ValueError, match=r"\[B, S=37"):
        order.to_tiles(torch.zeros(1, 36))


@pytest.mark.parametrize("grid, tile, window_tiles", CASES)
def test_tiled_layout_is_all_full_with_the_raster_pairs(grid, tile, window_tiles):
    tiled = SlidingWindow.tiled(tile=tile, window_tiles=window_tiles)
    raster = SlidingWindow(tiled.window, stride=tiled.stride)
    layout = TokenLayout(grid)
    n = layout.num_visual
    idx = torch.arange(n)
    mask = tiled.visual_mask_mod(grid)(idx[:, None], idx[None, :])
    assert torch.equal(mask, raster.visual_mask_mod(grid)(idx[:, None], idx[None, :]))  # same semantics
    assert tiled.attended_fraction(layout) == raster.attended_fraction(layout)
    to_tiles, _ = tile_permutation(grid, tile)
    mask_tiles = mask[to_tiles][:, to_tiles]
    for block_q, block_k in [(16, 16), tiled.tile_blocks(grid, 128, 64)]:
        blocks = build_block_layout(tiled, grid, block_q, block_k)
        classes = blocks.classes()[0, 0]
        assert not bool((classes == PARTIAL).any())
        counts = mask_tiles.reshape(n // block_q, block_q, n // block_k, block_k).sum((1, 3))
        assert torch.equal(classes == FULL, counts == block_q * block_k)
        assert torch.equal(classes == EMPTY, counts == 0)
        assert int(blocks.visited_tokens().max()) == int(mask.sum())  # computes exactly what it attends


def test_query_blocks_span_tiles_that_share_their_keys():
    # stride = 2 tiles on W: both tiles of a stride group see one key set, so 32-token query
    # blocks stay full although a tile has 16 tokens
    pattern = SlidingWindow((1, 4, 8), stride=(1, 4, 8), tile=(1, 4, 4))
    assert pattern.tile_blocks((2, 4, 16), 128, 64) == (32, 16)
    assert SlidingWindow.tiled(tile=(1, 4, 4), window_tiles=(1, 1, 1)).tile_blocks((2, 4, 16), 128, 64) == (16, 16)
    assert SlidingWindow.tiled(tile=(6, 8, 8), window_tiles=(3, 3, 3)).tile_blocks((30, 48, 80), 128, 64) == (128, 64)


def test_spec_repr_and_shorthand():
    p = SlidingWindow.tiled(tile=(2, 4, 4), window_tiles=(1, 3, None))
    assert p == SlidingWindow((2, 12, None), stride=(2, 4, 4), tile=True)
    assert pattern_from_spec(p.spec()) == p
    assert "tile=(2, 4, 4)" in repr(p) and "tile" not in repr(SlidingWindow(3))
    assert p != SlidingWindow((2, 12, None), stride=(2, 4, 4))  # a different execution, cached apart


@pytest.mark.parametrize("make, grid, match", [
    (lambda: SlidingWindow((1, 8, 4), stride=(1, 4, 4), tile=(1, 4, 4)), (2, 16, 16), "starts off the tile boundaries"),
    (lambda: SlidingWindow((1, 6, 4), stride=(1, 4, 4), tile=(1, 4, 4)), (2, 16, 16), "not a multiple of tile"),
    (lambda: SlidingWindow((1, 12, 4), stride=(1, 1, 4), tile=(1, 4, 4)), (2, 16, 16), "different windows"),
    (lambda: SlidingWindow.tiled(tile=(1, 4, 4), window_tiles=(1, 3, 1)), (2, 14, 16), "not a whole number"),
    (lambda: SlidingWindow.tiled(tile=(1, 3, 4), window_tiles=(1, 3, 1)), (2, 12, 16), "multiples of 16"),
    (lambda: SlidingWindow.tiled(tile=(4, 4), window_tiles=(3, 3)), (2, 16, 16), "one entry per axis|3 axes"),
])
def test_bad_tiles_are_refused_early(make, grid, match):
    with pytest.raises(ValueError, match=match):
        make().validate(grid)


def test_bad_arguments_are_refused_at_construction():
    with pytest.raises(ValueError, match="odd positive int"):
        SlidingWindow.tiled(tile=(1, 4, 4), window_tiles=(1, 2, 1))
    with pytest.raises(ValueError, match="dilation 1"):
        SlidingWindow((1, 12, 12), stride=(1, 4, 4), dilation=(1, 1, 2), tile=True)
    with pytest.raises(ValueError, match="tile"):
        SlidingWindow((1, 12, 12), stride=(1, 4, 4), tile=(4, 4))
    with pytest.raises(ValueError, match=r"tile\[1\]"):
        SlidingWindow((1, 12, 12), stride=(1, 4, 4), tile=(1, 0, 4))


@requires_interpreter
def test_explicit_block_size_that_cuts_tiles_is_refused():
    layout = TokenLayout((4, 8, 8))
    pattern = SlidingWindow.tiled(tile=(1, 4, 4), window_tiles=(3, 1, 1))
    q = torch.randn(1, layout.seq_len, 1, 16)
    with pytest.raises(ValueError, match="partial blocks"):
        diffattn.attention(q, q, q, pattern, layout=layout, impl="triton", block_size=(32, 32))


def _qkv(layout, dtype, heads=2, dim=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, layout.seq_len, heads, dim, generator=gen).to(dtype) for _ in range(3)]


@requires_interpreter
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 2e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("text_len, text_first", [(0, True), (8, True), (11, False)])
@pytest.mark.parametrize("grid, tile, window_tiles", [CASES[0], CASES[3], CASES[4]])
def test_kernel_in_tile_order_matches_reference(grid, tile, window_tiles, text_len, text_first, dtype, atol):
    layout = TokenLayout(grid, text_len=text_len, text_first=text_first)
    pattern = SlidingWindow.tiled(tile=tile, window_tiles=window_tiles)
    q, k, v = _qkv(layout, dtype)
    out, lse = diffattn.attention(q, k, v, pattern, layout=layout, impl="triton", return_lse=True)
    ref, ref_lse = diffattn.attention(q.float(), k.float(), v.float(), pattern, layout=layout, impl="reference",
                                      return_lse=True)  # raster order: the oracle
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=atol, rtol=0)


@requires_interpreter
def test_kernel_with_padded_text_and_shared_query_blocks():
    layout = TokenLayout((2, 4, 16), text_len=6, text_first=False)
    pattern = SlidingWindow((1, 4, 8), stride=(1, 4, 8), tile=(1, 4, 4))
    q, k, v = _qkv(layout, torch.float32)
    lens = torch.tensor([6, 2])
    out = diffattn.attention(q, k, v, pattern, layout=layout, impl="triton", text_lens=lens)
    ref = diffattn.attention(q, k, v, pattern, layout=layout, impl="reference", text_lens=lens)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)


@requires_interpreter
@pytest.mark.parametrize("text_len", [0, 8])
def test_partials_in_tile_order(text_len):
    layout = TokenLayout((4, 8, 8), text_len=text_len)
    pattern = SlidingWindow.tiled(tile=(1, 4, 4), window_tiles=(3, 1, 1))
    q, k, v = _qkv(layout, torch.float32)
    got = attention_partials(q, k, v, pattern, layout=layout, impl="triton")
    want = attention_partials(q, k, v, pattern, layout=layout, impl="reference")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0)
    merged, _ = merge_partials(*got)
    dense = diffattn.attention(q, k, v, diffattn.Dense(), layout=layout, impl="reference")
    torch.testing.assert_close(merged, dense, atol=2e-5, rtol=0)
    out_ex, lse_ex = external_attention(q, k, v, pattern, layout=layout, impl="triton")
    torch.testing.assert_close(out_ex, want[2], atol=2e-5, rtol=0)
    torch.testing.assert_close(lse_ex, want[3], atol=2e-5, rtol=0)


# --- through diffattn.apply on a tiny Wan transformer --------------------------------------

TILED = SlidingWindow.tiled(tile=(2, 4, 4), window_tiles=(1, 3, 3))  # grid (2, 16, 16): 512 tokens


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=8, freq_dim=8, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
    ).eval()


def _run(model, pattern, impl, calls=1, cache=None):
    gen = torch.Generator().manual_seed(1)
    latents, text = torch.randn(1, 4, 2, 32, 32, generator=gen), torch.randn(1, 5, 8, generator=gen)
    diffattn.apply(model, pattern, impl=impl, cache=cache)
    try:
        return [model(latents, torch.tensor([900 - 100 * i]), text).sample for i in range(calls)]
    finally:
        diffattn.remove(model)


@requires_interpreter
@torch.no_grad()
def test_apply_tiled_window_equals_raster_window(model):
    raster = SlidingWindow(TILED.window, stride=TILED.stride)
    (tiled_out,) = _run(model, TILED, "triton")
    (raster_out,) = _run(model, raster, "reference")
    torch.testing.assert_close(tiled_out, raster_out, atol=1e-4, rtol=1e-4)


@requires_interpreter
@torch.no_grad()
def test_apply_tiled_window_with_step_cache(model):
    raster = SlidingWindow(TILED.window, stride=TILED.stride)
    tiled_out = _run(model, TILED, "triton", calls=2, cache=StepCache(refresh_every=2))  # refresh, then reuse
    raster_out = _run(model, raster, "reference", calls=2, cache=StepCache(refresh_every=2))
    for a, b in zip(tiled_out, raster_out):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_docstring_examples():
    import doctest

    import diffattn.tile_order

    result = doctest.testmod(diffattn.tile_order, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_benchmark_runs_the_window_in_both_orders_with_the_same_mask():
    """The kernel benchmark's STA rows: raster and tile order of one window, FlexAttention's block
    mask of each gives the reference output, and the tile-order layout computes exactly the
    attended pairs (eager flex on CPU)."""
    from torch.nn.attention.flex_attention import flex_attention

    from diffattn.bench.kernels import SHAPES, Shape, computed_pairs, flex_block_mask, sta_patterns

    assert SHAPES["hunyuan-768p-117f"].sta == ((6, 8, 8), (3, 3, 3)) and SHAPES["wan-1.3b-480p-81f"].sta is None
    shape = Shape("tiny", TokenLayout((2, 8, 64), text_len=128, text_first=False), heads=2, head_dim=32,
                  sta=((1, 8, 16), (1, 1, 3)))
    layout = shape.layout
    q, k, v = _qkv(layout, torch.float32)
    (_, raster, _), (_, tiled, _) = sta_patterns(shape)
    assert raster == SlidingWindow(tiled.window, stride=tiled.stride)
    attended = round(tiled.attended_fraction(layout) * layout.seq_len**2)
    assert computed_pairs(tiled, layout, shape.head_dim) == attended < computed_pairs(raster, layout, shape.head_dim)
    ref = diffattn.attention(q, k, v, raster, layout=layout, impl="reference")
    for pattern in (raster, tiled):
        order = pattern.tile_order(layout)
        qt, kt, vt = (t if order is None else order.to_tiles(t) for t in (q, k, v))
        out = flex_attention(*(t.transpose(1, 2) for t in (qt, kt, vt)), block_mask=flex_block_mask(pattern, layout, "cpu"))
        out = out.transpose(1, 2)
        torch.testing.assert_close(out if order is None else order.from_tiles(out), ref, atol=2e-5, rtol=0)


@requires_interpreter
def test_torch_compile_fullgraph():
    """Validation, block choice and the permutation indices are constants to torch.compile."""
    import torch._dynamo

    layout = TokenLayout((4, 8, 8), text_len=4, text_first=False)
    pattern = SlidingWindow.tiled(tile=(1, 4, 4), window_tiles=(3, 1, 1))
    q, k, v = _qkv(layout, torch.float32)

    def f(q, k, v):
        return diffattn.attention(q * 1.0, k, v, pattern, layout=layout, impl="triton") + 0.0

    torch._dynamo.reset()
    out = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v)
    torch.testing.assert_close(out, diffattn.attention(q, k, v, pattern, layout=layout, impl="reference"),
                               atol=2e-5, rtol=0)


def test_show_uses_the_kernel_blocks_of_the_tile_order(capsys):
    from diffattn.cli import main

    assert main(["show", "window:4x12x12,stride=2x4x4,tile=true", "--grid", "4x16x16"]) == 0
    out = capsys.readouterr().out
    assert "tile-major order" in out and "partial=0.0%" in out


def test_kernel_blocks_of_a_tiled_window_need_the_grid():
    from diffattn.attention import kernel_blocks

    with pytest.raises(ValueError, match="needs the grid"):
        kernel_blocks(SlidingWindow.tiled(tile=(2, 4, 4), window_tiles=(1, 3, 3)), 64)


def test_tiled_with_int_tile_is_the_same_on_every_axis():
    assert SlidingWindow.tiled(8, 3) == SlidingWindow(24, stride=8, tile=8)
    assert SlidingWindow.tiled(8, (3, 3)) == SlidingWindow((24, 24), stride=(8, 8), tile=(8, 8))


LIST_CASES = [((4, 8, 8), (1, 4, 4), (3, 1, 1)), ((6, 12, 12), (2, 4, 4), (3, 3, 3)), ((12, 32, 32), (4, 8, 8), (3, 3, 3)),
              ((8, 32), (4, 8), (None, 3)), ((12, 16, 16), (3, 4, 8), (3, 1, 1)), ((6, 8, 8), (3, 4, 8), (1, 1, None))]


@pytest.mark.parametrize("grid, tile, window_tiles", LIST_CASES, ids=str)
def test_block_lists_from_tiles_equal_the_class_matrix(grid, tile, window_tiles):
    """The O(kept blocks) builder gives the class-matrix layout exactly, wherever it applies; it
    applies exactly where the tile rule says no block is partial."""
    from diffattn.block_layout import BlockLayout
    from diffattn.patterns.base import PARTIAL

    pattern = SlidingWindow.tiled(tile=tile, window_tiles=window_tiles)
    n = math.prod(grid)
    for block_q in (16, 32, 64, 128, 256):
        for block_k in (16, 32, 64, 128):
            classes = pattern.block_classes(grid, block_q, block_k)
            has_partial = bool((classes == PARTIAL).any())
            assert pattern._blocks_all_full_or_empty(grid, block_q, block_k) == (not has_partial)
            lists = pattern.block_lists(grid, block_q, block_k)
            if lists is None:
                continue
            assert not has_partial
            count, idx = lists
            fast = BlockLayout(block_q, block_k, n, count[None, None], idx[None, None],
                               torch.zeros_like(count)[None, None], torch.zeros_like(count)[None, None, :, None])
            slow = BlockLayout.from_classes(classes, block_q, block_k, n)
            assert torch.equal(fast.classes(), slow.classes())
            assert torch.equal(fast.visited_tokens(), slow.visited_tokens())


def test_large_tiled_layout_never_builds_the_block_matrix(monkeypatch):
    """506,880 tokens with 32-token blocks: 15,840 x 15,840 blocks (250 M entries) as a class
    matrix; the block-size search and the build work from the tiles alone."""
    from diffattn.attention import kernel_blocks

    def no_matrix(*args, **kwargs):
        raise AssertionError("the [NQ, NK] block class matrix was built")

    grid, pattern = (66, 96, 80), SlidingWindow.tiled(tile=(3, 4, 8), window_tiles=(3, 3, 3))
    monkeypatch.setattr(SlidingWindow, "block_classes", no_matrix)
    blocks = kernel_blocks(pattern, 128, None, grid)
    assert blocks == (32, 32)
    layout = diffattn.build_block_layout(pattern, grid, *blocks)
    assert layout.num_q_blocks == 15840 and int(layout.part_num.sum()) == 0
    assert layout.full_idx.shape[-1] == 27 * 3  # 27 key tiles of 3 blocks each, at most
    assert 0 < layout.block_density < 0.01
