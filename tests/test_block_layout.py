"""BlockLayout against brute force from each pattern's element mask.

Rule checked: a (query block, key block) pair is FULL iff all its (q, k) pairs are attended
and it is not the short last key block (the kernel must mask keys past the end there, so a
non-empty short last key block is always PARTIAL); EMPTY iff none is attended; else PARTIAL.
"""

import math

import pytest
import torch

from diffattn import BlockLayout, Dense, Radial, SlidingWindow, TokenLayout, build_block_layout
from diffattn.patterns import EMPTY, FULL, PARTIAL


def full_visual_mask(pattern, grid):
    n = math.prod(grid)
    idx = torch.arange(n)
    return pattern.visual_mask_mod(grid)(idx[:, None], idx[None, :]).expand(n, n)


def brute_classes(mask, block_q, block_k):
    n = mask.shape[0]
    nq, nk = -(-n // block_q), -(-n // block_k)
    out = torch.empty(nq, nk, dtype=torch.int8)
    for i in range(nq):
        for j in range(nk):
            sub = mask[i * block_q : (i + 1) * block_q, j * block_k : (j + 1) * block_k]
            short_last = j == nk - 1 and n % block_k != 0
            if not sub.any():
                out[i, j] = EMPTY
            elif sub.all() and not short_last:
                out[i, j] = FULL
            else:
                out[i, j] = PARTIAL
    return out


def brute_visited(mask, block_q, block_k):
    classes = brute_classes(mask, block_q, block_k)
    n = mask.shape[0]
    rows = torch.tensor([min(block_q, n - i * block_q) for i in range(classes.shape[0])])
    cols = torch.tensor([min(block_k, n - j * block_k) for j in range(classes.shape[1])])
    return int((rows[:, None] * (classes != EMPTY) * cols[None, :]).sum())


PATTERN_CASES = [
    (SlidingWindow((3, 5, 5)), (4, 12, 13)),  # 624 tokens
    (SlidingWindow((2, 4, 6), stride=(1, 2, 3)), (3, 11, 14)),  # 462
    (SlidingWindow((2, 3, 3), dilation=(1, 2, 3)), (3, 9, 12)),  # 324
    (SlidingWindow((None, 4, 4), stride=(1, 4, 4)), (3, 8, 16)),  # 384 tokens: tile aligned
    (SlidingWindow((1, 7, 6)), (1, 17, 19)),  # one frame, 323
    (SlidingWindow((9, 6)), (21, 23)),  # 2-D, 483
    (SlidingWindow((5, None)), (20, 16)),  # 320: full rows
    (SlidingWindow((3, 4, 4)), (3, 4, 4)),  # window == grid: everything attended, 48 tokens
    (Dense(), (3, 7, 9)),  # 189
    (Radial(0.2), (6, 9, 11)),  # 594
    (Radial(0.95, sink=False), (9, 6, 10)),  # 540
    (Radial(0.3, block=16), (20, 2, 4)),  # 160
]

BLOCKS = [(16, 16), (32, 16), (64, 32), (128, 64)]


PIDS = [f"{i}-{type(p).__name__}-{'x'.join(map(str, g))}" for i, (p, g) in enumerate(PATTERN_CASES)]


@pytest.mark.parametrize("block_q, block_k", BLOCKS, ids=lambda b: str(b))
@pytest.mark.parametrize("case", PATTERN_CASES, ids=PIDS)
def test_classes_match_brute_force(case, block_q, block_k):
    pattern, grid = case
    if isinstance(pattern, Radial) and (pattern.block % block_q or pattern.block % block_k):
        pytest.skip("kernel blocks must divide Radial.block")
    mask = full_visual_mask(pattern, grid)
    n = mask.shape[0]
    layout = build_block_layout(pattern, grid, block_q, block_k)
    assert (layout.block_q, layout.block_k, layout.num_tokens) == (block_q, block_k, n)
    assert layout.num_q_blocks == -(-n // block_q) and layout.num_k_blocks == -(-n // block_k)

    want = brute_classes(mask, block_q, block_k)
    got = layout.classes()
    assert got.shape == (1, 1, *want.shape)
    bad = (got[0, 0] != want).nonzero()
    assert len(bad) == 0, f"{len(bad)} blocks differ, first {bad[:5].tolist()}: got {got[0, 0][tuple(bad[0])]} want {want[tuple(bad[0])]}"

    # the index lists: counts, ascending indices, the right class
    for num, idx, cls in ((layout.full_num, layout.full_idx, FULL), (layout.part_num, layout.part_idx, PARTIAL)):
        assert num.dtype == torch.int32 and idx.dtype == torch.int32
        assert num.shape == (1, 1, layout.num_q_blocks)
        assert idx.shape[:3] == (1, 1, layout.num_q_blocks) and idx.shape[3] >= 1
        for i in range(layout.num_q_blocks):
            listed = idx[0, 0, i, : num[0, 0, i]].tolist()
            assert listed == sorted(listed)
            assert listed == (want[i] == cls).nonzero().flatten().tolist()

    visited = brute_visited(mask, block_q, block_k)
    assert layout.visited_tokens().tolist() == [[visited]]
    assert layout.block_density == pytest.approx(visited / n**2, rel=1e-12)
    # the computed blocks cover every attended pair
    assert layout.block_density >= float(mask.double().mean()) - 1e-12


@pytest.mark.parametrize("case", PATTERN_CASES, ids=PIDS)
@pytest.mark.parametrize("text_len, text_first", [(0, True), (7, True), (19, False)])
def test_density_matches_brute_force(case, text_len, text_first):
    pattern, grid = case
    layout = TokenLayout(grid, text_len=text_len, text_first=text_first)
    s = layout.seq_len
    idx = torch.arange(s)
    mask = pattern.mask_mod(layout)(idx[:, None], idx[None, :]).expand(s, s)
    # text is dense in both directions
    text = torch.zeros(s, dtype=torch.bool)
    text[layout.text_start : layout.text_start + text_len] = True
    assert mask[text].all() and mask[:, text].all()
    assert pattern.attended_fraction(layout) == pytest.approx(int(mask.sum()) / s**2, rel=1e-12, abs=0)


def test_short_last_key_block_is_partial_even_when_dense():
    layout = build_block_layout(Dense(), (5, 7), 16, 16)  # 35 tokens: key blocks 16, 16, 3
    classes = layout.classes()[0, 0]
    assert (classes[:, :2] == FULL).all()
    assert (classes[:, 2] == PARTIAL).all()
    exact = build_block_layout(Dense(), (4, 8), 16, 16)  # 32 tokens
    assert (exact.classes() == FULL).all()


def test_render():
    layout = build_block_layout(SlidingWindow(3), (8, 8), 16, 16)
    text = layout.render()
    assert text == "++..\n+++.\n.+++\n..++"
    dense = build_block_layout(Dense(), (5, 7), 16, 16).render()
    assert dense.splitlines() == ["##+"] * 3
    big = build_block_layout(SlidingWindow(3), (64, 64), 16, 16)
    assert "too large" in big.render()
    assert big.render(max_blocks=1000).count("\n") == big.num_q_blocks - 1


def test_draw_writes_png(tmp_path):
    layout = build_block_layout(SlidingWindow((2, 3, 3)), (3, 8, 9), 32, 16)
    path = tmp_path / "x.png"
    layout.draw(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    layout.draw(tmp_path / "y.png", title="a title")
    assert (tmp_path / "y.png").stat().st_size > 1000


def test_repr():
    layout = build_block_layout(SlidingWindow(3), (8, 8), 16, 16)
    text = repr(layout)
    assert text.startswith("BlockLayout(")
    for part in ("tokens=64", "blocks=16x16", "grid=4x4", "device=cpu"):
        assert part in text


def test_cache_returns_same_object():
    a = build_block_layout(SlidingWindow((3, 5, 5)), (4, 8, 8), 32, 16)
    b = build_block_layout(SlidingWindow((3, 5, 5)), [4, 8, 8], 32, 16)  # equal pattern, list grid
    assert a is b
    c = build_block_layout(SlidingWindow((3, 5, 5)), (4, 8, 8), 16, 16)
    d = build_block_layout(SlidingWindow((3, 5, 5)), (4, 8, 8), 32, 32)
    assert c is not a and d is not a and c is not d
    assert (c.block_q, c.block_k) == (16, 16) and c.num_q_blocks == 16
    assert (d.block_q, d.block_k) == (32, 32) and d.num_k_blocks == 8
    e = build_block_layout(SlidingWindow((3, 3, 3)), (4, 8, 8), 32, 16)
    assert e is not a
    assert build_block_layout(SlidingWindow((3, 5, 5)), (4, 8, 9), 32, 16) is not a


def test_from_classes_batched_round_trip():
    gen = torch.Generator().manual_seed(0)
    n, bq, bk = 70, 16, 32  # 5 query blocks, 3 key blocks (last one short)
    classes = torch.randint(0, 3, (2, 3, 5, 3), generator=gen, dtype=torch.int8)
    layout = BlockLayout.from_classes(classes, bq, bk, n)
    want = classes.clone()
    want[..., -1][want[..., -1] == FULL] = PARTIAL
    assert torch.equal(layout.classes(), want)
    assert layout.full_num.shape == (2, 3, 5)
    assert layout.visited_tokens().shape == (2, 3)


def test_from_classes_rejects_wrong_shape():
    with pytest.raises(ValueError, match="blocks"):
        BlockLayout.from_classes(torch.zeros(3, 3, dtype=torch.int8), 16, 16, 64)


@pytest.mark.parametrize("block_q, block_k", [(8, 16), (16, 24), (True, 16), (16, 48), (0, 16)])
def test_build_rejects_bad_block_sizes(block_q, block_k):
    with pytest.raises(ValueError, match="block_q|block_k"):
        build_block_layout(SlidingWindow(3), (8, 8), block_q, block_k)
