"""SlidingWindow semantics against an independent, literal reading of METHODS.md section 2.

The oracle below is plain Python on ints, written from the text of METHODS.md (not from
diffattn's code):

- per axis of length n with window k, stride s, dilation r: coordinates with the same
  value mod r form a dilation group; the rule runs on the group coordinate ``coord // r``
  and the group's own length;
- stride groups share the window of their leader ``L = min((i // s) * s + s // 2, n - 1)``;
- centre ``c = clamp(L, wl, n - 1 - wr)`` with ``wl = k // 2``, ``wr = k // 2 + (k % 2 - 1)``;
  the window is ``[c - wl, c + wr]``;
- a key is attended iff it is in the query's dilation group and window on every axis.
"""

import itertools
import math

import pytest
import torch

import diffattn
from diffattn import SlidingWindow, TokenLayout
from diffattn.patterns import AxisWindow


# --- the oracle -------------------------------------------------------------------


def oracle_axis(n, k, s, r, qi, ki):
    """Whether coordinate ``qi`` attends ``ki`` on an axis of length ``n`` (k None: whole axis)."""
    if k is None:
        return True
    if qi % r != ki % r:  # different dilation groups
        return False
    group_len = len(range(qi % r, n, r))
    gq, gk = qi // r, ki // r
    leader = min((gq // s) * s + s // 2, group_len - 1)
    wl = k // 2
    wr = k // 2 + (k % 2 - 1)
    centre = max(wl, min(leader, group_len - 1 - wr))
    return centre - wl <= gk <= centre + wr


def oracle_axis_matrix(n, k, s, r):
    return [[oracle_axis(n, k, s, r, qi, ki) for ki in range(n)] for qi in range(n)]


def per_axis(value, ndim):
    return tuple(value) if isinstance(value, tuple) else (value,) * ndim


def oracle_mask(grid, window, stride=1, dilation=1):
    """``bool [N, N]`` from the per-axis rule, tokens in raster order."""
    ndim = len(grid)
    ks, ss, rs = per_axis(window, ndim), per_axis(stride, ndim), per_axis(dilation, ndim)
    mats = [oracle_axis_matrix(n, k, s, r) for n, k, s, r in zip(grid, ks, ss, rs)]
    coords = list(itertools.product(*[range(n) for n in grid]))  # raster order
    out = torch.zeros(len(coords), len(coords), dtype=torch.bool)
    for qi, qc in enumerate(coords):
        for ki, kc in enumerate(coords):
            out[qi, ki] = all(m[a][b] for m, a, b in zip(mats, qc, kc))
    return out


def library_mask(pattern, grid):
    n = math.prod(grid)
    idx = torch.arange(n)
    return pattern.visual_mask_mod(grid)(idx[:, None], idx[None, :])


def window_volume(grid, window):
    ks = per_axis(window, len(grid))
    return math.prod(n if k is None else k for n, k in zip(grid, ks))


# --- per-axis rule -------------------------------------------------------------------


def test_oracle_examples_from_methods():
    # odd window 3 on 6: shifted inward at the borders, never truncated
    assert [i for i in range(6) if oracle_axis(6, 3, 1, 1, 0, i)] == [0, 1, 2]
    assert [i for i in range(6) if oracle_axis(6, 3, 1, 1, 3, i)] == [2, 3, 4]
    assert [i for i in range(6) if oracle_axis(6, 3, 1, 1, 5, i)] == [3, 4, 5]
    # even window 2m = 4: m keys left, the query, m - 1 right
    assert [i for i in range(8) if oracle_axis(8, 4, 1, 1, 4, i)] == [2, 3, 4, 5]
    # stride 3: queries 3, 4, 5 share the window of leader 4
    for q in (3, 4, 5):
        assert [i for i in range(9) if oracle_axis(9, 3, 3, 1, q, i)] == [3, 4, 5]
    # dilation 2 on 7: groups {0, 2, 4, 6} and {1, 3, 5}
    assert [i for i in range(7) if oracle_axis(7, 3, 1, 2, 6, i)] == [2, 4, 6]
    assert [i for i in range(7) if oracle_axis(7, 3, 1, 2, 1, i)] == [1, 3, 5]


def all_axis_cases(max_n=13):
    """Every valid (n, k, s, r) with n <= max_n: k * r <= n, 1 <= s <= k."""
    for n in range(1, max_n + 1):
        for k in range(1, n + 1):
            for r in range(1, n // k + 1):
                for s in range(1, k + 1):
                    yield n, k, s, r


def test_axis_matrix_matches_oracle_exhaustively():
    bad = []
    count = 0
    for n, k, s, r in all_axis_cases():
        count += 1
        got = AxisWindow(n, k, s, r).matrix().tolist()
        if got != oracle_axis_matrix(n, k, s, r):
            bad.append((n, k, s, r))
    assert count > 500
    assert not bad, f"AxisWindow.matrix() differs from METHODS section 2 for (n, k, s, r) in {bad[:10]}"


def test_axis_window_keeps_full_size_at_borders():
    for n, k, s, r in all_axis_cases():
        m = AxisWindow(n, k, s, r).matrix()
        assert (m.sum(1) == k).all(), (n, k, s, r)
        assert m.diagonal().all() or s > 1, (n, k, s, r)  # with stride 1 a query sees itself


# --- whole grids -------------------------------------------------------------------

GRID_CASES = [
    # grid, window, stride, dilation
    ((4, 6, 7), 3, 1, 1),
    ((4, 6, 7), (2, 4, 4), 1, 1),  # even windows
    ((3, 5, 6), (3, 4, 5), 1, 1),
    ((5, 9, 8), (3, 5, 4), (1, 2, 3), 1),  # stride
    ((5, 9, 8), (2, 3, 3), 1, (2, 3, 2)),  # dilation
    ((5, 9, 8), (2, 4, 3), (2, 3, 1), (2, 2, 2)),  # stride and dilation
    ((5, 9, 8), (None, 3, 4), (1, 3, 2), 1),  # whole F axis (FreeSwim)
    ((4, 7, 6), (2, None, 3), 1, (1, 1, 2)),  # whole H axis
    ((1, 9, 11), (1, 5, 6), 1, 1),  # one frame
    ((1, 9, 11), (1, 4, 5), (1, 2, 5), 1),
    ((3, 6, 5), (3, 6, 5), 1, 1),  # window == axis length: dense
    ((6, 8, 8), (3, 4, 4), (3, 4, 4), 1),  # stride == window (tile aligned)
    ((9, 11), (5, 6), 1, 1),  # 2-D
    ((9, 11), (4, 4), 2, 2),
    ((9, 11), (None, 3), 1, 1),
    ((7, 10), (3, 3), (2, 3), (2, 3)),
    ((12, 13), (12, 1), (5, 1), 1),
    ((13, 9), 2, 1, (6, 4)),
]


def _ids(case):
    grid, window, stride, dilation = case
    return f"g{grid}-k{window}-s{stride}-r{dilation}".replace(" ", "")


@pytest.mark.parametrize("case", GRID_CASES, ids=_ids)
def test_visual_mask_mod_matches_oracle(case):
    grid, window, stride, dilation = case
    pattern = SlidingWindow(window, stride=stride, dilation=dilation)
    got = library_mask(pattern, grid)
    want = oracle_mask(grid, window, stride, dilation)
    assert got.dtype == torch.bool
    mismatch = (got != want).nonzero()
    assert len(mismatch) == 0, f"{len(mismatch)} (query, key) pairs differ, first: {mismatch[:5].tolist()}"
    # every query attends exactly prod(k) keys: the window keeps its size at borders
    assert (got.sum(1) == window_volume(grid, window)).all()
    assert pattern.visual_pairs(grid) == int(want.sum())


@pytest.mark.parametrize("case", GRID_CASES[:6] + GRID_CASES[12:14], ids=_ids)
def test_mask_mod_with_text(case):
    grid, window, stride, dilation = case
    pattern = SlidingWindow(window, stride=stride, dilation=dilation)
    n = math.prod(grid)
    want_visual = oracle_mask(grid, window, stride, dilation)
    for text_first in (True, False):
        layout = TokenLayout(grid, text_len=5, text_first=text_first)
        s = layout.seq_len
        idx = torch.arange(s)
        got = pattern.mask_mod(layout)(idx[:, None], idx[None, :])
        vis = slice(5, 5 + n) if text_first else slice(0, n)
        text = slice(0, 5) if text_first else slice(n, n + 5)
        assert torch.equal(got[vis, vis], want_visual)
        assert got[text, :].all() and got[:, text].all()


def test_window_none_everywhere_is_dense():
    grid = (3, 4, 5)
    assert library_mask(SlidingWindow(None), grid).all()
    assert SlidingWindow(None).attended_fraction(TokenLayout(grid)) == 1.0


def test_int_window_applies_to_every_axis():
    grid = (5, 7, 6)
    assert torch.equal(library_mask(SlidingWindow(3), grid), library_mask(SlidingWindow((3, 3, 3)), grid))
    assert torch.equal(
        library_mask(SlidingWindow(3, stride=2, dilation=1), grid),
        library_mask(SlidingWindow((3, 3, 3), stride=(2, 2, 2), dilation=(1, 1, 1)), grid),
    )


def test_density_matches_docstring_and_oracle():
    layout = TokenLayout((8, 16, 16))
    p = SlidingWindow((3, 5, 5))
    assert p.attended_fraction(layout) == pytest.approx(3 * 25 / (8 * 16 * 16))


@pytest.mark.parametrize("case", GRID_CASES, ids=_ids)
def test_matches_natten_flex_mask(case, monkeypatch):
    """Optional cross-check against NATTEN's own mask_mod (its Flex backend's definition)."""
    flex = pytest.importorskip("natten.backends.flex")
    grid, window, stride, dilation = case
    ndim = len(grid)
    ks = tuple(n if k is None else k for n, k in zip(grid, per_axis(window, ndim)))
    ss = tuple(1 if k is None else s for k, s in zip(per_axis(window, ndim), per_axis(stride, ndim)))
    rs = per_axis(dilation, ndim)
    # get_na_flex_mask ends in create_block_mask(mask_mod, ...): capture the mask_mod itself.
    monkeypatch.setattr(flex, "create_block_mask", lambda mask_mod, **kwargs: mask_mod)
    try:
        mask_mod = flex.get_na_flex_mask("cpu", ndim, grid, ks, ss, rs, (False,) * ndim)
    except Exception as exc:  # pragma: no cover - depends on the NATTEN version
        pytest.skip(f"NATTEN's flex mask is not usable here: {exc}")
    n = math.prod(grid)
    idx = torch.arange(n)
    want = mask_mod(0, 0, idx[:, None], idx[None, :])
    got = library_mask(SlidingWindow(window, stride=stride, dilation=dilation), grid)
    assert torch.equal(got, want.expand(n, n))


# --- invalid arguments ---------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, grid, match",
    [
        (dict(window=(3, 9, 9)), (2, 8, 8), r"window\[0\]"),  # window larger than its axis
        (dict(window=(2, 9, 5)), (2, 8, 8), r"window\[1\]"),
        (dict(window=9), (8, 8), r"window\[0\]"),
        (dict(window=3, stride=4), (8, 8), r"stride\[0\]"),  # stride > window
        (dict(window=(3, 3), stride=(1, 4)), (8, 8), r"stride\[1\]"),
        (dict(window=3, dilation=3), (8, 8), r"dilation"),  # window * dilation > axis
        (dict(window=(1, 3), dilation=(1, 3)), (8, 8), r"window\[1\]=3 with dilation 3"),
        (dict(window=(3, 3, 3)), (8, 8), r"window"),  # tuple length != grid ndim
        (dict(window=(3, 3)), (4, 8, 8), r"window"),
        (dict(window=3, stride=(1, 1, 1)), (8, 8), r"stride"),
        (dict(window=3, dilation=(1, 1)), (4, 8, 8), r"dilation"),
        (dict(window=(None, 3), dilation=(2, 1)), (8, 8), r"dilation\[0\]"),  # dilation with None window
    ],
)
def test_validate_rejects(kwargs, grid, match):
    pattern = SlidingWindow(**kwargs)
    with pytest.raises(ValueError, match=match):
        pattern.validate(grid)
    with pytest.raises(ValueError, match=match):
        pattern.visual_mask_mod(grid)
    with pytest.raises(ValueError, match=match):
        pattern.attended_fraction(TokenLayout(grid))
    with pytest.raises(ValueError, match=match):
        diffattn.build_block_layout(pattern, grid, 16, 16)


def test_attention_rejects_window_larger_than_axis():
    layout = TokenLayout((2, 8, 8))
    q = torch.randn(1, layout.seq_len, 1, 16)
    with pytest.raises(ValueError, match=r"window\[0\]=3"):
        diffattn.attention(q, q, q, SlidingWindow((3, 3, 3)), layout=layout, impl="reference")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(window=0), r"window\[0\]"),
        (dict(window=-3), r"window\[0\]"),
        (dict(window=(3, 0, 3)), r"window\[1\]"),
        (dict(window=3, stride=0), r"stride\[0\]"),
        (dict(window=3, stride=(1, -1)), r"stride\[1\]"),
        (dict(window=3, dilation=0), r"dilation\[0\]"),
        (dict(window=3, dilation=None), r"dilation\[0\]"),
        (dict(window=3, stride=None), r"stride\[0\]"),
        (dict(window=True), r"window\[0\]"),  # bools are not sizes
        (dict(window=(3, False)), r"window\[1\]"),
        (dict(window=3, stride=True), r"stride\[0\]"),
        (dict(window=3, dilation=(1, True)), r"dilation\[1\]"),
        (dict(window=2.5), r"window\[0\]"),
        (dict(window="3"), r"window"),
        (dict(window=()), r"window"),
        (dict(window=(1, 2, 3, 4)), r"window"),
        (dict(window=(3, 3), stride=(1, 1, 1)), r"window.*stride|stride.*window"),
    ],
)
def test_constructor_rejects(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SlidingWindow(**kwargs)


def test_is_hashable_and_equal():
    a = SlidingWindow((3, 5, 5), stride=(1, 2, 2))
    b = SlidingWindow([3, 5, 5], stride=[1, 2, 2])
    assert a == b and hash(a) == hash(b)
    assert SlidingWindow(3) != SlidingWindow(5)
