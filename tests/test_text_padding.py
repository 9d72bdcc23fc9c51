"""Per-batch text key padding (HunyuanVideo's prompt padding): kernel and reference vs a naive oracle."""

import os

import pytest
import torch

import diffattn
from diffattn import Dense, Radial, SlidingWindow, TokenLayout
from diffattn.attention import text_key_padding

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def naive(q, k, v, pattern, layout, lens):
    idx = torch.arange(layout.seq_len)
    allowed = pattern.mask_mod(layout)(idx[:, None], idx[None, :])[None, None] & text_key_padding(lens, layout)[:, None, None, :]
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * q.shape[-1] ** -0.5
    return torch.einsum("bhqk,bkhd->bqhd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v.double())


@pytest.mark.parametrize("text_first", [True, False])
@pytest.mark.parametrize("pattern", [Dense(), SlidingWindow((2, 3, 3)), Radial(0.5, block=32)], ids=["dense", "window", "radial"])
@pytest.mark.parametrize("impl", ["reference", pytest.param("triton", marks=pytest.mark.skipif(not INTERPRET, reason="interpreter"))])
def test_text_lens(text_first, pattern, impl):
    layout = TokenLayout((3, 5, 7), text_len=21, text_first=text_first)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, layout.seq_len, 2, 32, generator=gen) for _ in range(3))
    lens = torch.tensor([21, 5, 0])
    out = diffattn.attention(q, k, v, pattern, layout=layout, impl=impl, block_size=(32, 16) if impl == "triton" else None, text_lens=lens)
    torch.testing.assert_close(out.double(), naive(q, k, v, pattern, layout, lens), atol=2e-6, rtol=2e-6)


def test_full_text_lens_equals_no_padding():
    layout = TokenLayout((2, 4, 4), text_len=8)
    q = torch.randn(2, layout.seq_len, 1, 16)
    a = diffattn.attention(q, q, q, SlidingWindow((2, 3, 3)), layout=layout)
    b = diffattn.attention(q, q, q, SlidingWindow((2, 3, 3)), layout=layout, text_lens=torch.tensor([8, 8]))
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("lens, error, match", [
    (torch.tensor([9, 1]), ValueError, "text_lens must lie in"),
    (torch.tensor([-1, 1]), ValueError, "text_lens must lie in"),
    (torch.tensor([1]), ValueError, r"text_lens must be \[B=2\]"),
    (torch.tensor([1.0, 2.0]), TypeError, "text_lens must be an int"),
    ([1, 2], TypeError, "text_lens must be an int"),
])
def test_text_lens_errors(lens, error, match):
    layout = TokenLayout((2, 4, 4), text_len=8)
    q = torch.randn(2, layout.seq_len, 1, 16)
    with pytest.raises(error, match=match):
        diffattn.attention(q, q, q, Dense(), layout=layout, text_lens=lens)
