"""BlockTopK: selection rules, kernel vs reference, errors; structured inputs."""

import math
import os

import pytest
import torch

import diffattn
from diffattn import BlockTopK, Dense, SlidingWindow, TokenLayout
from diffattn.patterns.topk import block_means, block_self_similarity
from diffattn.testing import relative_l1, structured_qkv

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
IMPLS = ["reference", pytest.param("triton", marks=pytest.mark.skipif(not INTERPRET, reason="interpreter"))]


def qkv(layout, heads=2, dim=16, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, layout.seq_len, heads, dim, generator=gen) for _ in range(3))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", [TokenLayout((3, 7, 9), text_len=10), TokenLayout((3, 7, 9), text_len=10, text_first=False), TokenLayout((2, 8, 8))], ids=str)
def test_density_one_is_dense(layout, impl):
    q, k, v = qkv(layout)
    out = diffattn.attention(q, k, v, BlockTopK(density=1.0, block=16), layout=layout, impl=impl)
    torch.testing.assert_close(out, diffattn.attention(q, k, v, Dense(), layout=layout, impl="reference"), atol=2e-6, rtol=2e-6)


@pytest.mark.skipif(not INTERPRET, reason="interpreter")
@pytest.mark.parametrize("pattern", [BlockTopK(density=0.3, block=32), BlockTopK(cdf=0.6, block=16), BlockTopK(density=0.2, block=16, keep_sink=False, keep_diagonal=False)], ids=str)
@pytest.mark.parametrize("layout", [TokenLayout((3, 7, 9), text_len=10), TokenLayout((3, 7, 9), text_len=7, text_first=False)], ids=str)
def test_kernel_matches_reference(pattern, layout):
    q, k, v = structured_qkv(layout, batch=2, heads=2, head_dim=16)
    a, la = diffattn.attention(q, k, v, pattern, layout=layout, impl="triton", return_lse=True)
    b, lb = diffattn.attention(q, k, v, pattern, layout=layout, impl="reference", return_lse=True)
    torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(la, lb, atol=2e-5, rtol=2e-5)


def naive_keep(pattern, q, k, scale):
    """Selection transcribed from METHODS section 4, one (batch, head, query block) at a time."""
    qm, km = block_means(q, pattern.block), block_means(k, pattern.block)
    b_n, h_n, nq, _ = qm.shape
    nk = km.shape[2]
    keep = torch.zeros(b_n, h_n, nq, nk, dtype=torch.bool)
    for b in range(b_n):
        for h in range(h_n):
            for i in range(nq):
                p = torch.softmax(scale * km[b, h] @ qm[b, h, i], 0)
                order = sorted(range(nk), key=lambda j: -float(p[j]))
                if pattern.density is not None:
                    chosen = order[: max(1, math.ceil(pattern.density * nk))]
                else:
                    chosen, mass = [], 0.0
                    for j in order:
                        chosen.append(j)
                        mass += float(p[j])
                        if mass >= pattern.cdf:
                            break
                for j in chosen:
                    keep[b, h, i, j] = True
                if pattern.keep_diagonal and i < nk:
                    keep[b, h, i, i] = True
                if pattern.keep_sink:
                    keep[b, h, i, 0] = True
    return keep


@pytest.mark.parametrize("pattern", [BlockTopK(density=0.25, block=16), BlockTopK(cdf=0.5, block=16), BlockTopK(cdf=0.9, block=32, keep_sink=False)], ids=str)
def test_selection_matches_definition(pattern):
    layout = TokenLayout((3, 9, 10))
    q, k, _ = structured_qkv(layout, batch=1, heads=2, head_dim=16)
    scale = 16**-0.5
    assert torch.equal(pattern.select(q, k, scale), naive_keep(pattern, q, k, scale))


def test_similarity_guard_keeps_dissimilar_blocks():
    layout = TokenLayout((2, 8, 8))
    q, k, _ = qkv(layout, batch=1)  # random tokens: mean cosine ~ 0
    keep = BlockTopK(density=0.25, block=16, similarity=0.5).select(q, k, 0.25)
    assert keep.all()
    sim = block_self_similarity(q, 16)
    assert sim.shape == (1, 2, 8) and (sim.abs() < 0.3).all()
    same = torch.ones(1, 32, 1, 4)
    assert torch.allclose(block_self_similarity(same, 16), torch.ones(1, 1, 2))


def test_structured_inputs_rank_methods():
    """On structured inputs error falls with density, and random inputs are far worse."""
    layout = TokenLayout((6, 16, 16))
    q, k, v = structured_qkv(layout, heads=2, head_dim=32)
    dense = diffattn.attention(q, k, v, Dense(), layout=layout)
    errors = [relative_l1(diffattn.attention(q, k, v, BlockTopK(density=d), layout=layout), dense) for d in (0.125, 0.25, 0.5)]
    assert errors[0] > errors[1] > errors[2]
    qr, kr, vr = qkv(layout, dim=32, batch=1)
    dense_r = diffattn.attention(qr, kr, vr, Dense(), layout=layout)
    assert relative_l1(diffattn.attention(qr, kr, vr, BlockTopK(density=0.25), layout=layout), dense_r) > 3 * errors[1]
    window = relative_l1(diffattn.attention(q, k, v, SlidingWindow((3, 9, 9)), layout=layout), dense)
    assert window < 0.2


@pytest.mark.parametrize("kwargs, match", [
    (dict(), "exactly one of density and cdf"),
    (dict(density=0.5, cdf=0.5), "exactly one of density and cdf"),
    (dict(density=0.0), r"density must be in \(0, 1\]"),
    (dict(density=1.5), r"density must be in \(0, 1\]"),
    (dict(cdf=-0.1), r"cdf must be in \(0, 1\]"),
    (dict(density=0.5, block=48), "block must be a power of two >= 16"),
    (dict(density=0.5, block=8), "block must be a power of two >= 16"),
    (dict(density=0.5, similarity=2.0), "similarity"),
])
def test_invalid_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BlockTopK(**kwargs)


def test_static_methods_refuse():
    with pytest.raises(ValueError, match="selects blocks"):
        BlockTopK(density=0.5).mask_mod(TokenLayout((2, 4, 4)))
    with pytest.raises(ValueError, match="no static layout"):
        diffattn.build_block_layout(BlockTopK(density=0.5), (2, 4, 4), 16, 16)
