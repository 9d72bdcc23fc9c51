"""Property-based tests (hypothesis) of every static pattern against independent numpy oracles.

The oracles are written here from METHODS.md (sections 2 and 3) and, for Radial's block
conversion, from the rule documented in ``diffattn/patterns/radial.py`` (the original's
``gen_log_mask_shrinked``); none of them calls diffattn's mask or layout code:

- SlidingWindow (raster and tiled): per-axis window rule, keys attended iff inside on every axis;
- Radial: the element mask per frame pair, then the block rule by brute-force counting of the
  element mask's columns, piece by piece (a different computation from the library's O(1)
  interval formula and from tests/test_radial.py's line-by-line transcription).

Checked for random patterns, grids (odd sizes, single frames, axes of length 1), text (none,
first, last) and block sizes (16-128):

(a) ``mask_mod`` equals the oracle over the whole sequence (text dense both ways);
(b) block classes agree with the oracle mask: FULL = every pair attended, EMPTY = none,
    PARTIAL = some but not all (tiled windows: in tile-major order; Radial: kept blocks FULL);
(c) ``attended_fraction(layout)`` equals the oracle's fraction, exactly;
(d) small sizes: ``diffattn.attention(..., impl="reference")`` equals a float64 dense masked
    softmax with the oracle mask.

Invalid draws either raise ValueError naming the argument (checked) or are filtered out.
Deterministic (``derandomize=True``) and small: the whole file runs in well under a minute.
"""

import itertools
import re
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

import diffattn
from diffattn import Radial, SlidingWindow, TokenLayout, build_block_layout
from diffattn.patterns import EMPTY, FULL, PARTIAL
from diffattn.patterns.base import sequence_mask_mod
from diffattn.patterns.topk import selected_classes, selected_mask_mod


def fast(n):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


BLOCKS = st.sampled_from([16, 32, 64, 128])


# --- oracles ------------------------------------------------------------------------------


def window_axis_oracle(n, k, s=1, r=1):
    """``bool [n, n]`` (query coordinate, key coordinate) on one axis, METHODS section 2."""
    out = np.zeros((n, n), dtype=bool)
    if k is None:
        out[:] = True
        return out
    for i in range(n):
        g = i % r  # dilation group and the rule on its own coordinate and length
        members = list(range(g, n, r))
        length = len(members)
        gi = i // r
        leader = min((gi // s) * s + s // 2, length - 1)
        wl, wr = k // 2, k // 2 + (k % 2 - 1)
        centre = min(max(leader, wl), length - 1 - wr)
        for gk in range(centre - wl, centre + wr + 1):
            out[i, members[gk]] = True
    return out


def raster_coords(grid):
    g3 = tuple(grid) if len(grid) == 3 else (1, *grid)
    return g3, np.array(list(itertools.product(*[range(x) for x in g3]))).reshape(-1, 3)


def window_oracle(grid, window, stride, dilation):
    """``bool [N, N]`` over the visual tokens in raster order."""
    g3, coords = raster_coords(grid)
    pad = 3 - len(grid)
    mask = np.ones((len(coords), len(coords)), dtype=bool)
    for axis in range(3):
        if axis < pad:
            continue
        a = axis - pad
        m = window_axis_oracle(g3[axis], window[a], stride[a], dilation[a])
        mask &= m[coords[:, axis][:, None], coords[:, axis][None, :]]
    return mask


def tile_major(grid, tile):
    """Raster index of each tile-major position: tiles in raster order, raster order inside."""
    g3, coords = raster_coords(grid)
    t3 = tuple(tile) if len(tile) == 3 else (1, *tile)
    tiles = [g3[a] // t3[a] for a in range(3)]
    tile_index = ((coords[:, 0] // t3[0]) * tiles[1] + coords[:, 1] // t3[1]) * tiles[2] + coords[:, 2] // t3[2]
    inside = ((coords[:, 0] % t3[0]) * t3[1] + coords[:, 1] % t3[1]) * t3[2] + coords[:, 2] % t3[2]
    position = tile_index * (t3[0] * t3[1] * t3[2]) + inside
    order = np.empty(len(coords), dtype=np.int64)
    order[position] = np.arange(len(coords))
    return order


def radial_element_oracle(grid, decay, sink, block):
    """``bool [N, N]``: METHODS section 3 before the block conversion."""
    g3 = tuple(grid) if len(grid) == 3 else (1, *grid)
    f_n, s = g3[0], g3[1] * g3[2]
    pos = np.arange(s)
    band = np.abs(pos[:, None] - pos[None, :])
    mask = np.zeros((f_n * s, f_n * s), dtype=bool)
    for i in range(f_n):
        for j in range(f_n):
            d = abs(i - j)
            piece = mask[i * s : (i + 1) * s, j * s : (j + 1) * s]
            if d <= 1 or (sink and j == 0):
                piece[:] = True
                continue
            length = 2 ** s.bit_length() / 2 ** d.bit_length()
            if length < block and d % int(block / length):
                continue
            piece[:] = band <= max(block, length * decay)
    return mask


def radial_block_oracle(grid, decay, sink, block, guard=True):
    """``bool [NB, NB]``: the documented block rule by counting the element mask's columns.

    Each (block, frame pair) piece: the rows of frame i in query block I and the columns of frame
    j in key block J, where a frame only counts in its first ceil(s / B) blocks from the block it
    starts in. The piece is kept iff more than 60% of its columns with any kept row have more
    than B / 3 kept rows; a block is kept iff a piece is. Then: with a short last block, its row
    and column are kept; a query block with nothing kept keeps its diagonal block.
    """
    g3 = tuple(grid) if len(grid) == 3 else (1, *grid)
    f_n, s = g3[0], g3[1] * g3[2]
    n = f_n * s
    nb = -(-n // block)
    per_frame = -(-s // block)
    elem = radial_element_oracle(grid, decay, sink, block)
    frame_of = np.arange(n) // s
    counted = np.arange(n) // block - (frame_of * s) // block < per_frame  # inside its frame's blocks
    keep = np.zeros((nb, nb), dtype=bool)
    for qb in range(nb):
        rows = np.arange(qb * block, min(n, (qb + 1) * block))
        for kb in range(nb):
            cols = np.arange(kb * block, min(n, (kb + 1) * block))
            for i in np.unique(frame_of[rows]):
                r = rows[(frame_of[rows] == i) & counted[rows]]
                for j in np.unique(frame_of[cols]):
                    c = cols[(frame_of[cols] == j) & counted[cols]]
                    if len(r) == 0 or len(c) == 0:
                        continue
                    per_col = elem[np.ix_(r, c)].sum(0)
                    touched = int((per_col > 0).sum())
                    high = int((per_col > Fraction(block, 3)).sum())
                    if touched and Fraction(high, touched) > Fraction(3, 5):
                        keep[qb, kb] = True
    if n % block:
        keep[-1, :] = True
        keep[:, -1] = True
    for qb in range(nb):
        if guard and not keep[qb].any():
            keep[qb, qb] = True
    return keep


def sequence_oracle(visual, layout):
    """The visual oracle placed in the whole sequence; text attended densely both ways."""
    s, vs, nv = layout.seq_len, layout.visual_start, layout.num_visual
    full = np.ones((s, s), dtype=bool)
    full[vs : vs + nv, vs : vs + nv] = visual
    return full


def classes_oracle(mask, block_q, block_k):
    """EMPTY / PARTIAL / FULL of each block of ``mask`` (blocks at the end may be short)."""
    n = mask.shape[0]
    nq, nk = -(-n // block_q), -(-n // block_k)
    out = np.empty((nq, nk), dtype=np.int8)
    for i in range(nq):
        for j in range(nk):
            sub = mask[i * block_q : (i + 1) * block_q, j * block_k : (j + 1) * block_k]
            out[i, j] = FULL if sub.all() else EMPTY if not sub.any() else PARTIAL
    return out


# --- shared checks ---------------------------------------------------------------------------


def check_mask_mod(pattern, layout, visual):
    want = sequence_oracle(visual, layout)
    idx = torch.arange(layout.seq_len)
    got = pattern.mask_mod(layout)(idx[:, None], idx[None, :]).numpy()
    assert got.shape == want.shape
    bad = np.argwhere(got != want)
    assert len(bad) == 0, f"{len(bad)} pairs differ, first {bad[:5].tolist()}"
    return want


def check_fraction(pattern, layout, full_mask):
    want = Fraction(int(full_mask.sum()), full_mask.size)
    assert pattern.attended_fraction(layout) == float(want)
    n, t = layout.num_visual, layout.text_len
    assert pattern.visual_pairs(layout.grid) == int(full_mask.sum()) - 2 * n * t - t * t


def check_layout(pattern, grid, block_q, block_k, visual):
    """(b): the pattern's classes are exactly the oracle's; the cached BlockLayout lists them,
    with a short last key block that the pattern keeps marked partial (sequence bounds)."""
    classes = pattern.block_classes(grid, block_q, block_k).numpy()
    want = classes_oracle(visual, block_q, block_k)
    bad = np.argwhere(classes != want)
    assert len(bad) == 0, f"{len(bad)} blocks differ, first {bad[:5].tolist()}"
    layout = build_block_layout(pattern, grid, block_q, block_k).classes()[0, 0].numpy()
    n = visual.shape[0]
    if n % block_k:
        want[:, -1] = np.where(want[:, -1] == FULL, PARTIAL, want[:, -1])
    assert np.array_equal(layout, want)


def check_reference(pattern, layout, full_mask, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, layout.seq_len, 2, 8, generator=gen) for _ in range(3))
    out, lse = diffattn.attention(q, k, v, pattern, layout=layout, impl="reference", return_lse=True)
    qd, kd, vd = (x.double().transpose(1, 2) for x in (q, k, v))  # [B, H, S, D]
    scores = qd @ kd.transpose(-1, -2) * 8**-0.5
    scores = scores.masked_fill(~torch.from_numpy(full_mask), float("-inf"))
    want_lse = torch.logsumexp(scores, -1)
    want = (torch.softmax(scores, -1) @ vd).transpose(1, 2)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), want_lse.transpose(1, 2), atol=2e-5, rtol=2e-5)


# --- strategies ----------------------------------------------------------------------------


@st.composite
def text(draw):
    t = draw(st.sampled_from([0, 0, 1, 5, 13]))
    return t, draw(st.booleans())


@st.composite
def window_case(draw, max_tokens=700):
    ndim = draw(st.sampled_from([2, 3]))
    # axes of length 1 make 1- and 2-axis grids inside (H, W) / (F, H, W)
    grid = tuple(draw(st.integers(1, 9 if ndim == 3 else 17)) for _ in range(ndim))
    assume(int(np.prod(grid)) <= max_tokens)
    window, stride, dilation = [], [], []
    for n in grid:
        if draw(st.integers(0, 9)) == 0:  # now and then anything, valid or not
            window.append(draw(st.one_of(st.none(), st.integers(1, 8))))
            stride.append(draw(st.integers(1, 4)))
            dilation.append(draw(st.integers(1, 3)))
            continue
        k = draw(st.one_of(st.none(), st.integers(1, n)))  # even windows included
        window.append(k)
        stride.append(draw(st.integers(1, k if k else 3)))
        dilation.append(1 if k is None else draw(st.integers(1, max(1, min(3, n // k)))))
    window, stride, dilation = tuple(window), tuple(stride), tuple(dilation)
    scalar = draw(st.integers(0, 5)) == 0  # one int for every axis
    if scalar:
        window, stride, dilation = window[:1] * ndim, stride[:1] * ndim, dilation[:1] * ndim
    return grid, window, stride, dilation, scalar


def window_problems(grid, window, stride, dilation):
    """The argument names METHODS makes invalid: k * r > n, s > k, dilation without a window."""
    out = []
    for a, (n, k, s, r) in enumerate(zip(grid, window, stride, dilation)):
        if k is None:
            if r != 1:
                out.append(f"dilation[{a}]")
            continue
        if k * r > n:
            out.append(f"window[{a}]")
        if s > k:
            out.append(f"stride[{a}]")
    return out


def bucket(n):
    return next(f"<= {b}" for b in (50, 150, 300, 10**9) if n <= b)


def make_window(window, stride, dilation, scalar):
    if scalar:
        return SlidingWindow(window[0], stride=stride[0], dilation=dilation[0])
    return SlidingWindow(window, stride=stride, dilation=dilation)


# --- SlidingWindow ---------------------------------------------------------------------------


@fast(300)
@given(case=window_case(), txt=text(), block_q=BLOCKS, block_k=BLOCKS)
def test_sliding_window(case, txt, block_q, block_k):
    grid, window, stride, dilation, scalar = case
    problems = window_problems(grid, window, stride, dilation)
    event("invalid arguments" if problems else f"valid, {bucket(int(np.prod(grid)))} tokens")
    if problems:
        with pytest.raises(ValueError) as info:
            make_window(window, stride, dilation, scalar).validate(grid)
        named = re.findall(r"(window|stride|dilation)\[(\d)\]", str(info.value))
        assert any(f"{a}[{b}]" in problems for a, b in named), (problems, str(info.value))
        return
    pattern = make_window(window, stride, dilation, scalar)
    layout = TokenLayout(grid, text_len=txt[0], text_first=txt[1])
    visual = window_oracle(grid, window, stride, dilation)
    full = check_mask_mod(pattern, layout, visual)  # (a)
    check_layout(pattern, grid, block_q, block_k, visual)  # (b)
    event(f"partial blocks: {bool((pattern.block_classes(grid, block_q, block_k) == PARTIAL).any())}")
    check_fraction(pattern, layout, full)  # (c)
    if layout.seq_len <= 160:  # (d)
        event("reference checked")
        check_reference(pattern, layout, full, seed=layout.seq_len)


@st.composite
def tiled_case(draw):
    ndim = draw(st.sampled_from([2, 3]))
    tile = tuple(draw(st.sampled_from([1, 2, 4, 8] if ndim == 2 else [1, 2, 4])) for _ in range(ndim))
    assume(int(np.prod(tile)) % 16 == 0)
    counts = tuple(draw(st.integers(1, 4)) for _ in range(ndim))
    grid = tuple(t * m for t, m in zip(tile, counts))
    assume(int(np.prod(grid)) <= 600)
    window_tiles = tuple(draw(st.one_of(st.none(), st.sampled_from([1, 3]))) for _ in range(ndim))
    assume(all(w is None or w <= m for w, m in zip(window_tiles, counts)))
    return grid, tile, window_tiles


@fast(150)
@given(case=tiled_case(), txt=text(), block_q=BLOCKS, block_k=BLOCKS)
def test_tiled_window(case, txt, block_q, block_k):
    grid, tile, window_tiles = case
    event(f"{bucket(int(np.prod(grid)))} tokens")
    pattern = SlidingWindow.tiled(tile=tile, window_tiles=window_tiles)
    window = tuple(None if w is None else w * t for w, t in zip(window_tiles, tile))
    layout = TokenLayout(grid, text_len=txt[0], text_first=txt[1])
    visual = window_oracle(grid, window, tile, (1,) * len(grid))
    full = check_mask_mod(pattern, layout, visual)  # (a): the attended pairs, raster order
    order = tile_major(grid, tile)
    in_tiles = visual[np.ix_(order, order)]
    check_layout(pattern, grid, block_q, block_k, in_tiles)  # (b): classes in tile-major order
    volume = int(np.prod(tile))
    if volume % block_q == 0 and volume % block_k == 0:  # blocks inside tiles: all full or empty
        assert not (pattern.block_classes(grid, block_q, block_k) == PARTIAL).any()
    check_fraction(pattern, layout, full)  # (c)
    if layout.seq_len <= 160:  # (d)
        check_reference(pattern, layout, full, seed=layout.seq_len)


def test_one_axis_grid_is_refused():
    with pytest.raises(ValueError, match="grid"):
        TokenLayout((17,))
    with pytest.raises(ValueError, match=r"window=\(3, 3\) has 2 entries"):
        SlidingWindow((3, 3)).validate((2, 5, 5))


# --- Radial ------------------------------------------------------------------------------------


@st.composite
def radial_case(draw):
    ndim = draw(st.sampled_from([2, 3, 3, 3]))
    block = draw(st.sampled_from([16, 16, 16, 32, 32, 64, 128]))  # small blocks: sparse layouts
    if ndim == 2:
        grid = (draw(st.integers(1, 23)), draw(st.integers(1, 23)))
    else:
        grid = (draw(st.integers(1, 24)), draw(st.integers(1, 9)), draw(st.integers(1, 13)))
    assume(int(np.prod(grid)) <= 900)
    decay = draw(st.sampled_from([0.05, 0.2, 0.5, 0.95, 1.0, 2.5]))
    sink = draw(st.booleans())
    block_q = draw(st.sampled_from([b for b in (16, 32, 64, 128) if b <= block]))
    block_k = draw(st.sampled_from([b for b in (16, 32, 64, 128) if b <= block]))
    return grid, decay, sink, block, block_q, block_k


@fast(300)
@given(case=radial_case(), txt=text())
def test_radial(case, txt):
    grid, decay, sink, block, block_q, block_k = case
    pattern = Radial(decay, sink=sink, block=block)
    layout = TokenLayout(grid, text_len=txt[0], text_first=txt[1])
    elem = radial_element_oracle(grid, decay, sink, block)
    idx = torch.arange(elem.shape[0])
    assert np.array_equal(pattern.element_mask_mod(grid)(idx[:, None], idx[None, :]).numpy(), elem)
    keep = radial_block_oracle(grid, decay, sink, block)
    assert np.array_equal(pattern.block_keep(grid).numpy(), keep)
    n = elem.shape[0]
    frames, s = (grid[0], grid[1] * grid[2]) if len(grid) == 3 else (1, grid[0] * grid[1])
    event(f"{bucket(n)} tokens, {'straddling' if frames > 1 and s % block else 'aligned or one frame'}"
          f"{', short last block' if n % block else ''}")
    event("some blocks skipped" if not keep.all() else "all kept")
    lonely = ~radial_block_oracle(grid, decay, sink, block, guard=False).any(1)
    if lonely.any():
        event("a query block kept only by the diagonal guard")
    visual = np.kron(keep, np.ones((block, block), dtype=bool))[:n, :n]  # kept blocks, computed whole
    full = check_mask_mod(pattern, layout, visual)  # (a)
    check_layout(pattern, grid, block_q, block_k, visual)  # (b): kept -> FULL, else EMPTY
    assert not (pattern.block_classes(grid, block_q, block_k) == PARTIAL).any()
    check_fraction(pattern, layout, full)  # (c)
    if layout.seq_len <= 200:  # (d)
        event("reference checked")
        check_reference(pattern, layout, full, seed=layout.seq_len)


@fast(40)
@given(decay=st.one_of(st.floats(-2, 0), st.sampled_from([True, "0.2"])), block=st.sampled_from([8, 48, 100, True]))
def test_radial_invalid_arguments_name_themselves(decay, block):
    with pytest.raises(ValueError, match="decay"):
        Radial(decay)
    with pytest.raises(ValueError, match="block"):
        Radial(0.2, block=block)


# --- BlockTopK's kernel classes at the visual / text boundary -------------------------------------


@fast(80)
@given(n=st.integers(1, 300), block=st.sampled_from([16, 32, 64, 128]), data=st.data(), txt=text())
def test_selected_blocks_classes(n, block, data, txt):
    """A selection's kernel classes (kept -> FULL) agree with its element mask; the blocks count
    from the first visual token and the short last block stays inside the visual tokens."""
    block_q = data.draw(st.sampled_from([b for b in (16, 32, 64, 128) if b <= block]))
    block_k = data.draw(st.sampled_from([b for b in (16, 32, 64, 128) if b <= block]))
    nb = -(-n // block)
    keep = torch.from_numpy(np.array(data.draw(st.lists(st.booleans(), min_size=nb * nb, max_size=nb * nb)))
                            ).reshape(1, 1, nb, nb)
    idx = torch.arange(n)
    visual = selected_mask_mod(keep, block)(idx[:, None], idx[None, :])[0, 0].numpy()
    classes = selected_classes(keep, block, block_q, block_k, n)[0, 0].numpy()
    assert np.array_equal(classes, classes_oracle(visual, block_q, block_k))
    layout = diffattn.BlockLayout.from_classes(selected_classes(keep, block, block_q, block_k, n), block_q, block_k, n)
    want = classes_oracle(visual, block_q, block_k)
    if n % block_k:
        want[:, -1] = np.where(want[:, -1] == FULL, PARTIAL, want[:, -1])
    assert np.array_equal(layout.classes()[0, 0].numpy(), want)
    # in a sequence with text the same selection applies to the visual tokens only
    tl = TokenLayout((1, n), text_len=txt[0], text_first=txt[1])
    full = sequence_mask_mod(selected_mask_mod(keep, block), tl)
    s = torch.arange(tl.seq_len)
    got = full(s[:, None], s[None, :])[0, 0].numpy()
    assert np.array_equal(got, sequence_oracle(visual, tl))
