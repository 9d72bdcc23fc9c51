"""Kernel vs reference on a CUDA GPU: bf16/fp16 at DiT-like shapes (skipped without a GPU)."""

import pytest
import torch

import diffattn
import diffattn.kernels  # noqa: F401  (registers torch.ops.diffattn)
from diffattn import Dense, Radial, SlidingWindow, TokenLayout

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def sdpa_masked(q, k, v, pattern, layout):
    """Torch's own low-precision masked attention: the error budget's yardstick."""
    s = layout.seq_len
    idx = torch.arange(s, device=q.device)
    mask = None if pattern.is_dense else pattern.mask_mod(layout)(idx[:, None], idx[None, :])
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    )
    return out.transpose(1, 2)


CASES = [
    # grid, text_len, text_first, pattern, heads, head_dim
    ((9, 30, 52), 0, True, SlidingWindow((3, 11, 11)), 4, 128),
    ((9, 30, 52), 0, True, SlidingWindow((None, 16, 16), stride=(1, 4, 4)), 4, 128),
    ((9, 30, 52), 0, True, Radial(0.2), 4, 128),
    ((5, 45, 80), 256, False, Radial(0.95, sink=False), 4, 128),
    ((5, 45, 80), 256, False, SlidingWindow((3, 9, 9), dilation=(1, 2, 2)), 2, 128),
    ((64, 64), 512, True, SlidingWindow((17, 17)), 4, 128),
    ((64, 64), 512, True, Dense(), 4, 128),
    ((33, 47), 77, True, SlidingWindow((8, 12)), 3, 64),
    ((4, 17, 23), 13, True, SlidingWindow((2, 6, 7), stride=(1, 3, 2)), 2, 40),
    ((4, 17, 23), 13, False, Radial(0.5), 2, 96),
    ((4, 17, 23), 13, True, SlidingWindow((2, 5, 5)), 2, 160),
    ((4, 17, 23), 0, True, SlidingWindow((3, 5, 5)), 2, 256),
    ((1, 40, 40), 0, True, Dense(), 2, 256),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grid,text_len,text_first,pattern,heads,head_dim", CASES)
def test_kernel_matches_reference_cuda(grid, text_len, text_first, pattern, heads, head_dim, dtype):
    layout = TokenLayout(grid, text_len=text_len, text_first=text_first)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, layout.seq_len, heads, head_dim, device="cuda", dtype=dtype, generator=gen) for _ in range(3))
    out, lse = diffattn.attention(q, k, v, pattern, layout=layout, impl="triton", return_lse=True)
    ref, ref_lse = diffattn.masked_attention_reference(
        q.float(), k.float(), v.float(),
        None if pattern.is_dense else pattern.mask_mod(layout), max_elements=1 << 28,
    )
    torch_err = rel_err(sdpa_masked(q, k, v, pattern, layout), ref)
    err = rel_err(out, ref)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert err <= 2 * torch_err + 1e-3, (err, torch_err)
    assert (lse - ref_lse).abs().max().item() < 2e-2


def test_fp32_is_accurate_cuda():
    layout = TokenLayout((4, 17, 23), text_len=13)
    q, k, v = (torch.randn(1, layout.seq_len, 2, 64, device="cuda") for _ in range(3))
    pattern = SlidingWindow((2, 5, 5))
    out = diffattn.attention(q, k, v, pattern, layout=layout, impl="triton")
    ref, _ = diffattn.masked_attention_reference(q.double(), k.double(), v.double(), pattern.mask_mod(layout))
    assert rel_err(out, ref) < 1e-5


def test_compile_fullgraph_cuda():
    layout = TokenLayout((4, 16, 16), text_len=32)
    pattern = SlidingWindow((3, 7, 7))
    q, k, v = (torch.randn(1, layout.seq_len, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    blocks = diffattn.build_block_layout(pattern, layout.grid, 128, 64, device="cuda")
    kind, params = pattern.kernel_mask(layout.grid)

    def fn(q, k, v):
        out, _ = torch.ops.diffattn.block_sparse_attention(
            q, k, v, blocks.full_num, blocks.full_idx, blocks.part_num, blocks.part_idx,
            [layout.visual_start, layout.num_visual, layout.text_start, layout.text_len, 16, 16],
            list(params), kind, 0.125, 128, 64,
        )
        return out * 2

    compiled = torch.compile(fn, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), fn(q, k, v))


def test_attention_compiles_cuda():
    layout = TokenLayout((4, 16, 16), text_len=32)
    q, k, v = (torch.randn(1, layout.seq_len, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for pattern in (Radial(0.2), Radial(0.2, block=64), SlidingWindow((3, 5, 5), dilation=(1, 2, 2))):
        fn = lambda q, k, v: diffattn.attention(q, k, v, pattern, layout=layout) * 2  # noqa: E731
        torch.testing.assert_close(torch.compile(fn, fullgraph=True, dynamic=False)(q, k, v), fn(q, k, v))
