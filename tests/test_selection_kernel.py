"""The block-selection kernel (pooling, pooled scores, top-k / cdf, guards) against the torch
reference ``BlockTopK.select``, under the Triton interpreter."""

import os

import pytest
import torch

import diffattn
from diffattn import BlockTopK, Piecewise, TokenLayout
from diffattn.testing import structured_qkv

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not INTERPRET, reason="runs the selection kernel under TRITON_INTERPRET=1")

LAYOUTS = [
    TokenLayout((3, 7, 9), text_len=10),  # 189 visual tokens: short last block, text first
    TokenLayout((3, 7, 9), text_len=7, text_first=False),  # text last
    TokenLayout((1, 5, 7)),  # one frame, fewer tokens than two blocks
    TokenLayout((2, 8, 8)),  # a multiple of the block
]
PATTERNS = [
    BlockTopK(density=0.3, block=16),
    BlockTopK(density=0.05, block=16),  # one block per row before the guards
    BlockTopK(density=1.0, block=32),
    BlockTopK(cdf=0.6, block=16),
    BlockTopK(cdf=1.0, block=16),
    BlockTopK(density=0.2, block=16, keep_sink=False, keep_diagonal=False),
    BlockTopK(cdf=0.3, block=32, keep_sink=False),
    BlockTopK(density=0.25, block=16, similarity=0.3),
]


def both(q, k, pattern, layout, scale=None):
    got = diffattn.select_blocks(q, k, pattern, layout, scale, impl="triton")
    want = diffattn.select_blocks(q, k, pattern, layout, scale, impl="reference")
    return got, want


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_kernel_matches_reference(pattern, layout):
    q, k, _ = structured_qkv(layout, batch=2, heads=2, head_dim=16)
    got, want = both(q, k, pattern, layout)
    assert got.dtype == torch.bool and got.shape == want.shape
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype):
    layout = TokenLayout((2, 9, 10), text_len=5)
    q, k, _ = structured_qkv(layout, batch=1, heads=3, head_dim=32, dtype=dtype)
    for pattern in (BlockTopK(density=0.25, block=16), BlockTopK(cdf=0.5, block=16)):
        got, want = both(q, k, pattern, layout)
        assert torch.equal(got, want)


def test_random_inputs_and_head_dim_not_power_of_two():
    layout = TokenLayout((2, 6, 11))
    gen = torch.Generator().manual_seed(1)
    q, k = (torch.randn(2, layout.seq_len, 2, 24, generator=gen) for _ in range(2))
    for pattern in (BlockTopK(density=0.4, block=16), BlockTopK(cdf=0.7, block=16), BlockTopK(density=0.3, block=16, similarity=0.05)):
        got, want = both(q, k, pattern, layout, scale=0.3)
        assert torch.equal(got, want)


def test_many_key_blocks():
    """NK = 563 > SELECT_TILE / 16: several query blocks per program, a 1024-wide row."""
    layout = TokenLayout((1, 50, 180))
    q, k, _ = structured_qkv(layout, batch=1, heads=1, head_dim=16)
    for pattern in (BlockTopK(density=0.1, block=16), BlockTopK(cdf=0.5, block=16)):
        got, want = both(q, k, pattern, layout)
        assert torch.equal(got, want)


def tied_qk(nb: int, block: int, pattern_of_values: list[int], dim: int = 16):
    """q, k ``[1, nb * block, 1, dim]`` of small integers: every query block's mean is e_0 and key
    block J's mean is ``pattern_of_values[J] * e_0``, so the pooled logits are exact and blocks
    with equal values tie bitwise in any summation order."""
    q = torch.zeros(1, nb * block, 1, dim)
    q[..., 0] = 1.0
    k = torch.zeros(1, nb * block, 1, dim)
    for j, value in enumerate(pattern_of_values):
        k[0, j * block : (j + 1) * block, 0, 0] = float(value)
        k[0, j * block : (j + 1) * block : 2, 0, 1] = 3.0  # tokens differ; block means tie anyway
        k[0, j * block + 1 : (j + 1) * block : 2, 0, 1] = -3.0
    return q, k


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_topk_ties_go_to_the_lower_index(impl):
    values = [1, 3, 2, 3, 3, 0, 3, 2]  # four blocks tie at the top
    q, k = tied_qk(8, 16, values)
    layout = TokenLayout((1, 8, 16))
    pattern = BlockTopK(density=0.25, block=16, keep_diagonal=False, keep_sink=False)  # keep 2 of 8
    keep = diffattn.select_blocks(q, k, pattern, layout, 0.25, impl=impl)
    assert keep[0, 0].nonzero()[:, 1].view(8, 2).tolist() == [[1, 3]] * 8


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_cdf_ties_go_to_the_lower_index(impl):
    q, k = tied_qk(8, 16, [5] * 8)  # P = 1/8 for every block: exact
    layout = TokenLayout((1, 8, 16))
    pattern = BlockTopK(cdf=0.5, block=16, keep_diagonal=False, keep_sink=False)
    keep = diffattn.select_blocks(q, k, pattern, layout, 0.25, impl=impl)
    # the mass before the m-th block is m/8: blocks 0..3 are kept (3/8 < 0.5 <= 4/8)
    assert keep[0, 0].nonzero()[:, 1].view(8, 4).tolist() == [[0, 1, 2, 3]] * 8


def test_ties_with_two_levels_match_reference():
    values = [2, 0, 2, 1, 0, 2, 1, 1, 0, 2, 0, 1, 2, 2, 0, 1]
    q, k = tied_qk(16, 16, values)
    layout = TokenLayout((2, 8, 16))
    for pattern in (BlockTopK(density=0.25, block=16, keep_sink=False), BlockTopK(cdf=0.55, block=16, keep_diagonal=False),
                    BlockTopK(density=0.5, block=16)):
        got, want = both(q, k, pattern, layout, 1.0)
        assert torch.equal(got, want)


def test_guards_alone():
    """With density at its minimum the guards decide the rest: the diagonal and the sink."""
    q, k = tied_qk(8, 16, [9, 0, 0, 0, 0, 0, 0, 0])
    layout = TokenLayout((1, 8, 16))
    keep = diffattn.select_blocks(q, k, BlockTopK(density=0.01, block=16), layout, 0.25, impl="triton")
    expected = torch.eye(8, dtype=torch.bool)
    expected[:, 0] = True
    assert torch.equal(keep[0, 0], expected)


def test_similarity_guard_keeps_dissimilar_blocks():
    layout = TokenLayout((2, 8, 8))
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, layout.seq_len, 2, 16, generator=gen) for _ in range(2))
    keep = diffattn.select_blocks(q, k, BlockTopK(density=0.25, block=16, similarity=0.5), layout, impl="triton")
    assert keep.all()  # random tokens: every block's mean cosine is about 0


def test_piecewise_selects_through_the_kernel():
    layout = TokenLayout((3, 5, 9), text_len=9)
    q, k, _ = structured_qkv(layout, batch=2, heads=2, head_dim=16)
    got, want = both(q, k, Piecewise(0.3, block=16), layout)
    assert torch.equal(got, want)


def test_selection_feeds_attention():
    layout = TokenLayout((3, 7, 9), text_len=10)
    q, k, v = structured_qkv(layout, batch=1, heads=2, head_dim=16)
    pattern = BlockTopK(density=0.3, block=16)
    keep = diffattn.select_blocks(q, k, pattern, layout, impl="triton")
    out = diffattn.attention(q, k, v, pattern, layout=layout, impl="triton")
    torch.testing.assert_close(out, diffattn.attention(q, k, v, pattern, layout=layout, impl="reference", selection=keep),
                               atol=2e-5, rtol=2e-5)


def test_op_is_registered_with_a_fake():
    from diffattn.kernels.block_selection import block_select

    layout = TokenLayout((2, 5, 7))
    q, k, _ = structured_qkv(layout, batch=1, heads=2, head_dim=16)
    args = (q, k, 0, layout.num_visual, 16, 0.25, 2, 0.0, True, True, None)
    torch.library.opcheck(block_select, args, test_utils=("test_schema", "test_faketensor"))

    @torch.compile(fullgraph=True, backend="eager")
    def select(q, k):
        return torch.ops.diffattn.block_select(q, k, 0, layout.num_visual, 16, 0.25, 2, 0.0, True, True, None)

    assert torch.equal(select(q, k), block_select(*args))


@pytest.mark.parametrize("kwargs, match", [
    (dict(keep_count=9, cdf=0.0), r"keep_count must be in \[0, NK=5\]"),
    (dict(keep_count=0, cdf=1.5), r"cdf must be in \(0, 1\]"),
])
def test_invalid_arguments(kwargs, match):
    from diffattn.kernels.block_selection import block_select

    q = torch.randn(1, 70, 1, 16)
    with pytest.raises(ValueError, match=match):
        block_select(q, q, 0, 70, 16, 0.25, kwargs["keep_count"], kwargs["cdf"], True, True)


def test_explicit_triton_needs_cuda_or_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    layout = TokenLayout((2, 4, 4))
    q = torch.randn(1, layout.seq_len, 1, 16)
    with pytest.raises(ValueError, match="impl='triton' needs CUDA tensors"):
        diffattn.select_blocks(q, q, BlockTopK(density=0.5, block=16), layout, impl="triton")
    with pytest.raises(ValueError, match="impl must be one of"):
        diffattn.select_blocks(q, q, BlockTopK(density=0.5, block=16), layout, impl="cuda")


def load_selection_bench():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "selection_bench.py"
    spec = importlib.util.spec_from_file_location("selection_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_selection_bench_arguments_and_dry_run(tmp_path, capsys):
    import json

    bench = load_selection_bench()
    with pytest.raises(SystemExit):
        bench.parse_args([])  # --out is required
    with pytest.raises(SystemExit):
        bench.parse_args(["--out", "x.json", "--density", "0"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--out", "x.json", "--shapes", "sd-1.5"])
    assert bench.parse_args(["--out", "x.json"]).shapes == ["wan-480p-81f", "hunyuan-720p-129f"]
    assert bench.SHAPES["wan-480p-81f"][0].seq_len == 32_760
    assert bench.SHAPES["hunyuan-720p-129f"][0].num_visual == 118_800
    out = tmp_path / "dry.json"
    assert bench.main(["--dry-run", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    row = data["results"][0]
    assert data["dry_run"] and {"date", "torch", "triton"} <= set(data["environment"])
    assert row["selection_mismatch"] == 0.0 and 0.25 <= row["kept_fraction"] <= 1.0
    assert {"select_ms", "blocktopk_ms", "selection_share", "piecewise_pooled_vs_blocktopk"} <= set(row)
    if not torch.cuda.is_available():
        assert bench.main(["--out", str(tmp_path / "gpu.json")]) == 2


def test_inputs_strided_along_the_head_dim():
    layout = TokenLayout((2, 8, 8), text_len=6)
    q, k, v = structured_qkv(layout, heads=2, head_dim=32)
    q2, k2 = q[..., ::2], k[..., ::2]  # D = 16 with stride 2
    got, want = both(q2, k2, BlockTopK(density=0.3, block=16), layout)
    assert torch.equal(got, want)
    pattern = BlockTopK(density=0.3, block=16)
    out = diffattn.attention(q2, k2, v[..., ::2], pattern, layout=layout, impl="triton")
    ref = diffattn.attention(q2, k2, v[..., ::2], pattern, layout=layout, impl="reference")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_kernel_blocks_must_divide_the_selection_block():
    layout = TokenLayout((2, 4, 8))
    q = torch.randn(1, layout.seq_len, 2, 16)
    for block_size in ((32, 32), (64, 16)):
        with pytest.raises(ValueError, match="kernel blocks must divide 16"):
            diffattn.attention(q, q, q, BlockTopK(density=0.3, block=16), layout=layout, impl="triton",
                               block_size=block_size)


def test_strided_text_lens():
    layout = TokenLayout((2, 4, 8), text_len=8)
    q, k, v = structured_qkv(layout, batch=2, heads=2, head_dim=16)
    lens = torch.tensor([[5, 0], [8, 0]], dtype=torch.int32)[:, 0]  # stride 2
    for pattern in (BlockTopK(density=0.5, block=16), diffattn.SlidingWindow((1, 3, 3))):
        out = diffattn.attention(q, k, v, pattern, layout=layout, impl="triton", text_lens=lens)
        ref = diffattn.attention(q, k, v, pattern, layout=layout, impl="reference", text_lens=lens)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_piecewise_refuses_a_foreign_block_size():
    layout = TokenLayout((2, 4, 8))
    q = torch.randn(1, layout.seq_len, 2, 16)
    with pytest.raises(ValueError, match="Piecewise runs blocks of its own block size"):
        diffattn.attention(q, q, q, Piecewise(0.3, block=16), layout=layout, impl="reference", block_size=(32, 32))
    out = diffattn.attention(q, q, q, Piecewise(0.3, block=16), layout=layout, impl="reference", block_size=(16, 16))
    assert out.shape == q.shape
