"""The one-pass partials kernel on a CUDA GPU (bf16 / fp16, GPU block sizes); skipped without one."""

import pytest
import torch
import torch.nn.functional as F

import diffattn
from diffattn import BlockTopK, Radial, SlidingWindow, TokenLayout, select_blocks
from diffattn.partials import attention_partials, merge_partials

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CASES = [
    (SlidingWindow((3, 7, 9)), TokenLayout((5, 16, 24), text_len=77)),
    (SlidingWindow((3, 5, 5), dilation=(1, 2, 2)), TokenLayout((4, 15, 22), text_len=40, text_first=False)),
    (Radial(0.3), TokenLayout((8, 12, 20))),
    (BlockTopK(density=0.2), TokenLayout((6, 16, 20), text_len=30)),
]


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("pattern, layout", CASES, ids=[f"{type(p).__name__}-{lay}" for p, lay in CASES])
def test_one_pass_partials_cuda(pattern, layout, dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, layout.seq_len, 4, 128, generator=gen, device="cuda", dtype=dtype) for _ in range(3))
    selection = None if pattern.static else select_blocks(q, k, pattern, layout)
    got = attention_partials(q, k, v, pattern, layout=layout, impl="triton", selection=selection)
    want = attention_partials(q.float(), k.float(), v.float(), pattern, layout=layout, impl="reference", selection=selection)
    for i in (0, 2):  # outputs; rows empty in the reference are empty (0, -inf) in the kernel too
        empty = torch.isneginf(want[i + 1])
        assert torch.equal(torch.isneginf(got[i + 1]), empty)
        assert rel(got[i], want[i]) < 2e-2
        torch.testing.assert_close(got[i + 1][~empty], want[i + 1][~empty], atol=2e-2, rtol=2e-2)
    merged, _ = merge_partials(*got)
    dense = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    assert rel(merged, dense) < 2e-2
    two = diffattn.attention(q, k, v, pattern, layout=layout, impl="triton", selection=selection)
    assert rel(got[0], two) < 1e-2  # the internal partial is the pattern's own attention
