"""The cross-step attention cache (diffattn.StepCache) on the tiny Wan pipeline and transformer."""

import json

import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel

import diffattn
from diffattn import Piecewise, SlidingWindow, StepCache
from diffattn.integration.step_cache import parse_step_cache
from diffattn.pipelines import build_embedded_wan_pipeline

SETTINGS = dict(height=128, width=128, num_frames=17, num_inference_steps=8, guidance_scale=5.0,
                max_sequence_length=16, output_type="np")
PATTERN = SlidingWindow((1, 3, 3))


@pytest.fixture(scope="module")
def pipe():
    return build_embedded_wan_pipeline(seed=0)


def generate(pipe, callback=None):
    return pipe("a fox", generator=torch.Generator().manual_seed(0), callback_on_step_end=callback, **SETTINGS).frames[0]


@pytest.fixture(scope="module")
def dense(pipe):
    return generate(pipe)


def err(x, ref):
    return float(np.abs(x - ref).mean())


def test_refresh_every_step_is_dense(pipe, dense):
    diffattn.apply(pipe, PATTERN, cache=StepCache(refresh_every=1))
    out = generate(pipe)
    diffattn.remove(pipe)
    np.testing.assert_allclose(out, dense, atol=1e-5)


def test_reuse_beats_the_plain_pattern_and_is_repeatable(pipe, dense):
    diffattn.apply(pipe, PATTERN)
    sparse = generate(pipe)
    handle = diffattn.apply(pipe, PATTERN, cache=StepCache(refresh_every=3))
    cached, again = generate(pipe), generate(pipe)
    diffattn.remove(pipe)
    assert np.array_equal(cached, again)  # the cache is reset for every generation
    assert err(cached, dense) < 0.5 * err(sparse, dense)  # at least 2x closer to dense
    assert handle.cache_bytes() == 0  # nothing left behind after the generation


def test_gates_refresh_heads_and_lower_the_error(pipe, dense):
    diffattn.apply(pipe, PATTERN, cache=StepCache(refresh_every=4))
    plain = generate(pipe)
    handle = diffattn.apply(pipe, PATTERN, cache=StepCache(refresh_every=4, lse_gate=0.01, cosine_gate=0.99))
    refreshed = []
    gated = generate(pipe, lambda p, i, t, kw: refreshed.append(handle.states["transformer"].head_refreshes) or {})
    diffattn.remove(pipe)
    assert refreshed[-1] > 0
    assert err(gated, dense) <= err(plain, dense)


def test_branches_are_separate_and_memory_is_accounted(pipe):
    handle = diffattn.apply(pipe, PATTERN, cache=StepCache(refresh_every=3))
    seen = []

    def look(p, i, t, kw):
        state = handle.states["transformer"]
        seen.append((sorted(state.cache), handle.cache_bytes(),
                     sum(e.out_ext.numel() * e.out_ext.element_size() + e.lse_ext.numel() * 4 for e in state.cache.values())))
        return {}

    generate(pipe, look)
    peak = handle.peak_cache_bytes()
    diffattn.remove(pipe)
    keys, held, counted = seen[0]
    assert keys == sorted((layer, branch) for layer in range(4) for branch in ("cond", "uncond"))
    assert held == counted > 0
    # 4 layers x 2 branches x (out [1, 320, 2, 32] fp32 + lse [1, 320, 2] fp32)
    assert peak == 8 * (320 * 2 * 32 * 4 + 320 * 2 * 4)


def test_store_dtype_and_offload(pipe, dense):
    handle = diffattn.apply(pipe, PATTERN, cache=StepCache(refresh_every=3, store_dtype=torch.bfloat16, offload=True))
    out = generate(pipe)
    peak = handle.peak_cache_bytes()
    diffattn.remove(pipe)
    assert peak == 8 * (320 * 2 * 32 * 2 + 320 * 2 * 4)  # bf16 output, fp32 lse
    assert err(out, dense) < 1e-3


@torch.no_grad()
def test_resolution_change_invalidates():
    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                  out_channels=4, text_dim=8, freq_dim=8, ffn_dim=32, num_layers=2,
                                  rope_max_seq_len=32).eval()
    handle = diffattn.apply(model, PATTERN, cache=StepCache(refresh_every=10))
    enc = torch.randn(1, 5, 8)
    state = handle.states["transformer"]
    model(torch.randn(1, 4, 3, 8, 10), torch.tensor([900]), enc)
    first = state.cache[(0, None)].key
    out = model(torch.randn(1, 4, 2, 12, 6), torch.tensor([800]), enc).sample  # new size, same generation
    assert out.shape == (1, 4, 2, 12, 6) and torch.isfinite(out).all()
    assert state.cache[(0, None)].key != first and state.cache[(0, None)].step == 1
    diffattn.remove(model)


def test_invalid_configurations(pipe):
    with pytest.raises(ValueError, match="refresh_every"):
        StepCache(refresh_every=0)
    with pytest.raises(ValueError, match="store_dtype"):
        StepCache(store_dtype=torch.int8)
    with pytest.raises(ValueError, match="cosine_gate"):
        StepCache(cosine_gate=1.5)
    with pytest.raises(TypeError, match="StepCache"):
        diffattn.apply(pipe, PATTERN, cache={"refresh_every": 3})
    with pytest.raises(ValueError, match="Piecewise"):
        diffattn.apply(pipe, Piecewise(0.5), cache=StepCache())
    assert parse_step_cache("refresh_every=2,offload=true").offload is True
    with pytest.raises(ValueError, match="unknown cache option"):
        parse_step_cache("speed=3")


def test_generate_with_cache_reports_memory(tmp_path, capsys):
    from diffattn.cli import main

    out = tmp_path / "fox.mp4"
    assert main(["generate", "--size", "64x64", "--frames", "9", "--steps", "3", "--method", "window:1x3x3",
                 "--cache", "refresh_every=2,store_dtype=bfloat16", "--out", str(out), "--no-progress"]) == 0
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["cache"]["enabled"] and record["cache"]["config"]["store_dtype"] == "bfloat16"
    # 4 layers x 2 branches x (out [1, 48, 2, 32] bf16 + lse [1, 48, 2] fp32)
    assert record["cache"]["memory_bytes"] == 8 * (48 * 2 * 32 * 2 + 48 * 2 * 4)


def test_light_mode_stores_only_the_mass(pipe, dense):
    handle = diffattn.apply(pipe, PATTERN, cache=StepCache(refresh_every=3, light=True))
    out = generate(pipe)
    peak = handle.peak_cache_bytes()
    diffattn.remove(pipe)
    assert peak == 8 * (320 * 2 * 4)  # lse only: [1, 320, 2] fp32 per layer and branch
    assert np.isfinite(out).all()


def test_dynamic_selection_stays_with_its_stored_external_part():
    """BlockTopK under the cache: a reuse step attends the blocks selected at the refresh, whose
    complement is the stored external partial, even when the data would select others now."""
    import torch

    from diffattn import BlockTopK, TokenLayout
    from diffattn.attention import attention, select_blocks
    from diffattn.integration import GenerationState, Schedule, SparseAttentionCore
    from diffattn.partials import attention_partials, merge_partials

    layout = TokenLayout((2, 4, 8))
    pattern = BlockTopK(density=0.34, block=16)
    state = GenerationState(layout=layout)
    core = SparseAttentionCore(pattern, Schedule(), 0, state, "reference", StepCache(refresh_every=2))
    gen = torch.Generator().manual_seed(0)
    qkv = [[torch.randn(1, layout.seq_len, 2, 16, generator=gen) for _ in range(3)] for _ in range(2)]
    outs = []
    for step, (q, k, v) in enumerate(qkv):
        state.step = step
        outs.append(core.attend(q, k, v))
    (q0, k0, v0), (q1, k1, v1) = qkv
    refresh_sel = select_blocks(q0, k0, pattern, layout)
    assert not torch.equal(refresh_sel, select_blocks(q1, k1, pattern, layout))  # the data moved
    _, _, out_ex, lse_ex = attention_partials(q0, k0, v0, pattern, layout=layout, impl="reference",
                                              selection=refresh_sel)
    out_in, lse_in = attention(q1, k1, v1, pattern, layout=layout, impl="reference", return_lse=True,
                               selection=refresh_sel)
    torch.testing.assert_close(outs[1], merge_partials(out_in, lse_in, out_ex, lse_ex)[0])
    entry = next(iter(state.cache.values()))
    assert torch.equal(entry.selection, refresh_sel) and entry.nbytes >= refresh_sel.numel()
