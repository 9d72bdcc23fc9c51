"""The chunked torch reference against a naive, fully materialised masked softmax (float64)."""

import math
import subprocess
import sys
import textwrap

import pytest
import torch

import diffattn
from diffattn import Dense, Radial, SlidingWindow, TokenLayout, masked_attention_reference


def naive_attention(q, k, v, mask, scale=None):
    """``[B, S, H, D]`` float64 masked softmax with the S x S mask materialised; (out, lse)."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = q @ k.transpose(-1, -2) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    return (probs @ v).transpose(1, 2), lse.transpose(1, 2)


def full_mask(pattern, layout):
    s = layout.seq_len
    if pattern.is_dense:
        return None
    idx = torch.arange(s)
    return pattern.mask_mod(layout)(idx[:, None], idx[None, :]).expand(s, s)


def inputs(layout, batch=2, heads=3, dim=32, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, layout.seq_len, heads, dim, generator=gen, dtype=torch.float64).to(dtype) for _ in range(3)]


CASES = [
    (Dense(), TokenLayout((3, 5, 6), text_len=7)),
    (Dense(), TokenLayout((4, 6), text_len=5, text_first=False)),
    (SlidingWindow((2, 3, 3)), TokenLayout((4, 6, 7), text_len=9)),
    (SlidingWindow((2, 3, 4), stride=(1, 2, 2), dilation=(1, 1, 2)), TokenLayout((4, 6, 9), text_len=9, text_first=False)),
    (SlidingWindow((5, 4)), TokenLayout((11, 13))),
    (Radial(0.3, block=16), TokenLayout((12, 3, 5), text_len=6)),
    (Radial(0.3, block=16, sink=False), TokenLayout((12, 3, 5), text_len=6, text_first=False)),
]
IDS = [f"{type(p).__name__}-{l}" for p, l in CASES]


@pytest.mark.parametrize("pattern, layout", CASES, ids=IDS)
def test_matches_naive_float32(pattern, layout):
    q, k, v = inputs(layout)
    out, lse = masked_attention_reference(q, k, v, None if pattern.is_dense else pattern.mask_mod(layout))
    want_out, want_lse = naive_attention(q, k, v, full_mask(pattern, layout))
    assert out.dtype == torch.float32 and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    torch.testing.assert_close(out.double(), want_out, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-6, rtol=1e-6)


@pytest.mark.parametrize("pattern, layout", CASES, ids=IDS)
def test_matches_naive_float64_and_chunking(pattern, layout):
    q, k, v = inputs(layout, dtype=torch.float64, seed=1)
    mask_mod = None if pattern.is_dense else pattern.mask_mod(layout)
    want_out, want_lse = naive_attention(q, k, v, full_mask(pattern, layout))
    results = []
    for max_elements in (1, 7 * layout.seq_len * 2 * 3, 1 << 30):  # one query per chunk, 7, all
        out, lse = masked_attention_reference(q, k, v, mask_mod, max_elements=max_elements)
        assert out.dtype == torch.float64 and lse.dtype == torch.float32
        torch.testing.assert_close(out, want_out, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(lse.double(), want_lse, atol=2e-6, rtol=1e-6)  # lse is float32
        results.append((out, lse))
    for out, lse in results[1:]:
        torch.testing.assert_close(out, results[0][0], atol=1e-13, rtol=0)
        assert torch.equal(lse, results[0][1])


def test_through_attention_api():
    layout = TokenLayout((3, 5, 7), text_len=4, text_first=False)
    pattern = SlidingWindow((2, 3, 3))
    q, k, v = inputs(layout)
    out, lse = diffattn.attention(q, k, v, pattern, layout=layout, impl="reference", return_lse=True)
    want_out, want_lse = naive_attention(q, k, v, full_mask(pattern, layout))
    torch.testing.assert_close(out.double(), want_out, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-6, rtol=1e-6)


def test_scale_and_half_inputs():
    layout = TokenLayout((4, 5))
    pattern = SlidingWindow(3)
    q, k, v = inputs(layout, dtype=torch.float16)
    out, lse = masked_attention_reference(q, k, v, pattern.mask_mod(layout), scale=0.3)
    want_out, want_lse = naive_attention(q, k, v, full_mask(pattern, layout), scale=0.3)
    assert out.dtype == torch.float16 and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), want_out, atol=2e-3, rtol=2e-3)  # output rounding only
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)


def test_rows_without_keys_give_zero_and_minus_inf():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 10, 2, 8, generator=gen) for _ in range(3))

    def mask_mod(qi, ki):  # queries 0..2 attend nothing
        return (qi >= 3) & (ki <= qi)

    out, lse = masked_attention_reference(q, k, v, mask_mod, max_elements=2 * 10 * 2)
    assert torch.isfinite(out).all()
    assert (out[:, :3] == 0).all()
    assert torch.isneginf(lse[:, :3]).all()
    idx = torch.arange(10)
    want_out, want_lse = naive_attention(q, k, v, mask_mod(idx[:, None], idx[None, :]))
    torch.testing.assert_close(out[:, 3:].double(), want_out[:, 3:], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse[:, 3:].double(), want_lse[:, 3:], atol=2e-6, rtol=1e-6)


def test_cross_attention_lengths():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 9, 2, 16, generator=gen)
    k, v = (torch.randn(2, 23, 2, 16, generator=gen) for _ in range(2))
    out, lse = masked_attention_reference(q, k, v, None, max_elements=50)
    want_out, want_lse = naive_attention(q, k, v, None)
    torch.testing.assert_close(out.double(), want_out, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-6, rtol=1e-6)


def test_lse_merges_disjoint_partials():
    """Two partials over disjoint key sets combine exactly into the union (DESIGN: LSE merge)."""
    layout = TokenLayout((3, 6, 6), text_len=8)
    pattern = SlidingWindow((2, 3, 3))
    q, k, v = inputs(layout, dtype=torch.float64)
    inside = pattern.mask_mod(layout)
    o_in, l_in = masked_attention_reference(q, k, v, inside)
    o_out, l_out = masked_attention_reference(q, k, v, lambda a, b: ~inside(a, b))
    m = torch.maximum(l_in, l_out)
    w_in, w_out = torch.exp(l_in - m)[..., None], torch.exp(l_out - m)[..., None]
    merged = (o_in * w_in + o_out * w_out) / (w_in + w_out)
    dense, _ = naive_attention(q, k, v, None)
    torch.testing.assert_close(merged, dense, atol=1e-6, rtol=1e-6)  # lse is stored in float32


MEMORY_SCRIPT = textwrap.dedent(
    """
    import resource, torch
    from diffattn import SlidingWindow, TokenLayout, masked_attention_reference

    def current_rss_kb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() // 1024

    torch.set_num_threads(2)
    layout = TokenLayout((21, 30, 52))
    s = layout.seq_len
    assert s == 32760
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, s, 1, 64, generator=gen) for _ in range(3))
    mask_mod = SlidingWindow((3, 9, 9)).mask_mod(layout)
    base = current_rss_kb()
    out, lse = masked_attention_reference(q, k, v, mask_mod)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    print((peak - base) * 1024)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and ru_maxrss in KiB")
def test_memory_stays_far_below_s_squared():
    """At S = 32760 an S x S fp32 matrix is 4.3 GB; the chunked reference must stay < 1.5 GB.

    ru_maxrss is the process' peak since start, so ``peak - current RSS before the call``
    over-estimates the increase: a conservative bound.
    """
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    increase = int(proc.stdout.strip().splitlines()[-1])
    assert 32760**2 * 4 > 4e9
    assert increase < 1.5e9, f"peak RSS increase {increase / 1e9:.2f} GB"
