"""Radial attention against a brute-force reading of METHODS.md section 3.

The oracle materialises the element mask frame pair by frame pair, then converts it to
blocks of B tokens by the literal rule: a block (I, J) is kept iff, among the key columns of
J that have any kept entry in the rows of I, more than 60% have more than 1/3 of I's actual
rows kept (blocks counted from the first visual token; the last ones may be short).
"""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import diffattn
from diffattn import Radial, TokenLayout, build_block_layout
from diffattn.patterns import EMPTY, FULL


def grid3(grid):
    return tuple(grid) if len(grid) == 3 else (1, *grid)


def oracle_element_mask(grid, decay, sink, block):
    """``bool [N, N]`` over visual tokens, straight from METHODS section 3."""
    f_n, h_n, w_n = grid3(grid)
    s = h_n * w_n
    n = f_n * s
    pos = np.arange(s)
    band = np.abs(pos[:, None] - pos[None, :])  # |r - c| within a frame pair
    mask = np.zeros((n, n), dtype=bool)
    for i in range(f_n):
        for j in range(f_n):
            d = abs(i - j)
            rows, cols = slice(i * s, (i + 1) * s), slice(j * s, (j + 1) * s)
            if d <= 1 or (sink and j == 0):
                mask[rows, cols] = True
                continue
            g = d.bit_length()
            assert g == math.floor(math.log2(d)) + 1
            length = 2 ** s.bit_length() / 2**g
            if length < block and d % int(block / length) != 0:
                continue  # frequency reduction drops the pair
            width = max(block, length * decay)
            mask[rows, cols] = band <= width
    return mask


def oracle_block_keep(mask, block):
    """The literal 60% / one-third rule, with exact fractions."""
    n = mask.shape[0]
    nb = -(-n // block)
    keep = np.zeros((nb, nb), dtype=bool)
    for qb in range(nb):
        rows = mask[qb * block : (qb + 1) * block]
        n_rows = rows.shape[0]  # the actual rows: the last block may be short
        for kb in range(nb):
            col_counts = rows[:, kb * block : (kb + 1) * block].sum(0)
            touched = int((col_counts > 0).sum())
            if touched == 0:
                continue
            dense = int((Fraction(1, 3) * n_rows < col_counts).sum())
            keep[qb, kb] = Fraction(dense, touched) > Fraction(3, 5)
    return keep


CASES = [
    # grid, decay, sink, B
    ((41, 2, 4), 0.2, True, 16),  # s = 8 < B, 328 tokens, frequency reduction everywhere
    ((41, 2, 4), 0.2, False, 16),
    ((40, 2, 4), 1.0, True, 32),  # 320 tokens: a multiple of B, for contrast
    ((41, 2, 4), 3.0, False, 32),
    ((11, 6, 10), 0.2, True, 16),  # s = 60 > B, 660 tokens
    ((11, 6, 10), 1.0, False, 16),
    ((11, 6, 10), 2.5, True, 32),
    ((20, 10, 10), 0.2, True, 16),  # s = 100: every regime of l vs B, 2000 tokens
    ((20, 10, 10), 0.95, False, 16),
    ((20, 10, 10), 3.0, True, 64),
    ((9, 5, 7), 0.5, True, 16),  # s = 35, 315 tokens
    ((7, 3, 3), 1.0, False, 16),  # s = 9, 63 tokens
    ((13, 4, 5), 0.3, False, 128),  # everything within one short block
    ((13, 11), 0.2, True, 16),  # image: one frame
    ((2, 5, 5), 0.2, False, 16),  # two frames: d <= 1 only
    ((1, 7, 9), 0.2, False, 32),
]


def _ids(case):
    grid, decay, sink, b = case
    return f"g{'x'.join(map(str, grid))}-decay{decay}-sink{int(sink)}-B{b}"


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_element_mask_matches_methods(case):
    grid, decay, sink, b = case
    pattern = Radial(decay, sink=sink, block=b)
    want = oracle_element_mask(grid, decay, sink, b)
    n = want.shape[0]
    idx = torch.arange(n)
    got = pattern.element_mask_mod(grid)(idx[:, None], idx[None, :]).numpy()
    assert got.shape == want.shape
    diff = np.argwhere(got != want)
    assert len(diff) == 0, f"{len(diff)} element pairs differ, first {diff[:5].tolist()}"


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_block_keep_matches_literal_rule(case):
    grid, decay, sink, b = case
    pattern = Radial(decay, sink=sink, block=b)
    want = oracle_block_keep(oracle_element_mask(grid, decay, sink, b), b)
    got = pattern.block_keep(grid)
    assert got.dtype == torch.bool
    assert got.shape == want.shape == (-(-math.prod(grid) // b),) * 2
    diff = np.argwhere(got.numpy() != want)
    assert len(diff) == 0, f"{len(diff)} blocks differ, first {diff[:5].tolist()}"

    # the visual mask is the kept blocks, computed fully
    n = math.prod(grid)
    idx = torch.arange(n)
    vis = pattern.visual_mask_mod(grid)(idx[:, None], idx[None, :]).numpy()
    assert np.array_equal(vis, np.kron(want, np.ones((b, b), dtype=bool))[:n, :n])
    assert pattern.visual_pairs(grid) == int(vis.sum())


def test_cases_exercise_every_regime():
    """The cases above do include dropped pairs, banded pairs and the sink (guards the oracle)."""
    dropped = banded = 0
    for grid, decay, sink, b in CASES:
        m = oracle_element_mask(grid, decay, sink, b)
        f_n, h_n, w_n = grid3(grid)
        s = h_n * w_n
        per_pair = m.reshape(f_n, s, f_n, s).sum((1, 3))
        dropped += int((per_pair == 0).sum())
        banded += int(((per_pair > 0) & (per_pair < s * s)).sum())
    assert dropped > 100 and banded > 100


def test_sink_attends_first_frame():
    grid = (12, 4, 8)
    with_sink = Radial(0.2, sink=True, block=16).element_mask_mod(grid)
    without = Radial(0.2, sink=False, block=16).element_mask_mod(grid)
    n = math.prod(grid)
    idx = torch.arange(n)
    a = with_sink(idx[:, None], idx[None, :])
    b = without(idx[:, None], idx[None, :])
    assert a[:, :32].all()  # first frame (32 tokens) seen by every query
    assert not b[:, :32].all()
    assert torch.equal(a[:, 32:], b[:, 32:])


@pytest.mark.parametrize(
    "grid, want",
    [((18, 48, 80), 0.287), ((21, 30, 52), 0.339)],  # Wan 768x1280x69f and 480x832x81f
)
def test_density_at_paper_shapes(grid, want):
    density = Radial(0.2).attended_fraction(TokenLayout(grid))
    assert abs(density - want) < 0.005, density


def test_default_is_the_original():
    p = Radial(0.2)
    assert p.sink is True and p.block == 128
    assert p == diffattn.parse_pattern("radial:0.2")


def test_large_layout_builds():
    grid = (21, 45, 80)  # 75600 tokens: not a multiple of 128
    layout = build_block_layout(Radial(0.2), grid, 128, 64)
    n = math.prod(grid)
    assert layout.num_tokens == n
    assert layout.num_q_blocks == -(-n // 128) and layout.num_k_blocks == -(-n // 64)
    classes = layout.classes()[0, 0]
    # the diagonal is always computed; the last (short) key block is partial when visited
    nq = layout.num_q_blocks
    assert (classes[torch.arange(nq), torch.arange(nq) * 2] != EMPTY).all()
    assert (classes[:, -1] != FULL).all()
    assert 0.1 < layout.block_density < 0.5


@pytest.mark.parametrize("block_q, block_k", [(16, 16), (32, 16), (64, 32), (128, 64)])
def test_block_classes_upsample_keep(block_q, block_k):
    grid = (9, 5, 7)
    pattern = Radial(0.5, block=128)
    keep = pattern.block_keep(grid)
    classes = pattern.block_classes(grid, block_q, block_k)
    n = math.prod(grid)
    rows = torch.arange(-(-n // block_q)) * block_q // 128
    cols = torch.arange(-(-n // block_k)) * block_k // 128
    want = torch.where(keep[rows][:, cols], FULL, EMPTY).to(torch.int8)
    assert torch.equal(classes, want)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(decay=0), ValueError, "decay"),
        (dict(decay=-0.5), ValueError, "decay"),
        (dict(decay=True), ValueError, "decay"),
        (dict(decay="0.2"), ValueError, "decay"),
        (dict(decay=0.2, sink=1), TypeError, "sink"),
        (dict(decay=0.2, block=100), ValueError, "block"),
        (dict(decay=0.2, block=8), ValueError, "block"),
        (dict(decay=0.2, block=True), ValueError, "block"),
    ],
)
def test_invalid_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        Radial(**kwargs)


def test_kernel_block_must_divide_radial_block():
    with pytest.raises(ValueError, match="block_k"):
        build_block_layout(Radial(0.2, block=16), (4, 8, 8), 16, 32)
    with pytest.raises(ValueError, match="block_q"):
        build_block_layout(Radial(0.2, block=32), (4, 8, 8), 64, 16)
