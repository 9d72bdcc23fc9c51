"""The selection, Piecewise, tile-order window and merge kernels on a CUDA GPU (bf16 / fp16, the
block sizes the package launches there); skipped without one. The torch reference in fp32 on the
same inputs is the oracle."""

import pytest
import torch

import diffattn
from diffattn import BlockTopK, Piecewise, SlidingWindow, TokenLayout
from diffattn.partials import attention_partials, merge_partials
from diffattn.testing import structured_qkv

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

LAYOUTS = [
    TokenLayout((5, 30, 52)),  # Wan-like, no text, visual tokens not a multiple of the block
    TokenLayout((4, 24, 40), text_len=77, text_first=False),  # HunyuanVideo-like, text last
    TokenLayout((48, 48), text_len=128, text_first=True),  # Flux-like, text first
]


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def qkv(layout, dtype, heads=4, head_dim=128, batch=2):
    return structured_qkv(layout, batch=batch, heads=heads, head_dim=head_dim, sharpness=6, dtype=dtype, device="cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("pattern", [BlockTopK(density=0.25), BlockTopK(cdf=0.9), BlockTopK(density=0.1, similarity=0.3)], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_selection_kernel_cuda(pattern, layout, dtype):
    q, k, _ = qkv(layout, dtype)
    got = diffattn.select_blocks(q, k, pattern, layout, impl="triton")
    want = diffattn.select_blocks(q.float(), k.float(), pattern, layout, impl="reference")
    assert got.shape == want.shape and got.dtype == torch.bool
    # low-precision pooling can flip a block at the top-k threshold; nothing more
    assert float((got != want).float().mean()) < 0.02


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("pattern", [BlockTopK(density=0.25), Piecewise(0.25, order=0), Piecewise(0.25, first_order="shared"),
                                     Piecewise(0.25), Piecewise(0.25, first_order="lowrank")], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_dynamic_attention_cuda(pattern, layout, dtype):
    q, k, v = qkv(layout, dtype)
    selection = diffattn.select_blocks(q, k, pattern, layout, impl="triton")
    out, lse = diffattn.attention(q, k, v, pattern, layout=layout, impl="triton", selection=selection, return_lse=True)
    ref, ref_lse = diffattn.attention(q.float(), k.float(), v.float(), pattern, layout=layout, impl="reference",
                                      selection=selection, return_lse=True)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel(out, ref) < 2e-2
    assert (lse - ref_lse).abs().max().item() < 5e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("grid, tile, window_tiles, text_len, text_first", [
    ((12, 32, 32), (4, 8, 8), (3, 3, 3), 0, True),
    ((12, 32, 32), (4, 8, 8), (3, 3, 3), 77, False),
    ((64, 64), (8, 16), (3, 3), 128, True),
], ids=str)
def test_tiled_window_cuda(grid, tile, window_tiles, text_len, text_first, dtype):
    layout = TokenLayout(grid, text_len=text_len, text_first=text_first)
    pattern = SlidingWindow.tiled(tile=tile, window_tiles=window_tiles)
    q, k, v = qkv(layout, dtype)
    out, lse = diffattn.attention(q, k, v, pattern, layout=layout, impl="triton", return_lse=True)
    ref, ref_lse = diffattn.attention(q.float(), k.float(), v.float(), pattern, layout=layout, impl="reference",
                                      return_lse=True)
    assert rel(out, ref) < 2e-2
    assert (lse - ref_lse).abs().max().item() < 5e-2
    raster = SlidingWindow(pattern.window, stride=pattern.stride)
    assert rel(out, diffattn.attention(q, k, v, raster, layout=layout, impl="triton")) < 2e-2
    got = attention_partials(q, k, v, pattern, layout=layout, impl="triton")
    merged, _ = merge_partials(*got)
    dense = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    assert rel(merged, dense) < 2e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_merge_kernel_cuda(dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (2, 5000, 8, 128)
    o1, o2 = (torch.randn(shape, device="cuda", generator=gen).to(dtype) for _ in range(2))
    l1, l2 = (torch.randn(shape[:3], device="cuda", generator=gen) * 4 for _ in range(2))
    l2[0, :10] = float("-inf")  # an empty partial: its output is ignored
    got, got_lse = merge_partials(o1, l1, o2, l2, impl="triton")
    want, want_lse = merge_partials(o1.float(), l1, o2.float(), l2, impl="reference")
    assert rel(got, want) < 1e-2
    torch.testing.assert_close(got_lse, want_lse, atol=1e-4, rtol=1e-4)
