"""Piecewise (exact-or-approximate) attention: reference vs brute force, kernel vs reference, error ordering."""

import math
import os

import pytest
import torch

import diffattn
from diffattn import BlockTopK, Dense, TokenLayout
from diffattn.patterns.piecewise import FIRST_ORDER, Piecewise, piecewise_attention_reference
from diffattn.testing import relative_l1, structured_qkv

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def brute_force(q, k, v, pattern, layout, scale):
    """METHODS section 5 token by token (first order: the exact per-block term), float64."""
    vs, nv, blk = layout.visual_start, layout.num_visual, pattern.block
    keep = pattern.select(q[:, vs : vs + nv], k[:, vs : vs + nv], scale)
    b_n, s, h_n, d = q.shape
    out = torch.zeros(b_n, s, h_n, d, dtype=torch.float64)
    q, k, v = q.double(), k.double(), v.double()
    for b in range(b_n):
        for h in range(h_n):
            for i in range(s):
                qi = q[b, i, h]
                vis_q = vs <= i < vs + nv
                num, den = torch.zeros(d, dtype=torch.float64), 0.0
                for j in range(s):
                    vis_k = vs <= j < vs + nv
                    if not vis_q or not vis_k or keep[b, h, (i - vs) // blk, (j - vs) // blk]:
                        e = math.exp(scale * float(qi @ k[b, j, h]))
                        num, den = num + e * v[b, j, h], den + e
                if vis_q:
                    for jb in range(math.ceil(nv / blk)):
                        if keep[b, h, (i - vs) // blk, jb]:
                            continue
                        ks = k[b, vs + jb * blk : vs + min(nv, (jb + 1) * blk), h]
                        vv = v[b, vs + jb * blk : vs + min(nv, (jb + 1) * blk), h]
                        kbar = ks.mean(0)
                        a = math.exp(scale * float(qi @ kbar))
                        num = num + a * vv.sum(0)
                        if pattern.order == 1:
                            num = num + a * scale * ((ks - kbar) @ qi) @ vv
                        den += a * len(ks)
                out[b, i, h] = num / den
    return out


@pytest.mark.parametrize("order", [0, 1])
@pytest.mark.parametrize("layout", [TokenLayout((2, 4, 7), text_len=5), TokenLayout((2, 4, 7), text_len=5, text_first=False)], ids=str)
def test_reference_matches_brute_force(order, layout):
    q, k, v = structured_qkv(layout, heads=1, head_dim=8, sharpness=3)
    pattern = Piecewise(0.34, block=16, order=order, first_order="exact")
    out, _ = piecewise_attention_reference(q, k, v, pattern, layout)
    torch.testing.assert_close(out.double(), brute_force(q, k, v, pattern, layout, 8**-0.5), atol=1e-5, rtol=1e-5)


def test_density_one_is_dense():
    layout = TokenLayout((3, 5, 9), text_len=9)
    q, k, v = structured_qkv(layout, batch=2, heads=2, head_dim=16)
    dense = diffattn.attention(q, k, v, Dense(), layout=layout)
    torch.testing.assert_close(diffattn.attention(q, k, v, Piecewise(1.0, block=16), layout=layout), dense, atol=2e-6, rtol=2e-6)


@pytest.mark.skipif(not INTERPRET, reason="kernel under the interpreter")
@pytest.mark.parametrize("pattern", [Piecewise(0.3, block=16, order=0), Piecewise(0.3, block=16, first_order="shared"),
                                     Piecewise(0.3, block=16), Piecewise(0.5, block=32),
                                     Piecewise(0.3, block=16, first_order="lowrank"),
                                     Piecewise(0.5, block=32, first_order="lowrank", rank=3)], ids=str)
@pytest.mark.parametrize("layout", [TokenLayout((3, 5, 9), text_len=9), TokenLayout((3, 5, 9), text_len=9, text_first=False), TokenLayout((2, 8, 8))], ids=str)
def test_kernel_matches_reference(pattern, layout):
    q, k, v = structured_qkv(layout, batch=2, heads=2, head_dim=32, sharpness=3)
    a, la = diffattn.attention(q, k, v, pattern, layout=layout, impl="triton", return_lse=True)
    b, lb = diffattn.attention(q, k, v, pattern, layout=layout, impl="reference", return_lse=True)
    torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(la, lb, atol=2e-5, rtol=2e-5)


@pytest.mark.skipif(not INTERPRET, reason="kernel under the interpreter")
def test_lowrank_kernel_term_is_not_zero():
    """The kernel's low-rank first-order term matters (far above the kernel-reference tolerance),
    and with the rank at the head dim it equals the exact first-order term."""
    layout = TokenLayout((3, 5, 9), text_len=9)
    q, k, v = structured_qkv(layout, batch=1, heads=2, head_dim=16, sharpness=3)
    zeroth = diffattn.attention(q, k, v, Piecewise(0.3, block=16, order=0), layout=layout, impl="triton")
    lowrank = diffattn.attention(q, k, v, Piecewise(0.3, block=16, first_order="lowrank"), layout=layout, impl="triton")
    assert (lowrank - zeroth).abs().max() > 1e-2
    full_rank = diffattn.attention(q, k, v, Piecewise(0.3, block=16, first_order="lowrank", rank=16), layout=layout, impl="triton")
    exact = diffattn.attention(q, k, v, Piecewise(0.3, block=16, first_order="exact"), layout=layout, impl="reference")
    torch.testing.assert_close(full_rank, exact, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not INTERPRET, reason="kernel under the interpreter")
def test_exact_first_order_has_no_kernel():
    layout = TokenLayout((2, 4, 8))
    q = torch.randn(1, layout.seq_len, 1, 16)
    with pytest.raises(ValueError, match="first_order='exact' has no kernel"):
        diffattn.attention(q, q, q, Piecewise(0.5, block=16, first_order="exact"), layout=layout, impl="triton")


@pytest.mark.skipif(not INTERPRET, reason="kernel under the interpreter")
def test_kernel_rescales_every_accumulator():
    """Exact logits far above the approximate ones move the running max after the approximate
    part: an unrescaled approximate denominator would show up as a large error."""
    layout = TokenLayout((2, 8, 8))
    q, k, v = structured_qkv(layout, heads=1, head_dim=16, sharpness=3)
    q = q * 6.0  # sharp: the diagonal blocks dominate by many orders of magnitude
    pattern = Piecewise(0.25, block=16, order=0)
    out = diffattn.attention(q, k, v, pattern, layout=layout, impl="triton")
    want = brute_force(q, k, v, pattern, layout, 16**-0.5)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


def test_error_ordering_on_structured_inputs():
    layout = TokenLayout((8, 16, 16))
    q, k, v = structured_qkv(layout, heads=4, head_dim=64, sharpness=2)
    dense = diffattn.attention(q, k, v, Dense(), layout=layout)
    err = {fo: relative_l1(piecewise_attention_reference(q, k, v, Piecewise(0.25, first_order=fo), layout)[0], dense) for fo in FIRST_ORDER}
    order0 = relative_l1(piecewise_attention_reference(q, k, v, Piecewise(0.25, order=0), layout)[0], dense)
    topk = relative_l1(diffattn.attention(q, k, v, BlockTopK(density=0.25), layout=layout), dense)
    assert err["pooled"] < order0 and err["exact"] < order0  # order 1 below order 0
    assert order0 < 0.5 * topk  # approximating beats dropping
    assert err["exact"] < 0.5 * order0  # the exact first-order term roughly halves the error
    assert err["pooled"] < 1.2 * err["exact"]  # and the pooled term keeps most of that gain
    assert err["shared"] > err["pooled"]


PADDED_LAYOUTS = [TokenLayout((3, 5, 9), text_len=21), TokenLayout((3, 5, 9), text_len=21, text_first=False)]


def padded_inputs(layout, text_lens):
    """Structured q, k, v whose padded text keys hold huge values: any leak shows."""
    q, k, v = structured_qkv(layout, batch=len(text_lens), heads=2, head_dim=16, sharpness=3)
    lens = torch.tensor(text_lens)
    for b, n in enumerate(text_lens):
        pad = slice(layout.text_start + n, layout.text_start + layout.text_len)
        k[b, pad], v[b, pad] = 30.0, 1e3
    return q, k, v, lens


@pytest.mark.parametrize("impl", ["reference", pytest.param("triton", marks=pytest.mark.skipif(not INTERPRET, reason="interpreter"))])
@pytest.mark.parametrize("layout", PADDED_LAYOUTS, ids=str)
def test_text_padding_density_one_is_dense_with_key_padding(layout, impl):
    q, k, v, lens = padded_inputs(layout, [5, 21, 0])
    out, lse = diffattn.attention(q, k, v, Piecewise(1.0, block=16), layout=layout, impl=impl, text_lens=lens, return_lse=True)
    want, want_lse = diffattn.attention(q, k, v, Dense(), layout=layout, impl="reference", text_lens=lens, return_lse=True)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, want_lse, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("pattern", [Piecewise(0.3, block=16, order=0), Piecewise(0.3, block=16, first_order="shared"),
                                     Piecewise(0.3, block=16), Piecewise(0.3, block=16, first_order="exact")], ids=str)
def test_text_padding_is_excluded_everywhere(pattern):
    """Padded text keys change nothing, for visual and text queries: the output equals the
    output on the sequence with the padding cut out."""
    layout = TokenLayout((3, 5, 9), text_len=21, text_first=False)
    q, k, v, lens = padded_inputs(layout, [7])
    out = diffattn.attention(q, k, v, pattern, layout=layout, impl="reference", text_lens=lens)
    short = TokenLayout((3, 5, 9), text_len=7, text_first=False)
    keep = short.seq_len
    want = diffattn.attention(q[:, :keep], k[:, :keep], v[:, :keep], pattern, layout=short, impl="reference")
    torch.testing.assert_close(out[:, :keep], want, atol=2e-5, rtol=2e-5)


@pytest.mark.skipif(not INTERPRET, reason="kernel under the interpreter")
@pytest.mark.parametrize("pattern", [Piecewise(0.3, block=16, order=0), Piecewise(0.3, block=16, first_order="shared"),
                                     Piecewise(0.3, block=16), Piecewise(0.3, block=16, first_order="lowrank")], ids=str)
@pytest.mark.parametrize("layout", PADDED_LAYOUTS, ids=str)
def test_text_padding_kernel_matches_reference(pattern, layout):
    q, k, v, lens = padded_inputs(layout, [5, 21, 0])
    a, la = diffattn.attention(q, k, v, pattern, layout=layout, impl="triton", text_lens=lens, return_lse=True)
    b, lb = diffattn.attention(q, k, v, pattern, layout=layout, impl="reference", text_lens=lens, return_lse=True)
    torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(la, lb, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(density=0.0), r"density must be in \(0, 1\]"),
    (dict(density=2.0), r"density must be in \(0, 1\]"),
    (dict(density=0.5, block=24), "block must be a power of two >= 16"),
    (dict(density=0.5, order=2), "order must be 0 or 1"),
    (dict(density=0.5, first_order="taylor"), "first_order must be one of"),
    (dict(density=0.5, rank=0), "rank must be a positive int"),
])
def test_invalid_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Piecewise(**kwargs)
