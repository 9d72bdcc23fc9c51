"""diffattn on SkyReels-V2: a tiny random-weight SkyReelsV2Transformer3DModel (saved and loaded back),
diffusion forcing (per-frame timesteps, the block-causal mask) and the released layout on the meta
device. SkyReels-V2 shares Wan's processor."""

import warnings

import pytest
import torch
from diffusers import SkyReelsV2Transformer3DModel
from diffusers.models.transformers.transformer_skyreels_v2 import SkyReelsV2AttnProcessor

import diffattn
from diffattn import Dense, Radial, SlidingWindow, TokenLayout
from diffattn.integration.families.wan import WanSparseProcessor

CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
              text_dim=8, freq_dim=8, ffn_dim=32, num_layers=2, rope_max_seq_len=32)
NAMES = ["blocks.0.attn1.processor", "blocks.1.attn1.processor"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.manual_seed(0)
    built = SkyReelsV2Transformer3DModel(**CONFIG)
    path = tmp_path_factory.mktemp("skyreels_v2") / "transformer"
    built.save_pretrained(path)
    return SkyReelsV2Transformer3DModel.from_pretrained(path).eval()


@pytest.fixture(autouse=True)
def one_frame_per_block(request):
    """Tests that set the diffusion-forcing block size put it back (diffattn is removed by conftest)."""
    yield
    if "model" in request.fixturenames:
        request.getfixturevalue("model").register_to_config(num_frame_per_block=1)


@pytest.fixture
def inputs():
    gen = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(1, 4, 4, 8, 10, generator=gen), timestep=torch.tensor([500]),
                encoder_hidden_states=torch.randn(1, 5, 8, generator=gen))


@torch.no_grad()
def run(model, inputs):
    return model(**inputs).sample


@torch.no_grad()
def test_dense_is_bit_exact_and_remove_restores(model, inputs):
    base = run(model, inputs)
    before = model.attn_processors
    handle = diffattn.apply(model, Dense())
    assert handle.family == "wan" and handle.replaced["transformer"] == NAMES
    assert all(isinstance(model.attn_processors[n], WanSparseProcessor) for n in NAMES)
    assert type(model.attn_processors["blocks.0.attn2.processor"]) is SkyReelsV2AttnProcessor
    assert torch.equal(run(model, inputs), base)
    assert handle.states["transformer"].layout == TokenLayout((4, 4, 5))
    diffattn.apply(model, SlidingWindow((1, 3, 3)))
    assert not torch.allclose(run(model, inputs), base)
    diffattn.remove(model)
    assert all(model.attn_processors[n] is p for n, p in before.items())
    assert torch.equal(run(model, inputs), base)


@torch.no_grad()
def test_window_covering_the_grid_matches_default(model, inputs):
    base = run(model, inputs)
    diffattn.apply(model, SlidingWindow((4, 4, 5)))
    torch.testing.assert_close(run(model, inputs), base, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_small_window_is_finite_and_differs(model, inputs):
    base = run(model, inputs)
    diffattn.apply(model, SlidingWindow((1, 3, 3), stride=(1, 1, 2)))
    out = run(model, inputs)
    assert torch.isfinite(out).all() and (out - base).abs().max() > 1e-3


@torch.no_grad()
def test_diffusion_forcing_per_frame_timesteps(model, inputs):
    """Synchronous diffusion forcing: per-frame timesteps [B, F] (prefix frames at 0). The pattern
    applies; the step comes from the largest frame timestep."""
    x, enc = inputs["hidden_states"], inputs["encoder_hidden_states"]
    frame_ts = [torch.tensor([[0, t, t, t]]) for t in (900, 600, 300)]
    bases = [model(x, t, enc, enable_diffusion_forcing=True).sample for t in frame_ts]
    handle = diffattn.apply(model, SlidingWindow((4, 4, 5)))
    state = handle.states["transformer"]
    for i, (t, base) in enumerate(zip(frame_ts, bases)):
        out = model(x, t, enc, enable_diffusion_forcing=True).sample
        torch.testing.assert_close(out, base, atol=1e-5, rtol=1e-5)
        assert (state.step, state.timestep) == (i, float(t.max()))  # not the prefix frame's 0


@torch.no_grad()
def test_block_causal_mask_runs_dense_with_a_warning(model, inputs):
    """num_frame_per_block > 1: diffusers' block-causal mask; diffattn leaves those calls dense."""
    model.register_to_config(num_frame_per_block=2)
    base = run(model, inputs)
    diffattn.apply(model, SlidingWindow((1, 3, 3)))
    with pytest.warns(UserWarning, match="block-causal mask"):
        out = run(model, inputs)
    assert torch.equal(out, base)
    model.register_to_config(num_frame_per_block=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not torch.allclose(run(model, inputs), base)  # back to sparse, no warning


def test_released_shapes_on_meta():
    with torch.device("meta"):
        t2v = SkyReelsV2Transformer3DModel(num_layers=2)  # SkyReels-V2 14B-style defaults, two blocks
        i2v = SkyReelsV2Transformer3DModel(num_layers=2, image_dim=1280, added_kv_proj_dim=2048)
    for model in (t2v, i2v):
        handle = diffattn.apply(model, Radial(0.2), dense_layers=1)
        assert handle.replaced["transformer"] == NAMES
        diffattn.remove(model)
