"""Internal + external attention partials merge into dense attention exactly (the step cache's basis).

The one-pass Triton kernel (``block_sparse_partials``) runs under TRITON_INTERPRET=1 and is checked
partial by partial against the reference (two masked attentions), the oracle.
"""

import os

import pytest
import torch

import diffattn
from diffattn import BlockTopK, Dense, Piecewise, Radial, SlidingWindow, TokenLayout, select_blocks
from diffattn.partials import attention_partials, external_attention, merge_partials

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
requires_interpreter = pytest.mark.skipif(not INTERPRET, reason="runs the kernel under TRITON_INTERPRET=1")
IMPLS = ["reference", pytest.param("triton", marks=requires_interpreter)]
LAYOUTS = [TokenLayout((3, 5, 7), text_len=10), TokenLayout((3, 5, 7), text_len=6, text_first=False), TokenLayout((6, 6))]


def patterns(layout):
    three = len(layout.grid) == 3
    return [SlidingWindow((2, 3, 3) if three else (3, 3)), SlidingWindow((2, 2, 3) if three else (3, 3), dilation=(1, 2, 2) if three else (2, 2)),
            Radial(0.5, block=16), BlockTopK(density=0.3, block=16), Dense()]


def qkv(layout, batch=2, heads=2, dim=16, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, layout.seq_len, heads, dim, generator=gen).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_partials_merge_to_dense(layout, impl):
    q, k, v = qkv(layout)
    dense, dense_lse = diffattn.attention(q, k, v, Dense(), layout=layout, impl="reference", return_lse=True)
    for pattern in patterns(layout):
        parts = attention_partials(q, k, v, pattern, layout=layout, impl=impl, block_size=(16, 16) if impl == "triton" else None)
        out, lse = merge_partials(*parts)
        torch.testing.assert_close(out, dense, atol=2e-6, rtol=2e-6)
        torch.testing.assert_close(lse, dense_lse, atol=2e-5, rtol=2e-5)


def assert_partials_close(got, want, atol, rtol):
    """Both partials equal; an empty partial (lse -inf) must be empty in both, with out 0."""
    for out, lse, ref_out, ref_lse in ((got[0], got[1], want[0], want[1]), (got[2], got[3], want[2], want[3])):
        empty = torch.isneginf(ref_lse)
        assert torch.equal(torch.isneginf(lse), empty)
        assert not out.isnan().any() and not lse.isnan().any()
        assert torch.equal(out[empty], torch.zeros_like(out[empty]))
        torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol)
        torch.testing.assert_close(lse[~empty], ref_lse[~empty], atol=atol, rtol=rtol)


# pattern, TokenLayout, block size, text_lens (None: no padding)
KERNEL_CASES = [
    (SlidingWindow((2, 3, 3)), TokenLayout((3, 5, 7), text_len=10), (16, 16), None),  # odd sizes: short tail blocks
    (SlidingWindow((2, 3, 5)), TokenLayout((3, 6, 9), text_len=7, text_first=False), (32, 16), None),  # text last
    (SlidingWindow((2, 4, 4)), TokenLayout((4, 6, 10), text_len=9), (64, 32), None),  # even windows
    (SlidingWindow((2, 3, 3), dilation=(1, 2, 2)), TokenLayout((2, 7, 9), text_len=5), (16, 16), None),
    (SlidingWindow((2, 4, 6), stride=(1, 2, 3)), TokenLayout((3, 8, 12)), (32, 32), None),
    (SlidingWindow((1, 5, 7)), TokenLayout((1, 13, 15)), (32, 16), None),  # one frame
    (SlidingWindow((5, 6)), TokenLayout((17, 19), text_len=11), (64, 32), None),  # 2-D grid
    (SlidingWindow((2, 3, 3)), TokenLayout((3, 5, 7), text_len=8, text_first=False), (16, 16), [3, 8]),  # text padding
    (SlidingWindow((2, 3, 3)), TokenLayout((3, 5, 7), text_len=8), (32, 16), [0, 5]),  # all text padded in row 0
    (SlidingWindow((2, 5, 5)), TokenLayout((4, 10, 10), text_len=20), None, None),  # the GPU default blocks
    (Radial(0.5, block=16), TokenLayout((3, 5, 7), text_len=10), (16, 16), None),
    (Radial(0.3, block=32), TokenLayout((10, 4, 7), text_len=9, text_first=False), (32, 16), [4, 9]),
    (Radial(0.2, block=64, sink=False), TokenLayout((6, 8, 8)), (64, 32), None),
]
KERNEL_IDS = [f"{i}-{type(c[0]).__name__}-{c[1]}-blk{c[2]}-lens{c[3]}" for i, c in enumerate(KERNEL_CASES)]


@requires_interpreter
@pytest.mark.parametrize("pattern, layout, block, text_lens", KERNEL_CASES, ids=KERNEL_IDS)
def test_one_pass_kernel_matches_reference(pattern, layout, block, text_lens):
    q, k, v = qkv(layout)
    lens = None if text_lens is None else torch.tensor(text_lens)
    got = attention_partials(q, k, v, pattern, layout=layout, impl="triton", block_size=block, text_lens=lens)
    want = attention_partials(q, k, v, pattern, layout=layout, impl="reference", text_lens=lens)
    assert_partials_close(got, want, atol=2e-5, rtol=2e-5)
    dense, dense_lse = diffattn.attention(q, k, v, Dense(), layout=layout, impl="reference", text_lens=lens, return_lse=True)
    out, lse = merge_partials(*got)
    torch.testing.assert_close(out, dense, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, dense_lse, atol=2e-5, rtol=2e-5)


@requires_interpreter
@pytest.mark.parametrize("layout, block", [(TokenLayout((3, 5, 7), text_len=10), (16, 16)),
                                           (TokenLayout((4, 6, 10), text_len=6, text_first=False), (32, 16)),
                                           (TokenLayout((9, 10)), (32, 32))], ids=str)
def test_one_pass_kernel_block_topk_with_selection(layout, block):
    q, k, v = qkv(layout)
    pattern = BlockTopK(density=0.3, block=32)
    selection = select_blocks(q, k, pattern, layout)
    got = attention_partials(q, k, v, pattern, layout=layout, impl="triton", block_size=block, selection=selection)
    want = attention_partials(q, k, v, pattern, layout=layout, impl="reference", selection=selection)
    assert_partials_close(got, want, atol=2e-5, rtol=2e-5)
    # a stale selection (from other q/k) is honoured as given, not recomputed
    stale = ~selection
    stale[..., torch.arange(stale.shape[-2]), torch.arange(stale.shape[-1])] = True
    got = attention_partials(q, k, v, pattern, layout=layout, impl="triton", block_size=block, selection=stale)
    want = attention_partials(q, k, v, pattern, layout=layout, impl="reference", selection=stale)
    assert_partials_close(got, want, atol=2e-5, rtol=2e-5)


@requires_interpreter
def test_one_pass_equals_two_passes():
    layout = TokenLayout((3, 6, 9), text_len=7, text_first=False)
    q, k, v = qkv(layout)
    pattern = SlidingWindow((2, 3, 5))
    out_in, lse_in, out_ex, lse_ex = attention_partials(q, k, v, pattern, layout=layout, impl="triton", block_size=(32, 16))
    two_in = diffattn.attention(q, k, v, pattern, layout=layout, impl="triton", block_size=(32, 16), return_lse=True)
    two_ex = external_attention(q, k, v, pattern, layout=layout, impl="triton", block_size=(32, 16))
    assert_partials_close((out_in, lse_in, out_ex, lse_ex), (*two_in, *two_ex), atol=1e-6, rtol=1e-6)


@requires_interpreter
def test_one_pass_kernel_float16():
    layout = TokenLayout((3, 5, 7), text_len=10)
    q, k, v = qkv(layout, dtype=torch.float16, dim=32)
    pattern = SlidingWindow((2, 3, 3))
    got = attention_partials(q, k, v, pattern, layout=layout, impl="triton", block_size=(16, 16))
    assert got[0].dtype == got[2].dtype == torch.float16 and got[1].dtype == got[3].dtype == torch.float32
    want = attention_partials(q.float(), k.float(), v.float(), pattern, layout=layout, impl="reference")
    assert_partials_close([t.float() for t in got], want, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_partials_are_well_defined(impl):
    """A window covering the whole grid leaves no external key; a BlockTopK selection with no block
    and no text leaves no internal key. Either way the merge is exact and NaN-free."""
    block = (16, 16) if impl == "triton" else None
    layout = TokenLayout((3, 5, 7), text_len=6)
    q, k, v = qkv(layout)
    out_in, lse_in, out_ex, lse_ex = attention_partials(q, k, v, SlidingWindow((3, 5, 7)), layout=layout, impl=impl,
                                                        block_size=block)
    assert torch.isneginf(lse_ex).all() and torch.equal(out_ex, torch.zeros_like(out_ex))
    dense, dense_lse = diffattn.attention(q, k, v, Dense(), layout=layout, impl="reference", return_lse=True)
    out, lse = merge_partials(out_in, lse_in, out_ex, lse_ex)
    torch.testing.assert_close(out, dense, atol=2e-6, rtol=2e-6)

    layout = TokenLayout((3, 5, 7))
    q, k, v = qkv(layout)
    pattern = BlockTopK(density=0.3, block=16)
    nothing = torch.zeros(2, 2, 7, 7, dtype=torch.bool)
    out_in, lse_in, out_ex, lse_ex = attention_partials(q, k, v, pattern, layout=layout, impl=impl, block_size=block,
                                                        selection=nothing)
    assert torch.isneginf(lse_in).all() and torch.equal(out_in, torch.zeros_like(out_in))
    dense, dense_lse = diffattn.attention(q, k, v, Dense(), layout=layout, impl="reference", return_lse=True)
    for merged, merged_lse in (merge_partials(out_in, lse_in, out_ex, lse_ex), merge_partials(out_ex, lse_ex, out_in, lse_in)):
        torch.testing.assert_close(merged, dense, atol=2e-6, rtol=2e-6)
        torch.testing.assert_close(merged_lse, dense_lse, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("grid, block", [((3, 5, 7), (32, 16)), ((3, 6, 9), (16, 16)), ((4, 5), (16, 32))])
@requires_interpreter
def test_external_walks_the_complement_of_the_layout(grid, block):
    """The kernels find the external key blocks by walking the complement of the pattern's own
    (ascending) block lists, the short last block included: the external partial attends
    exactly the keys outside the pattern, for windows (partial blocks inverted), radial and
    selected blocks whose lists skip the short last block or end with it."""
    layout = TokenLayout(grid, text_len=3)
    q, k, v = (torch.randn(1, layout.seq_len, 2, 16, dtype=torch.float64).float() for _ in range(3))
    for pattern in (SlidingWindow(3), Radial(0.3, block=32), BlockTopK(density=0.4, block=32)):
        if isinstance(pattern, Radial) and len(grid) == 2:
            continue
        want = external_attention(q, k, v, pattern, layout=layout, impl="reference",
                                  selection=None if pattern.static else diffattn.select_blocks(q, k, pattern, layout))
        sel = None if pattern.static else diffattn.select_blocks(q, k, pattern, layout)
        got = external_attention(q, k, v, pattern, layout=layout, impl="triton", block_size=block, selection=sel)
        torch.testing.assert_close(got[0], want[0], atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(got[1], want[1], atol=2e-5, rtol=2e-5)
        parts = attention_partials(q, k, v, pattern, layout=layout, impl="triton", block_size=block, selection=sel)
        torch.testing.assert_close(parts[2], want[0], atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(parts[3], want[1], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_external_has_no_text(impl):
    layout = TokenLayout((2, 4, 4), text_len=5)
    q, k, v = (torch.randn(1, layout.seq_len, 1, 16) for _ in range(3))
    out, lse = external_attention(q, k, v, SlidingWindow((1, 3, 3)), layout=layout, impl=impl,
                                  block_size=(16, 16) if impl == "triton" else None)
    assert torch.equal(out[:, :5], torch.zeros_like(out[:, :5])) and torch.isinf(lse[:, :5]).all()
    assert torch.isfinite(lse[:, 5:]).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaN * 0, discarded
@pytest.mark.parametrize("impl", IMPLS)
def test_merge_with_an_empty_partial_is_identity(impl):
    out = torch.randn(1, 4, 2, 8)
    lse = torch.randn(1, 4, 2)
    empty = torch.full_like(lse, float("-inf"))
    for garbage in (torch.zeros_like(out), torch.full_like(out, float("nan")), torch.full_like(out, float("inf"))):
        for merged, merged_lse in (merge_partials(out, lse, garbage, empty, impl=impl),
                                   merge_partials(garbage, empty, out, lse, impl=impl)):
            torch.testing.assert_close(merged, out)
            torch.testing.assert_close(merged_lse, lse)
    both_empty, l = merge_partials(torch.zeros_like(out), empty, torch.full_like(out, float("nan")), empty, impl=impl)
    assert torch.equal(both_empty, torch.zeros_like(out)) and torch.isneginf(l).all()
    half = torch.where(torch.arange(4)[None, :, None] < 2, lse, empty)  # rows 0-1 finite, rows 2-3 empty on one side
    merged, _ = merge_partials(out, half, out, empty, impl=impl)
    assert torch.equal(merged[:, :2], out[:, :2]) and torch.equal(merged[:, 2:], torch.zeros_like(out[:, 2:]))


@requires_interpreter
@pytest.mark.parametrize("dim, dtype", [(40, torch.float32), (64, torch.float16), (8, torch.float32)])
def test_merge_kernel_matches_torch(dim, dtype):
    gen = torch.Generator().manual_seed(0)
    out_1 = torch.randn(2, 37, 3, dim, generator=gen).to(dtype)
    out_2 = torch.randn(2, 3, 37, dim, generator=gen).to(dtype).transpose(1, 2)  # not contiguous
    lse_1, lse_2 = (torch.randn(2, 37, 3, generator=gen) * 4 for _ in range(2))
    lse_1[0, :5] = float("-inf")
    lse_2[1, 3:9] = float("-inf")
    lse_1[1, 4] = lse_2[1, 4] = float("-inf")  # empty on both sides
    got = merge_partials(out_1, lse_1, out_2, lse_2, impl="triton")
    want = merge_partials(out_1, lse_1, out_2, lse_2, impl="reference")
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0], atol=1e-3 if dtype == torch.float16 else 1e-6, rtol=1e-3)
    assert torch.equal(torch.isneginf(got[1]), torch.isneginf(want[1]))
    torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="must be"):
        merge_partials(out_1, lse_1[:, :-1], out_2, lse_2, impl="triton")


def test_piecewise_has_no_external_part():
    layout = TokenLayout((2, 4, 4))
    q = torch.randn(1, layout.seq_len, 1, 16)
    with pytest.raises(ValueError, match="no external part"):
        external_attention(q, q, q, Piecewise(0.5, block=16), layout=layout)
    for impl in ("reference", *(["triton"] if INTERPRET else [])):
        with pytest.raises(ValueError, match="no external part"):
            attention_partials(q, q, q, Piecewise(0.5, block=16), layout=layout, impl=impl)


@requires_interpreter
def test_partials_kernel_rejects_bad_input():
    from diffattn.kernels import block_sparse_partials

    q = torch.randn(1, 32, 1, 16)
    num, idx = torch.zeros(1, 1, 2, dtype=torch.int32), torch.zeros(1, 1, 2, 1, dtype=torch.int32)
    args = (num, idx, num, idx)
    with pytest.raises(ValueError, match="n_vis > 0"):
        block_sparse_partials(q, q, q, *args, [0, 0, 0, 32, 1, 1], [1] * 12, 0, 0.25, 16, 16)
    with pytest.raises(ValueError, match="part_idx must be int32"):
        block_sparse_partials(q, q, q, *args[:-1], idx.long(), [0, 32, 0, 0, 4, 8], [1] * 12, 0, 0.25, 16, 16)
    with pytest.raises(ValueError, match="text_lens"):
        attention_partials(q, q, q, SlidingWindow((3, 3)), layout=TokenLayout((4, 4), text_len=16), impl="triton",
                           text_lens=torch.tensor([17]))
