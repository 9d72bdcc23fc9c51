"""NaN / inf inputs propagate as dense attention over each pattern's keys would; bad arguments to
every public entry point raise errors naming the argument, the value and what is allowed.

The oracle (``ideal``) is softmax attention in float64 IEEE arithmetic over each query's
*attended* keys only: a row is NaN where it has a NaN query or attends a key or value that makes
it NaN, and rows that do not attend a poisoned key stay finite and exact. That is torch's SDPA
(``test_ideal_is_sdpa_where_sdpa_reads_only_attended_keys``) except for keys a boolean
``attn_mask`` masks out: SDPA adds the mask as -inf, so a masked-out NaN key or value still
poisons rows (``test_masked_out_nan_never_leaks``); a sparse kernel never reads
those keys, and the reference follows the kernel. One documented exception: inside a window's
partial block the kernel multiplies a masked key's value by p = 0, so a NaN / inf value there
makes that output component NaN for the block's other rows too (``assert_kernel_nonfinite``).
A row whose attended scores are all -inf gets out 0 and lse -inf, as SDPA does.

Several poisons run in one call, one per head (heads are independent, selection included).
Kernels run under TRITON_INTERPRET=1 on CPU.
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F

import diffattn
from diffattn import BlockTopK, Dense, Piecewise, Radial, SlidingWindow, TokenLayout
from diffattn.partials import attention_partials, external_attention, merge_partials
from diffattn.patterns.base import sequence_mask_mod
from diffattn.patterns.topk import selected_mask_mod

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
IMPLS = ["reference", pytest.param("triton", marks=pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1"))]
NAN, INF = float("nan"), float("inf")

LAYOUT = TokenLayout((2, 6, 8), text_len=5)  # 101 tokens, text first
TILED_LAYOUT = TokenLayout((1, 8, 12), text_len=5, text_first=False)  # 101 tokens, text last
TILED = SlidingWindow.tiled(tile=(1, 4, 4), window_tiles=(1, 1, 3))


def _poisons(layout):
    """One poison per head: (tensor, token, dim, value); a list for several in one head."""
    vis, text = layout.visual_start, layout.text_start
    return [  # (96 visual tokens)
        [("q", vis + 40, 3, NAN)],
        [("k", vis + 75, 0, NAN)],
        [("v", vis + 90, 3, NAN)],
        [("q", vis + 20, 1, INF)],
        [("k", vis + 60, 2, INF)],
        [("k", vis + 85, 5, -INF)],
        [("v", vis + 70, 4, INF)],
        [("v", vis + 50, 6, INF), ("v", vis + 51, 6, -INF)],  # both signs: NaN where both are attended
        [("k", text + 2, 7, NAN)],  # a text key: every row attends it
        [("q", text + 4, 7, NAN)],  # a text query
        [],  # clean
    ]


def make_inputs(layout, dtype, seed=0, dim=16):
    poisons = _poisons(layout)
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, layout.seq_len, len(poisons), dim, generator=gen) for _ in range(3))
    tensors = {"q": q, "k": k, "v": v}
    for head, items in enumerate(poisons):
        for name, token, d, value in items:
            tensors[name][0, token, head, d] = value
    return q.to(dtype), k.to(dtype), v.to(dtype), poisons


def ideal(q, k, v, mask, scale=None):
    """float64 attention over each row's attended keys (mask ``[S, S]`` or ``[B, H, S, S]``):
    ``out [B, S, H, D]``, ``lse [B, S, H]`` (NaN where the softmax is ill-defined, -inf for a row
    with no attended key or only -inf scores, whose out is 0)."""
    d = q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    qd, kd, vd = (t.double().transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
    scores = (qd @ kd.transpose(-1, -2) * scale).masked_fill(~mask, -INF)
    lse = torch.logsumexp(scores, -1, keepdim=True)
    empty = lse == -INF
    p = torch.exp(scores - lse.masked_fill(empty, 0.0))
    out = torch.where(mask[..., None], p[..., None] * vd[:, :, None], 0.0).sum(-2)  # masked keys never read
    lse = lse[..., 0].masked_fill(lse[..., 0] == INF, NAN)
    return out.transpose(1, 2), lse.transpose(1, 2)


def pattern_mask(pattern, layout, selection=None):
    """The boolean ``[S, S]`` (or ``[B, H, S, S]`` for a selection) mask of a pattern."""
    idx = torch.arange(layout.seq_len)
    if pattern.is_dense or isinstance(pattern, Piecewise):
        return torch.ones(layout.seq_len, layout.seq_len, dtype=torch.bool)
    if not pattern.static:
        return sequence_mask_mod(selected_mask_mod(selection, pattern.block), layout)(idx[:, None], idx[None, :])
    return pattern.mask_mod(layout)(idx[:, None], idx[None, :])


def assert_same_nonfinite(out, ref, atol, what=""):
    """Same NaN, +inf and -inf positions; finite values within ``atol``."""
    out = out.double()
    for name, f in (("NaN", torch.isnan), ("+inf", lambda x: x == INF), ("-inf", lambda x: x == -INF)):
        got, want = f(out), f(ref)
        assert torch.equal(got, want), (f"{what}: {name} at {int(got.sum())} places, expected {int(want.sum())}; "
                                        f"first mismatch {(got != want).nonzero()[:3].tolist()}")
    fin = torch.isfinite(ref)
    if fin.any():
        err = (out[fin] - ref[fin]).abs().max().item()
        assert err <= atol, f"{what}: finite values differ by {err:.2e} > {atol}"


def assert_kernel_nonfinite(out, ref, atol, what, pattern, impl, poisons):
    """``assert_same_nonfinite``, except where the window kernel's partial blocks let a masked
    key's non-finite *value* through ``p @ v`` (``0 * NaN``, documented in
    kernels/block_sparse_attention.py): there the kernel may add NaN, but only in the output
    component of a poisoned value (where the oracle may be finite or inf), never a finite value
    where the oracle has a non-finite one."""
    window_kernel = impl == "triton" and isinstance(pattern, SlidingWindow) and pattern.tile is None
    if not window_kernel:
        return assert_same_nonfinite(out, ref, atol, what)
    allowed = torch.zeros_like(ref, dtype=torch.bool)  # [B, S, H, D] or [B, S, H] (lse: never)
    if ref.dim() == 4:
        for head, items in enumerate(poisons):
            for name, _, d, _ in items:
                if name == "v":
                    allowed[:, :, head, d] = True
    extra = torch.isnan(out.double()) & ~torch.isnan(ref)  # (an inf may become NaN: inf + 0 * -inf)
    assert not (extra & ~allowed).any(), f"{what}: NaN outside a poisoned value's component"
    assert_same_nonfinite(torch.where(extra, ref.to(out.dtype), out), ref, atol, what)


ATOL = {torch.float32: 2e-5, torch.float16: 4e-3}


# --- the oracle itself ----------------------------------------------------------------------


def test_ideal_is_sdpa_where_sdpa_reads_only_attended_keys():
    """Dense (SDPA reads every key, so no masking question arises): the oracle is SDPA exactly,
    NaN / inf included; with finite inputs it is SDPA with the boolean mask."""
    q, k, v, _ = make_inputs(LAYOUT, torch.float32)
    dense = torch.ones(LAYOUT.seq_len, LAYOUT.seq_len, dtype=torch.bool)
    sdpa = F.scaled_dot_product_attention(*(t.double().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    assert_same_nonfinite(sdpa, ideal(q, k, v, dense)[0], 1e-9, "dense SDPA")
    mask = pattern_mask(SlidingWindow((2, 3, 5)), LAYOUT)
    qc, kc, vc = (torch.randn(1, LAYOUT.seq_len, 2, 16) for _ in range(3))
    sdpa = F.scaled_dot_product_attention(*(t.double().transpose(1, 2) for t in (qc, kc, vc)), attn_mask=mask)
    assert_same_nonfinite(sdpa.transpose(1, 2), ideal(qc, kc, vc, mask)[0], 1e-9, "masked SDPA")


def test_masked_out_nan_never_leaks():
    """torch 2.13's SDPA adds a boolean mask as -inf, so a NaN key / value it masks out still makes
    rows NaN (NaN + -inf, 0 * NaN); diffattn never reads a masked-out key (documented semantics)."""
    layout, pattern = TokenLayout((1, 8, 8)), SlidingWindow((1, 3, 3))
    q, k, v = (torch.randn(1, layout.seq_len, 1, 16) for _ in range(3))
    k[0, 62, 0, 1] = NAN
    v[0, 63, 0, 0] = NAN  # bottom-right corner: token 0's window does not reach these
    assert not pattern_mask(pattern, layout)[0, 62:].any()
    out = diffattn.attention(q, k, v, pattern, layout=layout, impl="reference")
    assert out[0, 0].isfinite().all() and out[0, 63, 0].isnan().all()


# --- attention ----------------------------------------------------------------------------

STATIC = {"dense": (Dense(), LAYOUT, None), "window": (SlidingWindow((2, 3, 5)), LAYOUT, (64, 32)),
          "radial": (Radial(0.3, block=16), LAYOUT, (16, 16)), "tiled": (TILED, TILED_LAYOUT, None)}
TRITON = pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1")
STATIC_CASES = [pytest.param(*STATIC[name], dtype, impl, id=f"{name}-{impl}-{str(dtype)[6:]}",
                             marks=[TRITON] if impl == "triton" else [])
                for name in STATIC for impl in ("reference", "triton") for dtype in (torch.float32, torch.float16)
                if dtype == torch.float32 or name == "window" or impl == "reference"]


@pytest.mark.parametrize("pattern, layout, block, dtype, impl", STATIC_CASES)
def test_static_patterns_propagate_like_masked_attention(pattern, layout, block, dtype, impl):
    q, k, v, poisons = make_inputs(layout, dtype)
    out, lse = diffattn.attention(q, k, v, pattern, layout=layout, impl=impl, return_lse=True,
                                  block_size=block if impl == "triton" else None)
    ref_out, ref_lse = ideal(q, k, v, pattern_mask(pattern, layout))
    assert_kernel_nonfinite(out, ref_out, ATOL[dtype], f"{pattern!r} out", pattern, impl, poisons)
    assert_same_nonfinite(lse, ref_lse, 1e-3, f"{pattern!r} lse")
    assert out[:, :, -1].isfinite().all()  # the clean head


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_block_topk_propagates_like_its_selected_mask(dtype, impl):
    pattern = BlockTopK(density=0.3, block=16)
    q, k, v, poisons = make_inputs(LAYOUT, dtype)
    keep = diffattn.select_blocks(q, k, pattern, LAYOUT, impl=impl)
    out, lse = diffattn.attention(q, k, v, pattern, layout=LAYOUT, impl=impl, return_lse=True, selection=keep)
    ref_out, ref_lse = ideal(q, k, v, pattern_mask(pattern, LAYOUT, keep))
    assert_same_nonfinite(out, ref_out, ATOL[dtype], "BlockTopK out")
    assert_same_nonfinite(lse, ref_lse, 1e-3, "BlockTopK lse")
    # the selection rule makes a q / k poison reach exactly the rows dense attention poisons
    dense_out, _ = ideal(q, k, v, pattern_mask(Dense(), LAYOUT))
    for head, items in enumerate(poisons):
        if items and items[0][0] in "qk":
            assert torch.equal(out[:, :, head].isnan(), dense_out[:, :, head].isnan()), poisons[head]


@pytest.mark.parametrize("mode", [dict(density=0.25), dict(cdf=0.5)], ids=["topk", "cdf"])
def test_selection_keeps_non_finite_pooled_scores(mode):
    """A NaN / inf query makes its query block's pooled scores non-finite: that block keeps every
    key block; a NaN / inf key does the same for its key block's column. Kernel == reference."""
    pattern = BlockTopK(block=16, keep_diagonal=False, keep_sink=False, **mode)
    q, k, _, poisons = make_inputs(LAYOUT, torch.float32)
    keep = diffattn.select_blocks(q, k, pattern, LAYOUT, impl="reference")
    vs = LAYOUT.visual_start
    for head, items in enumerate(poisons):
        for name, token, _, _ in items:
            if name in "qk" and token >= vs:
                block = (token - vs) // 16
                kept = keep[0, head, block] if name == "q" else keep[0, head, :, block]
                assert kept.all(), (head, items)
    assert keep[0, -1].sum(-1).max() < keep.shape[-1]  # the clean head is still sparse
    if INTERPRET:
        assert torch.equal(diffattn.select_blocks(q, k, pattern, LAYOUT, impl="triton"), keep)


@pytest.mark.parametrize("impl", IMPLS)
def test_piecewise_nan_rows_are_dense_nan_rows(impl):
    """NaN anywhere: the rows dense attention makes NaN, and only those. Infinities are pooled in
    the block statistics: never finite where dense attention is non-finite."""
    pattern = Piecewise(density=0.3, block=16)
    q, k, v, poisons = make_inputs(LAYOUT, torch.float32)
    out = diffattn.attention(q, k, v, pattern, layout=LAYOUT, impl=impl)
    dense_out, _ = ideal(q, k, v, pattern_mask(Dense(), LAYOUT))
    for head, items in enumerate(poisons):
        got, want = out[:, :, head], dense_out[:, :, head]
        if all(math.isnan(value) for *_, value in items):
            assert torch.equal(got.isnan(), want.isnan()), items
        assert (~got.isfinite() | want.isfinite()).all(), items  # non-finite wherever dense is


@pytest.mark.parametrize("impl", IMPLS)
def test_rows_with_only_minus_inf_scores(impl):
    """All attended scores -inf: out 0 and lse -inf, as SDPA. A key block of -inf scores next to
    finite ones adds nothing (the kernel's running max must not turn it into NaN)."""
    layout = TokenLayout((1, 8, 8))
    q, k, v = (torch.randn(1, 64, 2, 16) for _ in range(3))
    q[..., 0] = -1.0
    k[0, :, 0, 0] = INF  # head 0: every score -inf
    k[0, :16, 1, 0] = INF  # head 1: the first key block (16 tokens) -inf, the rest finite
    for pattern in (Dense(), SlidingWindow((1, 5, 5))):
        out, lse = diffattn.attention(q, k, v, pattern, layout=layout, impl=impl, return_lse=True,
                                      block_size=(16, 16) if impl == "triton" else None)
        ref_out, ref_lse = ideal(q, k, v, pattern_mask(pattern, layout))
        assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0])) and (lse[:, :, 0] == -INF).all()
        sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        assert torch.equal(sdpa[:, 0], torch.zeros_like(sdpa[:, 0]))
        assert_same_nonfinite(out, ref_out, 2e-5, repr(pattern))
        assert_same_nonfinite(lse, ref_lse, 1e-4, repr(pattern))


@pytest.mark.parametrize("impl", IMPLS)
def test_padded_text_keys_never_leak(impl):
    """NaN keys and values in the text padding (``text_lens``) reach no row. Text last, and a
    visual length that is not a multiple of the block: the last visual key block runs into the
    text, so the kernels must not read past the visual keys there."""
    layout = TokenLayout((2, 5, 7), text_len=6, text_first=False)  # 70 visual tokens
    q, k, v = (torch.randn(1, layout.seq_len, 2, 16) for _ in range(3))
    k[:, 72:], v[:, 72:] = NAN, NAN  # text tokens 2..5 are padding
    text_lens = torch.tensor([2])
    for pattern in (Dense(), SlidingWindow((1, 3, 3)), BlockTopK(density=0.5, block=16), Piecewise(density=0.5, block=16)):
        out = diffattn.attention(q, k, v, pattern, layout=layout, impl=impl, text_lens=text_lens)
        assert out.isfinite().all(), pattern
    parts = attention_partials(q, k, v, SlidingWindow((1, 3, 3)), layout=layout, impl=impl, text_lens=text_lens)
    assert merge_partials(*parts, impl=impl)[0].isfinite().all()


# --- partials and their merge ---------------------------------------------------------------

PARTIAL_CASES = [(SlidingWindow((2, 3, 5)), LAYOUT, (64, 32)), (BlockTopK(density=0.3, block=16), LAYOUT, None),
                 (TILED, TILED_LAYOUT, None)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pattern, layout, block", PARTIAL_CASES, ids=["window", "topk", "tiled"])
def test_partials_and_merge_propagate(pattern, layout, block, impl):
    q, k, v, poisons = make_inputs(layout, torch.float32)
    block = block if impl == "triton" else None
    keep = None if pattern.static else diffattn.select_blocks(q, k, pattern, layout, impl=impl)
    o_in, l_in, o_ex, l_ex = attention_partials(q, k, v, pattern, layout=layout, impl=impl, block_size=block,
                                                selection=keep)
    inner = pattern_mask(pattern, layout, keep)
    visual = torch.zeros(layout.seq_len, dtype=torch.bool)
    visual[layout.visual_start : layout.visual_start + layout.num_visual] = True
    outer = ~inner & visual[:, None] & visual[None, :]
    for name, (o, lse), mask in (("internal", (o_in, l_in), inner), ("external", (o_ex, l_ex), outer)):
        ref_o, ref_l = ideal(q, k, v, mask)
        assert_kernel_nonfinite(o, ref_o, 2e-5, name, pattern, impl, poisons)
        assert_same_nonfinite(lse, ref_l, 1e-4, name + " lse")
    merged, lse = merge_partials(o_in, l_in, o_ex, l_ex, impl=impl)
    ref_o, ref_l = ideal(q, k, v, torch.ones_like(inner))
    assert_kernel_nonfinite(merged, ref_o, 2e-5, "merged", pattern, impl, poisons)
    assert_same_nonfinite(lse, ref_l, 1e-4, "merged lse")
    if pattern.static:  # the complement kernel (EXTERNAL) on its own, on the k and v poisons' heads
        heads = [1, 2, 6, 7]
        q, k, v = q[:, :, heads], k[:, :, heads], v[:, :, heads]
        o, lse = external_attention(q, k, v, pattern, layout=layout, impl=impl, block_size=block)
        assert_kernel_nonfinite(o, ideal(q, k, v, outer)[0], 2e-5, "external_attention", pattern, impl,
                                [poisons[h] for h in heads])


@pytest.mark.parametrize("impl", IMPLS)
def test_merge_propagates_nan_from_either_partial(impl):
    rows = [  # (lse_1, out_1, lse_2, out_2) -> (out, lse); out_* fill one row of D values
        ((0.0, 1.0), (-INF, NAN), (1.0, 0.0)),  # an empty partial's garbage is ignored
        ((-INF, NAN), (0.0, 2.0), (2.0, 0.0)),
        ((-INF, NAN), (-INF, NAN), (0.0, -INF)),  # both empty
        ((NAN, 1.0), (0.0, 2.0), (NAN, NAN)),  # a NaN lse
        ((0.0, 1.0), (NAN, 2.0), (NAN, NAN)),
        ((NAN, 1.0), (-INF, 2.0), (NAN, NAN)),
        ((INF, 1.0), (0.0, 2.0), (NAN, NAN)),  # +inf lse: ill-defined
        ((0.0, NAN), (0.0, 2.0), (NAN, math.log(2.0))),  # a NaN output
        ((0.0, 1.0), (-200.0, NAN), (NAN, 0.0)),  # a NaN output whose weight rounds to 0
        ((0.0, 1.0), (0.0, INF), (INF, math.log(2.0))),
        ((0.0, -INF), (0.0, INF), (NAN, math.log(2.0))),
    ]
    lse_1, lse_2 = (torch.tensor([r[i][0] for r in rows]).view(1, -1, 1) for i in (0, 1))
    out_1, out_2 = (torch.tensor([r[i][1] for r in rows]).view(1, -1, 1, 1).expand(1, -1, 1, 4).contiguous()
                    for i in (0, 1))
    out, lse = merge_partials(out_1, lse_1, out_2, lse_2, impl=impl)
    want_out = torch.tensor([r[2][0] for r in rows]).view(1, -1, 1, 1).expand_as(out).double()
    want_lse = torch.tensor([r[2][1] for r in rows]).view(1, -1, 1).double()
    assert_same_nonfinite(out, want_out, 1e-6, "merged out")
    assert_same_nonfinite(lse, want_lse, 1e-6, "merged lse")


# --- bad input --------------------------------------------------------------------------------

_L = TokenLayout((2, 4, 8), text_len=3)  # 67 tokens
_W, _TOPK = SlidingWindow((1, 3, 3)), BlockTopK(density=0.5, block=16)


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def _qkv(shape=(1, 67, 2, 16), dtype=torch.float32):
    return [_t(*shape, dtype=dtype) for _ in range(3)]


def _call(fn, q, k, v, pattern=_W, **kw):
    kw.setdefault("layout", _L)
    if fn == "attention":
        return diffattn.attention(q, k, v, pattern, **kw)
    if fn == "attention_partials":
        return attention_partials(q, k, v, pattern, **kw)
    if fn == "external_attention":
        return external_attention(q, k, v, pattern, **kw)
    layout = kw.pop("layout")
    return diffattn.select_blocks(q, k, _TOPK if pattern is _W else pattern, layout, **kw)


ENTRY_POINTS = ["attention", "attention_partials", "external_attention", "select_blocks"]
q0, k0, v0 = _qkv()
BAD = [  # (label, args, kwargs, exception, message pattern)
    ("S != layout", _qkv((1, 68, 2, 16)), {}, ValueError, r"q has S=68 tokens but .* has 67"),
    ("k shape", [q0, _t(1, 67, 3, 16), v0], {}, ValueError, r"same \[B, S, H, D\] shape.*\(1, 67, 3, 16\)"),
    ("k dtype", [q0, k0.half(), v0], {}, TypeError, r"share one dtype.*float16"),
    ("k device", [q0, k0.to("meta"), v0], {}, ValueError, r"one device.*meta"),
    ("3 dims", [q0[0], k0[0], v0[0]], {}, ValueError, r"q must be \[B, S, H, D\] \(4 dims\), got shape \(67, 2, 16\)"),
    ("not a tensor", [q0.tolist(), k0, v0], {}, TypeError, r"q must be a torch.Tensor, got list"),
    ("int dtype", [q0.int(), k0.int(), v0.int()], {}, TypeError, r"q has dtype torch.int32; allowed: float16, bfloat16, float32"),
    ("float64", [q0.double(), k0.double(), v0.double()], {}, TypeError, r"torch.float64; allowed"),
    ("D = 0", _qkv((1, 67, 2, 0)), {}, ValueError, r"head dim D=0 is not supported; allowed: 1 <= D <= 256"),
    ("D > 256", _qkv((1, 67, 1, 264)), {}, ValueError, r"head dim D=264 is not supported; allowed: 1 <= D <= 256"),
    ("pattern", [q0, k0, v0, "window"], {}, TypeError, r"pattern must be a diffattn pattern .* got str"),
    ("layout", [q0, k0, v0], {"layout": (2, 4, 8)}, TypeError, r"layout must be a diffattn.TokenLayout, got tuple"),
    ("scale NaN", [q0, k0, v0], {"scale": NAN}, ValueError, r"scale must be a finite number .* got nan"),
    ("scale str", [q0, k0, v0], {"scale": "0.1"}, ValueError, r"scale must be a finite number .* got '0.1'"),
    ("impl", [q0, k0, v0], {"impl": "cuda"}, ValueError, r"impl must be one of \('auto', 'triton', 'reference'\), got 'cuda'"),
]


@pytest.mark.parametrize("fn", ENTRY_POINTS)
@pytest.mark.parametrize("label, args, kwargs, exc, match", BAD, ids=[b[0] for b in BAD])
def test_bad_tensor_arguments(fn, label, args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        _call(fn, *args, **kwargs)


ATTENTION_ONLY_BAD = [  # entry points with text_lens / block_size / selection
    ("block not a power of two", {"block_size": (48, 16)}, ValueError, r"block_q must be a power of two between 16 and 256, got 48"),
    ("block too small", {"block_size": (32, 8)}, ValueError, r"block_k must be a power of two between 16 and 256, got 8"),
    ("block not a pair", {"block_size": 32}, ValueError, r"block_size must be \(block_q, block_k\), got 32"),
    ("text_lens shape", {"text_lens": torch.tensor([1, 2])}, ValueError, r"text_lens must be \[B=1\] on cpu, got \(2,\)"),
    ("text_lens value", {"text_lens": torch.tensor([5])}, ValueError, r"text_lens must lie in \[0, text_len=3\], got \[5\]"),
    ("text_lens negative", {"text_lens": torch.tensor([-1])}, ValueError, r"text_lens must lie in \[0, text_len=3\]"),
    ("text_lens float", {"text_lens": torch.tensor([1.0])}, TypeError, r"text_lens must be an int32/int64 tensor \[B\]"),
    ("selection for a static pattern", {"selection": torch.ones(1, 2, 4, 4, dtype=torch.bool)}, ValueError,
     r"selection is for dynamic patterns .* SlidingWindow is static"),
]


@pytest.mark.parametrize("fn", ["attention", "attention_partials"])
@pytest.mark.parametrize("label, kwargs, exc, match", ATTENTION_ONLY_BAD, ids=[b[0] for b in ATTENTION_ONLY_BAD])
def test_bad_call_options(fn, label, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        _call(fn, q0, k0, v0, **kwargs)


@pytest.mark.parametrize("fn", ["attention", "attention_partials", "external_attention"])
def test_bad_selection_and_pattern_fit(fn):
    with pytest.raises(ValueError, match=r"selection must be a bool tensor of shape \[B, H, NQ, NK\] = \(1, 2, 4, 4\), "
                                         r"got torch.bool \(1, 2, 3, 3\)"):
        _call(fn, q0, k0, v0, _TOPK, selection=torch.ones(1, 2, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"selection must be a bool tensor .* got torch.int64"):
        _call(fn, q0, k0, v0, _TOPK, selection=torch.ones(1, 2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"selection must be on q's device cpu, got meta"):
        _call(fn, q0, k0, v0, _TOPK, selection=torch.ones(1, 2, 4, 4, dtype=torch.bool, device="meta"))
    with pytest.raises(ValueError, match=r"window\[0\]=3 .* grid axis 0 has 2; allowed: window \* dilation <= 2"):
        _call(fn, q0, k0, v0, SlidingWindow((3, 3, 3)))


def test_select_blocks_needs_a_dynamic_pattern():
    with pytest.raises(ValueError, match=r"SlidingWindow is static.*select_blocks takes a dynamic pattern"):
        diffattn.select_blocks(q0, k0, _W, _L)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(0, 67, 2, 16), (1, 67, 0, 16)], ids=["B=0", "H=0"])
def test_empty_batch_or_heads_give_empty_results(shape, impl):
    """As torch's SDPA: an empty batch (or no heads) is an empty result, not an error."""
    q, k, v = _qkv(shape)
    sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    assert sdpa.numel() == 0
    for pattern in (_W, _TOPK, Piecewise(density=0.5, block=16), Dense()):
        out, lse = diffattn.attention(q, k, v, pattern, layout=_L, impl=impl, return_lse=True)
        assert out.shape == q.shape and lse.shape == q.shape[:3] and lse.dtype == torch.float32
    keep = diffattn.select_blocks(q, k, _TOPK, _L, impl=impl)
    assert keep.shape == (shape[0], shape[2], 4, 4) and keep.dtype == torch.bool
    parts = attention_partials(q, k, v, _W, layout=_L, impl=impl, text_lens=torch.zeros(shape[0], dtype=torch.long))
    assert [tuple(t.shape) for t in parts] == [shape, shape[:3], shape, shape[:3]]
    assert external_attention(q, k, v, _TOPK, layout=_L, impl=impl)[0].shape == shape
    merged, lse = merge_partials(*parts, impl=impl)
    assert merged.shape == shape and lse.shape == shape[:3]


_O, _LSE = _t(1, 67, 2, 16), _t(1, 67, 2)
MERGE_BAD = [
    ("out shapes", (_O, _LSE, _t(1, 67, 3, 16), _LSE), ValueError, r"out_1 and out_2 must have one shape .* \(1, 67, 3, 16\)"),
    ("lse shape", (_O, _LSE, _O, _t(1, 67, 3)), ValueError, r"lse_2 must be \[B, S, H\] = \(1, 67, 2\) .* got \(1, 67, 3\)"),
    ("lse with D", (_O, _O, _O, _LSE), ValueError, r"lse_1 must be \[B, S, H\] = \(1, 67, 2\)"),
    ("3 dims", (_O[0], _LSE[0], _O[0], _LSE[0]), ValueError, r"out_1 must be \[B, S, H, D\] \(4 dims\), got shape \(67, 2, 16\)"),
    ("int out", (_O.int(), _LSE, _O, _LSE), TypeError, r"out_1 has dtype torch.int32; allowed: floating-point dtypes"),
    ("int lse", (_O, _LSE, _O, _LSE.long()), TypeError, r"lse_2 has dtype torch.int64; allowed: floating-point"),
    ("not a tensor", (_O, _LSE.tolist(), _O, _LSE), TypeError, r"lse_1 must be a torch.Tensor, got list"),
    ("devices", (_O, _LSE, _O.to("meta"), _LSE), ValueError, r"must be on one device, got cpu, cpu, meta, cpu"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("label, args, exc, match", MERGE_BAD, ids=[b[0] for b in MERGE_BAD])
def test_merge_partials_bad_input(label, args, exc, match, impl):
    with pytest.raises(exc, match=match):
        merge_partials(*args, impl=impl)


def test_merge_partials_accepts_mixed_float_dtypes():
    """The step cache merges a fresh bf16 / fp16 partial with a stored fp32 one."""
    out, lse = merge_partials(_O.half(), _LSE, _O, _LSE.half())
    assert out.dtype == torch.float16 and lse.dtype == torch.float32
