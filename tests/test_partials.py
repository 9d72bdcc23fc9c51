"""Internal + external attention partials merge into dense attention exactly (the step cache's basis)."""

import os

import pytest
import torch

import diffattn
from diffattn import BlockTopK, Dense, Piecewise, Radial, SlidingWindow, TokenLayout
from diffattn.partials import attention_partials, external_attention, merge_partials

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
IMPLS = ["reference", pytest.param("triton", marks=pytest.mark.skipif(not INTERPRET, reason="interpreter"))]
LAYOUTS = [TokenLayout((3, 5, 7), text_len=10), TokenLayout((3, 5, 7), text_len=6, text_first=False), TokenLayout((6, 6))]


def patterns(layout):
    three = len(layout.grid) == 3
    return [SlidingWindow((2, 3, 3) if three else (3, 3)), SlidingWindow((2, 2, 3) if three else (3, 3), dilation=(1, 2, 2) if three else (2, 2)),
            Radial(0.5, block=16), BlockTopK(density=0.3, block=16), Dense()]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_partials_merge_to_dense(layout, impl):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, layout.seq_len, 2, 16, generator=gen) for _ in range(3))
    dense, dense_lse = diffattn.attention(q, k, v, Dense(), layout=layout, impl="reference", return_lse=True)
    for pattern in patterns(layout):
        parts = attention_partials(q, k, v, pattern, layout=layout, impl=impl, block_size=(16, 16) if impl == "triton" else None)
        out, lse = merge_partials(*parts)
        torch.testing.assert_close(out, dense, atol=2e-6, rtol=2e-6)
        torch.testing.assert_close(lse, dense_lse, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_external_has_no_text(impl):
    layout = TokenLayout((2, 4, 4), text_len=5)
    q, k, v = (torch.randn(1, layout.seq_len, 1, 16) for _ in range(3))
    out, lse = external_attention(q, k, v, SlidingWindow((1, 3, 3)), layout=layout, impl=impl,
                                  block_size=(16, 16) if impl == "triton" else None)
    assert torch.equal(out[:, :5], torch.zeros_like(out[:, :5])) and torch.isinf(lse[:, :5]).all()
    assert torch.isfinite(lse[:, 5:]).all()


def test_merge_with_an_empty_partial_is_identity():
    out = torch.randn(1, 4, 2, 8)
    lse = torch.randn(1, 4, 2)
    merged, merged_lse = merge_partials(out, lse, torch.zeros_like(out), torch.full_like(lse, float("-inf")))
    torch.testing.assert_close(merged, out)
    torch.testing.assert_close(merged_lse, lse)
    both_empty, l = merge_partials(torch.zeros_like(out), torch.full_like(lse, float("-inf")), torch.zeros_like(out), torch.full_like(lse, float("-inf")))
    assert torch.equal(both_empty, torch.zeros_like(out)) and torch.isinf(l).all()


def test_piecewise_has_no_external_part():
    layout = TokenLayout((2, 4, 4))
    q = torch.randn(1, layout.seq_len, 1, 16)
    with pytest.raises(ValueError, match="no external part"):
        external_attention(q, q, q, Piecewise(0.5, block=16), layout=layout)
