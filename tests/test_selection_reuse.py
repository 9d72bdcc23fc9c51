"""Reusing dynamic block selections across denoising steps (apply(..., selection_every=k))."""

import numpy as np
import pytest
import torch

import diffattn
from diffattn import BlockTopK, Dense, Piecewise, TokenLayout
from diffattn.pipelines import build_embedded_wan_pipeline
from diffattn.testing import structured_qkv

SETTINGS = dict(height=128, width=128, num_frames=9, num_inference_steps=6, guidance_scale=5.0,
                max_sequence_length=16, output_type="np")


@pytest.fixture(scope="module")
def pipe():
    return build_embedded_wan_pipeline(seed=0)


def generate(pipe, callback=None):
    return pipe("a fox", generator=torch.Generator().manual_seed(0), callback_on_step_end=callback, **SETTINGS).frames[0]


@pytest.mark.parametrize("pattern", [BlockTopK(density=0.25, block=16), Piecewise(0.25, block=16)], ids=["topk", "piecewise"])
def test_selection_every_reuses_per_layer_and_branch(pipe, pattern):
    handle = diffattn.apply(pipe, pattern, selection_every=3)
    state = handle.states["transformer"]
    seen = []
    out = generate(pipe, lambda p, i, t, kw: seen.append({k: v[0] for k, v in state.selections.items()}) or {})
    again = generate(pipe)
    diffattn.apply(pipe, pattern)
    fresh = generate(pipe)
    diffattn.remove(pipe)
    assert np.array_equal(out, again)  # state resets between generations
    assert not np.array_equal(out, fresh)  # reuse changes the result a little
    assert np.abs(out - fresh).mean() < 0.05
    # selections were made at steps 0 and 3 only, separately for the cond and uncond calls
    assert [sorted(set(s.values())) for s in seen] == [[0], [0], [0], [3], [3], [3]]
    assert {branch for (_, branch) in seen[0]} == {"cond", "uncond"}


def test_selection_argument_reuses_blocks():
    layout = TokenLayout((3, 8, 8), text_len=4)
    q, k, v = structured_qkv(layout, batch=2, heads=2, head_dim=16)
    pattern = BlockTopK(density=0.3, block=16)
    keep = diffattn.select_blocks(q, k, pattern, layout)
    assert keep.shape == (2, 2, 12, 12) and keep.dtype == torch.bool
    torch.testing.assert_close(diffattn.attention(q, k, v, pattern, layout=layout, selection=keep),
                               diffattn.attention(q, k, v, pattern, layout=layout))
    with pytest.raises(ValueError, match="selection must be a bool tensor"):
        diffattn.attention(q, k, v, pattern, layout=layout, selection=keep[:, :1])
    with pytest.raises(ValueError, match="static"):
        diffattn.select_blocks(q, k, Dense(), layout)


def test_selection_every_validation(pipe):
    with pytest.raises(ValueError, match="selection_every"):
        diffattn.apply(pipe, BlockTopK(density=0.5), selection_every=0)
