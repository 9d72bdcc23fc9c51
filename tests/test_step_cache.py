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
from diffattn.pipelines.embedded import EMBEDDED_TRANSFORMER_CONFIG

SETTINGS = dict(height=128, width=128, num_frames=17, num_inference_steps=8, guidance_scale=5.0,
                max_sequence_length=16, output_type="np")
PATTERN = SlidingWindow((1, 3, 3))
HEADS = EMBEDDED_TRANSFORMER_CONFIG["num_attention_heads"]


@pytest.fixture(scope="module")
def pipe():
    return build_embedded_wan_pipeline(seed=0, random_weights=True)


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
    assert peak == 8 * (320 * HEADS * 32 * 4 + 320 * HEADS * 4)


def test_store_dtype_and_offload(pipe, dense):
    handle = diffattn.apply(pipe, PATTERN, cache=StepCache(refresh_every=3, store_dtype=torch.bfloat16, offload=True))
    out = generate(pipe)
    peak = handle.peak_cache_bytes()
    diffattn.remove(pipe)
    assert peak == 8 * (320 * HEADS * 32 * 2 + 320 * HEADS * 4)  # bf16 output, fp32 lse
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
    assert record["cache"]["memory_bytes"] == 8 * (48 * HEADS * 32 * 2 + 48 * HEADS * 4)


def test_light_mode_stores_only_the_mass(pipe, dense):
    handle = diffattn.apply(pipe, PATTERN, cache=StepCache(refresh_every=3, light=True))
    out = generate(pipe)
    peak = handle.peak_cache_bytes()
    diffattn.remove(pipe)
    assert peak == 8 * (320 * HEADS * 4)  # lse only: [1, 320, heads] fp32 per layer and branch
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


def test_gates_read_the_device_once_per_forward():
    """With the drift gates on, one device-to-host read per transformer forward: the flags of every
    layer are read with the timestep before the forward (never inside it), and flagged heads are
    refreshed at the layer's next call. Counted with the torch profiler (item / nonzero) plus the
    state's own count of flag reads (a ``tolist`` the profiler does not list), kernels stubbed."""
    import importlib.util
    from pathlib import Path

    from torch.profiler import ProfilerActivity, profile

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "host_overhead.py"
    spec = importlib.util.spec_from_file_location("host_overhead", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    torch.manual_seed(0)
    model = WanTransformer3DModel(**{k: list(v) if isinstance(v, list) else v
                                     for k, v in EMBEDDED_TRANSFORMER_CONFIG.items()}).eval()
    x, text = torch.randn(1, 16, 2, 16, 16), torch.randn(1, 8, 384)
    cache = StepCache(refresh_every=8, lse_gate=0.0, cosine_gate=1.0)
    with torch.no_grad(), bench.kernels_stubbed(True):
        for measured in (False, True):  # the first run builds the block layouts (once per call site)
            handle = diffattn.apply(model, PATTERN, impl="triton", cache=cache)
            (state,) = handle.states.values()
            reads, flag_reads = [], []
            for t in (999.0, 900.0, 800.0, 700.0):
                before = state.drift_reads
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    model(x, torch.tensor([t]), text)
                # a read shows as aten::_local_scalar_dense (under item / is_nonzero) or aten::nonzero
                syncs = sum(event.name in ("aten::_local_scalar_dense", "aten::nonzero") for event in prof.events())
                reads.append(syncs + state.drift_reads - before)
                flag_reads.append(state.drift_reads - before)
            refreshed = state.head_refreshes
            diffattn.remove(model)
    assert reads == [1, 1, 1, 1]  # the timestep alone, or the timestep with the flags
    # step 0 refreshes; step 1 reuses and flags heads (gates at 0: every head drifts); steps 2 and 3
    # read the flags and refresh the flagged heads
    assert flag_reads == [0, 0, 1, 1]
    assert refreshed > 0


def test_bare_transformer_forgets_the_cache_when_a_new_generation_starts():
    """Applied to a bare transformer (no pipeline resets the state), a rising timestep starts a new
    generation: the second generation computes what a fresh handle computes, not the first one's
    cached external partials."""
    torch.manual_seed(0)
    model = WanTransformer3DModel(**{k: list(v) if isinstance(v, list) else v
                                     for k, v in EMBEDDED_TRANSFORMER_CONFIG.items()}).eval()
    text = torch.randn(1, 8, 384)
    first, second = torch.randn(1, 16, 2, 8, 8), torch.randn(1, 16, 2, 8, 8)

    def run(x):
        return [model(x, torch.tensor([t]), text, return_dict=False)[0] for t in (999.0, 700.0, 400.0)]

    with torch.no_grad():
        diffattn.apply(model, PATTERN, cache=StepCache(refresh_every=3))
        run(first)
        again = run(second)
        diffattn.remove(model)
        diffattn.apply(model, PATTERN, cache=StepCache(refresh_every=3))
        fresh = run(second)
        diffattn.remove(model)
    for a, b in zip(again, fresh):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
