"""diffattn on LTX-2: a tiny random-weight LTX2VideoTransformer3DModel (saved and loaded back): the
video self-attention sparse, the audio and cross-modal attentions untouched; STG perturbation, split
RoPE with gated attention (LTX-2.3), appended keyframe tokens, a self-attention mask, and the
released shape on the meta device."""

import inspect

import pytest
import torch
from diffusers import LTX2VideoTransformer3DModel
from diffusers.models.transformers.transformer_ltx2 import LTX2AudioVideoAttnProcessor, LTX2PerturbedAttnProcessor

import diffattn
from diffattn import Dense, Radial, SlidingWindow, TokenLayout
from diffattn.integration.families.ltx2 import ADAPTER, LTX2SparseProcessor, grid_from_coords

GRID = (3, 4, 5)
CONFIG = dict(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=16,
              cross_attention_dim=32, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
              audio_attention_head_dim=8, audio_cross_attention_dim=16, num_layers=2, caption_channels=16,
              base_height=256, base_width=256)
NAMES = ["transformer_blocks.0.attn1.processor", "transformer_blocks.1.attn1.processor"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.manual_seed(0)
    built = LTX2VideoTransformer3DModel(**CONFIG)
    path = tmp_path_factory.mktemp("ltx2") / "transformer"
    built.save_pretrained(path)
    return LTX2VideoTransformer3DModel.from_pretrained(path).eval()


def make_inputs(extra=0, seed=1):
    gen = torch.Generator().manual_seed(seed)
    f, h, w = GRID
    return dict(hidden_states=torch.randn(1, f * h * w + extra, 8, generator=gen),
                audio_hidden_states=torch.randn(1, 7, 4, generator=gen),
                encoder_hidden_states=torch.randn(1, 5, 16, generator=gen),
                audio_encoder_hidden_states=torch.randn(1, 5, 16, generator=gen), timestep=torch.tensor([500.0]),
                encoder_attention_mask=torch.tensor([[1, 1, 1, 0, 0]]),
                audio_encoder_attention_mask=torch.tensor([[1, 1, 1, 0, 0]]),
                num_frames=f, height=h, width=w, audio_num_frames=7)


@pytest.fixture
def inputs():
    return make_inputs()


@torch.no_grad()
def run(model, inputs):
    out = model(**inputs)
    return out.sample, out.audio_sample


def test_processor_declares_diffusers_parameters():
    ours = list(inspect.signature(LTX2SparseProcessor.__call__).parameters)
    assert ours == list(inspect.signature(LTX2PerturbedAttnProcessor.__call__).parameters)
    assert set(inspect.signature(LTX2AudioVideoAttnProcessor.__call__).parameters) <= set(ours)


@torch.no_grad()
def test_dense_is_bit_exact_and_remove_restores(model, inputs):
    video, audio = run(model, inputs)
    before = model.attn_processors
    handle = diffattn.apply(model, Dense())
    assert handle.family == "ltx2" and handle.replaced["transformer"] == NAMES
    procs = model.attn_processors
    untouched = [n for n in procs if n not in NAMES]
    assert all(procs[n] is before[n] for n in untouched)  # audio, text and audio<->video attention
    out = run(model, inputs)
    assert torch.equal(out[0], video) and torch.equal(out[1], audio)
    assert handle.states["transformer"].layout == TokenLayout(GRID)
    diffattn.apply(model, SlidingWindow((1, 3, 3)))
    assert not torch.allclose(run(model, inputs)[0], video)
    diffattn.remove(model)
    assert all(model.attn_processors[n] is p for n, p in before.items())
    out = run(model, inputs)
    assert torch.equal(out[0], video) and torch.equal(out[1], audio)


@torch.no_grad()
def test_window_covering_the_grid_matches_default(model, inputs):
    video, audio = run(model, inputs)
    diffattn.apply(model, SlidingWindow(GRID))
    out = run(model, inputs)
    torch.testing.assert_close(out[0], video, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], audio, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_small_window_is_finite_and_differs(model, inputs):
    video, _ = run(model, inputs)
    diffattn.apply(model, SlidingWindow((1, 3, 3), stride=(1, 1, 2)))
    out = run(model, inputs)[0]
    assert torch.isfinite(out).all() and (out - video).abs().max() > 1e-3


@torch.no_grad()
def test_appended_keyframe_tokens_are_dense(model):
    """LTX2ConditionPipeline appends keyframe tokens (with their own coords) after the grid."""
    inputs = make_inputs(extra=4)
    grid_coords = model.rope.prepare_video_coords(1, *GRID, device="cpu")
    inputs["video_coords"] = torch.cat([grid_coords, grid_coords[:, :, :4]], dim=2)
    video, _ = run(model, inputs)
    handle = diffattn.apply(model, SlidingWindow(GRID))
    torch.testing.assert_close(run(model, inputs)[0], video, atol=1e-5, rtol=1e-5)
    assert handle.states["transformer"].layout == TokenLayout(GRID, text_len=4, text_first=False)
    diffattn.apply(model, SlidingWindow((1, 3, 3)))
    assert torch.isfinite(run(model, inputs)[0]).all()


@torch.no_grad()
def test_self_attention_mask_runs_dense(model, inputs):
    """IC-LoRA's video_self_attention_mask (an additive bias after diffusers' conversion) is no text
    padding: those calls run diffusers' dense masked attention."""
    mask = torch.ones(1, 60, 60)
    mask[:, :, 40:] = 0.5
    masked = dict(inputs, video_self_attention_mask=mask)
    video, _ = run(model, masked)
    diffattn.apply(model, SlidingWindow((1, 3, 3)))
    assert torch.equal(run(model, masked)[0], video)


@torch.no_grad()
def test_stg_split_rope_and_gated_attention():
    """LTX-2.3-style: perturbed processors (STG), split RoPE, per-head gates."""
    torch.manual_seed(0)
    model = LTX2VideoTransformer3DModel(**CONFIG, perturbed_attn=True, rope_type="split", gated_attn=True).eval()
    assert type(model.attn_processors[NAMES[0]]) is LTX2PerturbedAttnProcessor
    inputs = dict(make_inputs(), spatio_temporal_guidance_blocks=[1], perturbation_mask=torch.tensor([0.0]))
    plain = make_inputs()
    bases = [run(model, x)[0] for x in (inputs, plain)]
    diffattn.apply(model, Dense())
    assert all(torch.equal(run(model, x)[0], b) for x, b in zip((inputs, plain), bases))
    diffattn.apply(model, SlidingWindow(GRID))
    for x, b in zip((inputs, plain), bases):
        torch.testing.assert_close(run(model, x)[0], b, atol=1e-5, rtol=1e-5)
    diffattn.remove(model)


def test_grid_from_coords():
    model_rope = LTX2VideoTransformer3DModel(**CONFIG).rope
    coords = model_rope.prepare_video_coords(1, *GRID, device="cpu")
    assert grid_from_coords(coords, 60) == (GRID, 60)
    extra = torch.cat([coords, coords[:, :, :4]], dim=2)
    assert grid_from_coords(extra, 64) == (GRID, 60)
    assert grid_from_coords(coords[:, :, torch.arange(59, -1, -1)], 60) is None  # reversed: no raster grid
    layout = ADAPTER.token_layout(None, (), {"hidden_states": torch.zeros(1, 64, 8), "video_coords": extra})
    assert layout == TokenLayout(GRID, text_len=4, text_first=False)


def test_timestep_is_the_largest_token_timestep():
    assert float(ADAPTER.timestep((), {"timestep": torch.tensor([[0.0, 700.0, 700.0]])})) == 700.0


def test_released_shape_on_meta():
    with torch.device("meta"):
        model = LTX2VideoTransformer3DModel(num_layers=2)  # LTX-2 19B layout, two blocks
    handle = diffattn.apply(model, SlidingWindow((7, None, None)), dense_layers=1)
    assert handle.replaced["transformer"] == NAMES
    diffattn.remove(model)
