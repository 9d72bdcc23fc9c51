"""The Triton block-sparse kernel against the reference, under TRITON_INTERPRET=1 on CPU.

Sizes stay small: the interpreter costs milliseconds per (query block, key block) tile.
Low-precision error budget (DESIGN.md): the kernel's error against a float64 oracle may be
at most ``3 * err(torch low-precision SDPA) + 1e-3`` (relative L2 norm).
"""

import os

import pytest
import torch
import torch.nn.functional as F

import diffattn
from diffattn import Dense, Radial, SlidingWindow, TokenLayout, build_block_layout, masked_attention_reference

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not INTERPRET, reason="runs the kernel on CPU under TRITON_INTERPRET=1")


def make_qkv(layout, batch, heads, dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, layout.seq_len, heads, dim, generator=gen).to(dtype) for _ in range(3)]


def oracle(q, k, v, pattern, layout):
    """float64 reference of the same (rounded) inputs: (out, lse)."""
    mask_mod = None if pattern.is_dense else pattern.mask_mod(layout)
    return masked_attention_reference(q.double(), k.double(), v.double(), mask_mod)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def sdpa_low_precision(q, k, v, pattern, layout):
    """Torch's own masked attention in q's dtype: the yardstick of the error budget."""
    s = layout.seq_len
    idx = torch.arange(s)
    mask = None if pattern.is_dense else pattern.mask_mod(layout)(idx[:, None], idx[None, :])
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


# pattern, TokenLayout, batch, heads, head dim, block size (None: the GPU default for D)
CASES = [
    (SlidingWindow((2, 3, 5)), TokenLayout((4, 9, 11)), 1, 2, 64, (64, 32)),
    (SlidingWindow((2, 4, 4)), TokenLayout((5, 6, 10), text_len=13), 2, 1, 40, (32, 16)),  # even windows
    (SlidingWindow((2, 4, 6), stride=(1, 2, 3)), TokenLayout((3, 8, 12), text_len=10, text_first=False), 1, 2, 16, (64, 32)),
    (SlidingWindow((2, 3, 3), dilation=(1, 2, 2)), TokenLayout((2, 7, 9), text_len=5), 1, 1, 96, (16, 16)),
    (SlidingWindow((2, 2, 3), stride=(2, 1, 3), dilation=(1, 3, 2)), TokenLayout((4, 7, 8), text_len=3, text_first=False), 1, 1, 64, (32, 16)),
    (SlidingWindow((1, 5, 7)), TokenLayout((1, 13, 15)), 1, 2, 64, (32, 16)),  # one frame
    (SlidingWindow((5, 6)), TokenLayout((17, 19), text_len=11), 1, 1, 64, (64, 32)),  # 2-D grid
    (SlidingWindow((4, 3), stride=(2, 1)), TokenLayout((9, 10)), 2, 1, 16, (16, 16)),
    (SlidingWindow((None, 3, 3)), TokenLayout((3, 8, 10), text_len=6), 1, 1, 64, (64, 32)),  # whole F axis
    (SlidingWindow((5, None)), TokenLayout((12, 16), text_len=5), 1, 1, 32, (16, 16)),  # full blocks (whole rows)
    (SlidingWindow((3, 5, 5)), TokenLayout((3, 7, 9)), 1, 1, 64, (64, 32)),  # window F == axis F
    (SlidingWindow((2, 5, 5)), TokenLayout((4, 10, 10), text_len=20), 1, 2, 64, (128, 64)),  # GPU default
    (SlidingWindow((2, 5, 5)), TokenLayout((4, 9, 10), text_len=7, text_first=False), 1, 1, 64, None),
    (SlidingWindow((2, 3, 3)), TokenLayout((3, 6, 7), text_len=5), 1, 1, 160, None),  # D > 128: (64, 64)
    (Radial(0.3, block=64), TokenLayout((10, 4, 7), text_len=9), 1, 2, 64, (64, 32)),
    (Radial(0.5, block=32, sink=False), TokenLayout((12, 2, 5), text_len=6, text_first=False), 2, 1, 40, (32, 16)),
    (Radial(0.2), TokenLayout((6, 8, 8), text_len=4), 1, 1, 96, (128, 64)),  # block 128, 384 tokens
    (Dense(), TokenLayout((3, 7, 9), text_len=17), 1, 2, 64, (64, 32)),
    (Dense(), TokenLayout((3, 7, 9), text_len=17, text_first=False), 1, 1, 40, (32, 16)),
    (Dense(), TokenLayout((5, 11)), 1, 1, 16, None),
]
IDS = [f"{i}-{type(c[0]).__name__}-{c[1]}-D{c[4]}-blk{c[5]}" for i, c in enumerate(CASES)]


@pytest.mark.parametrize("pattern, layout, batch, heads, dim, block", CASES, ids=IDS)
def test_float32_matches_reference(pattern, layout, batch, heads, dim, block):
    q, k, v = make_qkv(layout, batch, heads, dim, torch.float32)
    out, lse = diffattn.attention(q, k, v, pattern, layout=layout, impl="triton", block_size=block, return_lse=True)
    ref_out, ref_lse = diffattn.attention(q, k, v, pattern, layout=layout, impl="reference", return_lse=True)
    assert out.dtype == torch.float32 and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_cases_skip_blocks():
    """Most sparse cases above do skip key blocks (the kernel is not run densely in disguise)."""
    from diffattn.kernels import kernel_block_size

    sparse = [c for c in CASES if not c[0].is_dense]
    skipping = 0
    for pattern, layout, _, _, dim, block in sparse:
        blocks = build_block_layout(pattern, layout.grid, *(block or kernel_block_size(dim)))
        skipping += blocks.block_density < 0.9
    assert skipping >= len(sparse) // 2


LOW_PRECISION_CASES = [CASES[i] for i in (0, 1, 2, 6, 9, 11, 14, 15, 17)]
LOW_IDS = [IDS[i] for i in (0, 1, 2, 6, 9, 11, 14, 15, 17)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("pattern, layout, batch, heads, dim, block", LOW_PRECISION_CASES, ids=LOW_IDS)
def test_low_precision_error_budget(pattern, layout, batch, heads, dim, block, dtype):
    q, k, v = make_qkv(layout, batch, heads, dim, dtype, seed=1)
    out, lse = diffattn.attention(q, k, v, pattern, layout=layout, impl="triton", block_size=block, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    want, want_lse = oracle(q, k, v, pattern, layout)
    torch_out = sdpa_low_precision(q, k, v, pattern, layout)
    err, budget = rel_err(out, want), 3 * rel_err(torch_out, want) + 1e-3
    assert err <= budget, f"relative error {err:.2e} > budget {budget:.2e}"
    # A wrong block shows up as an O(1) local error even when the norm is fine. (The
    # interpreter truncates float32 -> bfloat16 instead of rounding: up to 1 ulp, hence 4x.)
    assert max_err(out, want) <= 4 * max_err(torch_out, want) + 1e-3
    torch.testing.assert_close(lse.double(), want_lse.double(), atol=2e-4, rtol=1e-4)


def test_lse_is_natural_log_of_the_attended_sum():
    layout = TokenLayout((3, 5, 6), text_len=4)
    pattern = SlidingWindow((2, 3, 3))
    q, k, v = make_qkv(layout, 1, 1, 16, torch.float32)
    _, lse = diffattn.attention(q, k, v, pattern, layout=layout, impl="triton", block_size=(32, 16), return_lse=True)
    s = layout.seq_len
    idx = torch.arange(s)
    mask = pattern.mask_mod(layout)(idx[:, None], idx[None, :])
    scores = (q[0, :, 0].double() @ k[0, :, 0].double().T) * 16**-0.5
    want = torch.logsumexp(scores.masked_fill(~mask, float("-inf")), -1)
    torch.testing.assert_close(lse[0, :, 0].double(), want, atol=1e-5, rtol=1e-6)


def test_default_output_has_no_lse():
    layout = TokenLayout((2, 4, 5))
    q, k, v = make_qkv(layout, 1, 1, 16, torch.float32)
    out = diffattn.attention(q, k, v, SlidingWindow(2), layout=layout, impl="triton", block_size=(16, 16))
    assert isinstance(out, torch.Tensor) and out.shape == q.shape


def test_scale_argument():
    layout = TokenLayout((3, 5, 6), text_len=3)
    pattern = SlidingWindow((2, 3, 3))
    q, k, v = make_qkv(layout, 1, 1, 32, torch.float32)
    out = diffattn.attention(q, k, v, pattern, layout=layout, impl="triton", block_size=(32, 16), scale=0.05)
    ref = diffattn.attention(q, k, v, pattern, layout=layout, impl="reference", scale=0.05)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_non_contiguous_inputs(dtype):
    layout = TokenLayout((3, 6, 7), text_len=9, text_first=False)
    pattern = SlidingWindow((2, 3, 5), stride=(1, 1, 2))
    b, h, s, d = 2, 2, layout.seq_len, 32
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(b, h, s, d, generator=gen).to(dtype).transpose(1, 2)  # [B, S, H, D] view of [B, H, S, D]
    k = torch.randn(b, s, h, 2 * d, generator=gen).to(dtype)[..., ::2]  # D stride 2
    v = torch.randn(b, s + 5, h, d, generator=gen).to(dtype)[:, 3 : 3 + s]  # offset view
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    out, lse = diffattn.attention(q, k, v, pattern, layout=layout, impl="triton", block_size=(32, 16), return_lse=True)
    out_c, lse_c = diffattn.attention(
        q.contiguous(), k.contiguous(), v.contiguous(), pattern, layout=layout, impl="triton", block_size=(32, 16), return_lse=True
    )
    assert out.dtype == dtype
    assert torch.equal(out, out_c) and torch.equal(lse, lse_c)
    ref = diffattn.attention(q.float(), k.float(), v.float(), pattern, layout=layout, impl="reference")
    torch.testing.assert_close(out.float(), ref, atol=2e-3 if dtype == torch.float16 else 1e-5, rtol=1e-3)


def test_batch_and_heads_are_independent():
    """Each (batch, head) of a batched call equals the single-head call."""
    layout = TokenLayout((3, 5, 7), text_len=6)
    pattern = SlidingWindow((2, 3, 3))
    q, k, v = make_qkv(layout, 2, 3, 16, torch.float32)
    out = diffattn.attention(q, k, v, pattern, layout=layout, impl="triton", block_size=(32, 16))
    for bi, hi in [(0, 0), (1, 2), (1, 0)]:
        one = diffattn.attention(
            *(t[bi : bi + 1, :, hi : hi + 1] for t in (q, k, v)), pattern, layout=layout, impl="triton", block_size=(32, 16)
        )
        torch.testing.assert_close(out[bi : bi + 1, :, hi : hi + 1], one, atol=1e-6, rtol=1e-6)


def _op_arguments(pattern, layout, block_q, block_k):
    import diffattn.kernels  # noqa: F401  (registers torch.ops.diffattn.block_sparse_attention)

    blocks = build_block_layout(pattern, layout.grid, block_q, block_k)
    _, grid_h, grid_w = layout.grid if len(layout.grid) == 3 else (1, *layout.grid)
    geometry = [layout.visual_start, layout.num_visual, layout.text_start, layout.text_len, grid_h, grid_w]
    mask_kind, params = pattern.kernel_mask(layout.grid)
    window = list(params) + [1] * (12 - len(params))
    return (blocks.full_num, blocks.full_idx, blocks.part_num, blocks.part_idx), geometry, window, mask_kind


def test_custom_op_direct_call_matches_attention():
    from diffattn.kernels import block_sparse_attention

    layout = TokenLayout((3, 6, 6), text_len=5)
    pattern = SlidingWindow((2, 3, 3))
    q, k, v = make_qkv(layout, 1, 2, 32, torch.float32)
    tensors, geometry, window, mask_kind = _op_arguments(pattern, layout, 32, 16)
    out, lse = torch.ops.diffattn.block_sparse_attention(q, k, v, *tensors, geometry, window, mask_kind, 32**-0.5, 32, 16)
    out2, lse2 = block_sparse_attention(q, k, v, *tensors, geometry, window, mask_kind, 32**-0.5, 32, 16)
    want, want_lse = diffattn.attention(q, k, v, pattern, layout=layout, impl="reference", return_lse=True)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)


def test_custom_op_rejects_bad_layout_tensors():
    from diffattn.kernels import block_sparse_attention

    layout = TokenLayout((2, 4, 4))
    pattern = SlidingWindow(2)
    q, k, v = make_qkv(layout, 1, 1, 16, torch.float32)
    tensors, geometry, window, mask_kind = _op_arguments(pattern, layout, 16, 16)
    bad = (tensors[0].long(), *tensors[1:])
    with pytest.raises(ValueError, match="full_num"):
        block_sparse_attention(q, k, v, *bad, geometry, window, mask_kind, 0.25, 16, 16)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_fullgraph(backend):
    """The custom op traces without graph breaks (fake impl) and runs the kernel."""
    import torch._dynamo

    layout = TokenLayout((3, 5, 6), text_len=4, text_first=False)
    pattern = SlidingWindow((2, 3, 3))
    q, k, v = make_qkv(layout, 1, 2, 16, torch.float32)
    tensors, geometry, window, mask_kind = _op_arguments(pattern, layout, 32, 16)

    def f(q, k, v, full_num, full_idx, part_num, part_idx):
        out, lse = torch.ops.diffattn.block_sparse_attention(
            q * 1.0, k, v, full_num, full_idx, part_num, part_idx, geometry, window, mask_kind, 0.25, 32, 16
        )
        return out + 0.0, lse

    torch._dynamo.reset()
    compiled = torch.compile(f, backend=backend, fullgraph=True)
    out, lse = compiled(q, k, v, *tensors)
    want, want_lse = f(q, k, v, *tensors)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    ref, ref_lse = diffattn.attention(q, k, v, pattern, layout=layout, impl="reference", scale=0.25, return_lse=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_fake_tensor_shapes():
    """register_fake gives the right output metadata without running the kernel."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    layout = TokenLayout((2, 4, 4), text_len=3)
    tensors, geometry, window, mask_kind = _op_arguments(SlidingWindow(2), layout, 16, 16)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        q = torch.empty(2, layout.seq_len, 3, 16, dtype=torch.float16)
        fake = tuple(mode.from_tensor(t) for t in tensors)
        out, lse = torch.ops.diffattn.block_sparse_attention(q, q, q, *fake, geometry, window, mask_kind, 0.25, 16, 16)
    assert out.shape == q.shape and out.dtype == torch.float16
    assert lse.shape == (2, layout.seq_len, 3) and lse.dtype == torch.float32


@pytest.mark.parametrize("pattern, block", [(Dense(), (24, 16)), (Dense(), (16, 8)), (SlidingWindow(2), (16,))], ids=["dense-24x16", "dense-16x8", "window-1-tuple"])
def test_block_size_is_validated_for_every_pattern(pattern, block):
    layout = TokenLayout((2, 4, 4), text_len=3)
    q, k, v = make_qkv(layout, 1, 1, 16, torch.float32)
    with pytest.raises(ValueError, match="block"):
        diffattn.attention(q, k, v, pattern, layout=layout, impl="triton", block_size=block)


def test_radial_small_block_with_default_kernel_blocks():
    """Without block_size, the kernel blocks shrink to fit Radial.block (here 32 < the default 128x64)."""
    layout = TokenLayout((6, 4, 5), text_len=3)
    pattern = Radial(0.3, block=32)
    q, k, v = make_qkv(layout, 1, 1, 16, torch.float32)
    out = diffattn.attention(q, k, v, pattern, layout=layout, impl="triton")
    ref = diffattn.attention(q, k, v, pattern, layout=layout, impl="reference")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "pattern, block",
    [(SlidingWindow((2, 3, 3)), (32, 16)), (Radial(0.3, block=32), None), (Dense(), (32, 16))],
    ids=["window", "radial", "dense"],
)
def test_torch_compile_fullgraph_of_attention(pattern, block):
    """diffattn.attention itself compiles without graph breaks (layout built outside the graph)."""
    import torch._dynamo

    layout = TokenLayout((3, 5, 6), text_len=4)
    q, k, v = make_qkv(layout, 1, 2, 16, torch.float32)

    def f(q, k, v):
        return diffattn.attention(q * 1.0, k, v, pattern, layout=layout, impl="triton", block_size=block, return_lse=True)

    torch._dynamo.reset()
    out, lse = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v)
    want, want_lse = f(q, k, v)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse, want_lse, atol=1e-6, rtol=1e-6)


def test_explicit_block_size_larger_than_radial_block_is_an_error():
    layout = TokenLayout((6, 4, 5))
    q, k, v = make_qkv(layout, 1, 1, 16, torch.float32)
    with pytest.raises(ValueError, match="block_q"):
        diffattn.attention(q, k, v, Radial(0.3, block=32), layout=layout, impl="triton", block_size=(64, 32))


def test_partials_fake_tensor_shapes():
    """The one-pass partials op's register_fake: two outputs in q's dtype, two float32 lses."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    layout = TokenLayout((2, 4, 4), text_len=3)
    pattern = SlidingWindow(2)
    tensors, geometry, window, mask_kind = _op_arguments(pattern, layout, 16, 16)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        q = torch.empty(2, layout.seq_len, 3, 16, dtype=torch.float16)
        fake = tuple(mode.from_tensor(t) for t in tensors)
        out_in, lse_in, out_ex, lse_ex = torch.ops.diffattn.block_sparse_partials(
            q, q, q, *fake, geometry, window, mask_kind, 0.25, 16, 16)
    for out, lse in ((out_in, lse_in), (out_ex, lse_ex)):
        assert out.shape == q.shape and out.dtype == torch.float16
        assert lse.shape == (2, layout.seq_len, 3) and lse.dtype == torch.float32


@pytest.mark.parametrize("pattern, block", [(SlidingWindow((2, 3, 3)), (32, 16)), (Radial(0.3, block=32), None)],
                         ids=["window", "radial"])
def test_torch_compile_fullgraph_of_attention_partials(pattern, block):
    """attention_partials (the one-pass kernel) compiles without graph breaks."""
    import torch._dynamo

    from diffattn.partials import attention_partials

    layout = TokenLayout((3, 5, 6), text_len=4)
    q, k, v = make_qkv(layout, 1, 2, 16, torch.float32)

    def f(q, k, v):
        return attention_partials(q * 1.0, k, v, pattern, layout=layout, impl="triton", block_size=block)

    torch._dynamo.reset()
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v)
    for a, b in zip(got, f(q, k, v)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
