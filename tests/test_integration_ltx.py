"""diffattn.apply / remove on a tiny random-weight LTX-Video transformer, saved and loaded back."""

import logging

import pytest
import torch
from diffusers import LTXVideoTransformer3DModel

import diffattn
from diffattn import Dense, Radial, SlidingWindow, TokenLayout
from diffattn.integration.families import ltx
from diffattn.integration.families.ltx import LTXSparseProcessor

TINY = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, cross_attention_dim=24,
            num_layers=3, caption_channels=8)
GRID = (3, 4, 5)
SELF = [f"transformer_blocks.{i}.attn1.processor" for i in range(3)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.manual_seed(0)
    built = LTXVideoTransformer3DModel(**TINY)
    path = tmp_path_factory.mktemp("ltx") / "transformer"
    built.save_pretrained(path)
    return LTXVideoTransformer3DModel.from_pretrained(path).eval()


def make_inputs(grid=GRID, batch=1, seed=1):
    gen = torch.Generator().manual_seed(seed)
    f, h, w = grid
    mask = torch.ones(batch, 6)
    mask[:, -2:] = 0  # padded prompt tokens: the cross-attention mask must keep working
    args = (torch.randn(batch, f * h * w, 4, generator=gen), torch.randn(batch, 6, 8, generator=gen),
            torch.tensor([500] * batch), mask)
    return args, dict(num_frames=f, height=h, width=w)


@pytest.fixture
def inputs():
    return make_inputs()


@torch.no_grad()
def run(model, inputs):
    args, kwargs = inputs
    return model(*args, **kwargs).sample


@torch.no_grad()
def test_dense_is_bit_exact_and_remove_restores(model, inputs):
    base = run(model, inputs)
    handle = diffattn.apply(model, Dense())
    assert handle.family == "ltx"
    assert handle.replaced["transformer"] == SELF
    assert all(isinstance(model.attn_processors[n], LTXSparseProcessor) for n in SELF)
    assert torch.equal(run(model, inputs), base)
    diffattn.apply(model, SlidingWindow((1, 3, 3)))
    assert not torch.allclose(run(model, inputs), base)
    diffattn.remove(model)
    assert torch.equal(run(model, inputs), base)
    with pytest.raises(ValueError, match="not applied"):
        diffattn.remove(model)


@torch.no_grad()
def test_window_covering_the_grid_matches_default(model, inputs):
    base = run(model, inputs)
    diffattn.apply(model, SlidingWindow(GRID))  # the whole (3, 4, 5) token grid
    torch.testing.assert_close(run(model, inputs), base, atol=1e-5, rtol=1e-5)
    diffattn.remove(model)


@torch.no_grad()
def test_small_window_is_finite_and_differs(model, inputs):
    base = run(model, inputs)
    diffattn.apply(model, SlidingWindow((1, 3, 3), stride=(1, 1, 2)))
    out = run(model, inputs)
    diffattn.remove(model)
    assert torch.isfinite(out).all() and (out - base).abs().max() > 1e-3


@torch.no_grad()
def test_dense_layers_and_cross_attention_untouched(model, inputs):
    base = run(model, inputs)
    cross = {n: p for n, p in model.attn_processors.items() if "attn2" in n}
    assert len(cross) == 3
    diffattn.apply(model, SlidingWindow((1, 3, 3)), dense_layers=3)  # every block dense
    assert torch.equal(run(model, inputs), base)
    assert all(model.attn_processors[n] is p for n, p in cross.items())
    diffattn.remove(model)


@torch.no_grad()
def test_apply_twice_replaces_cleanly(model, inputs):
    base = run(model, inputs)
    diffattn.apply(model, SlidingWindow((1, 3, 3)))
    diffattn.apply(model, Radial(0.2, block=16))
    assert torch.isfinite(run(model, inputs)).all()
    diffattn.remove(model)
    assert torch.equal(run(model, inputs), base)


@torch.no_grad()
def test_layout_from_num_frames_height_width(model, inputs):
    handle = diffattn.apply(model, Dense())
    run(model, inputs)
    diffattn.remove(model)
    assert handle.states["transformer"].layout == TokenLayout(GRID)


def raster_coords(grid, batch=1):
    f, h, w = grid
    coords = torch.stack(torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij"))
    return (coords.reshape(1, 3, -1).float() * torch.tensor([8.0, 32.0, 32.0])[None, :, None]).repeat(batch, 1, 1)


@torch.no_grad()
def test_layout_from_video_coords(model, inputs):
    """LTXConditionPipeline passes video_coords instead of num_frames/height/width."""
    (x, enc, t, mask), _ = inputs
    handle = diffattn.apply(model, SlidingWindow((1, 3, 3)))
    out = model(x, enc, t, mask, video_coords=raster_coords(GRID)).sample
    diffattn.remove(model)
    assert handle.states["transformer"].layout == TokenLayout(GRID) and torch.isfinite(out).all()


@torch.no_grad()
def test_extra_conditioning_tokens_stay_dense_with_a_warning(model, inputs, caplog):
    """Conditioning tokens prepended to the grid (LTXConditionPipeline): not one grid, so dense."""
    (x, enc, t, mask), _ = inputs
    extra = raster_coords((1, 2, 2))
    coords = torch.cat([extra, raster_coords(GRID)], dim=2)
    x = torch.cat([torch.randn(1, 4, 4), x], dim=1)
    base = model(x, enc, t, mask, video_coords=coords).sample
    handle = diffattn.apply(model, SlidingWindow((1, 3, 3)))
    ltx._warned.clear()  # the warning is given once per process
    with caplog.at_level(logging.WARNING, logger="diffattn"):
        out = model(x, enc, t, mask, video_coords=coords).sample
    diffattn.remove(model)
    assert handle.states["transformer"].layout is None
    assert torch.equal(out, base)
    assert "stays dense" in caplog.text


def test_grid_that_does_not_match_the_tokens_is_an_error(model, inputs):
    (x, enc, t, mask), _ = inputs
    diffattn.apply(model, Dense())
    try:
        with pytest.raises(ValueError, match="num_frames=2, height=4, width=5"):
            model(x, enc, t, mask, num_frames=2, height=4, width=5)
    finally:
        diffattn.remove(model)


@torch.no_grad()
def test_patchified_latents():
    """patch_size 2: the token grid is the latent grid divided by the patch sizes."""
    torch.manual_seed(0)
    model = LTXVideoTransformer3DModel(**dict(TINY, in_channels=16, out_channels=16, patch_size=2, num_layers=1)).eval()
    f, h, w = GRID
    x, enc, mask = torch.randn(1, f * h * w, 16), torch.randn(1, 6, 8), torch.ones(1, 6)
    handle = diffattn.apply(model, SlidingWindow((1, 3, 3)))
    # RoPE from video_coords, grid arguments in latent pixels (before patchify)
    out = model(x, enc, torch.tensor([500]), mask, num_frames=f, height=2 * h, width=2 * w,
                video_coords=raster_coords(GRID)).sample
    assert handle.states["transformer"].layout == TokenLayout(GRID) and torch.isfinite(out).all()
    diffattn.remove(model)


@torch.no_grad()
def test_step_index_from_per_token_timesteps(model, inputs):
    """LTX image-to-video passes timesteps [B, S] that are 0 on the first frame's tokens."""
    (x, enc, _, mask), grid = inputs
    handle = diffattn.apply(model, Dense())
    state = handle.states["transformer"]
    first_frame = torch.zeros(1, x.shape[1])
    first_frame[:, : GRID[1] * GRID[2]] = 1
    steps = []
    for t in (900, 900, 600, 600, 300, 900, 600):  # CFG pairs, then a new generation
        model(x, enc, t * (1 - first_frame), mask, **grid)
        steps.append(state.step)
    diffattn.remove(model)
    assert steps == [0, 0, 1, 1, 2, 0, 1]


@torch.no_grad()
def test_keyword_call_and_resolution_change(model):
    diffattn.apply(model, SlidingWindow((1, 3, 3)))
    for grid, batch in (((3, 4, 5), 1), ((2, 6, 3), 2)):
        (x, enc, t, mask), kwargs = make_inputs(grid, batch)
        out = model(hidden_states=x, encoder_hidden_states=enc, timestep=t, encoder_attention_mask=mask,
                    **kwargs).sample
        assert out.shape == x.shape and torch.isfinite(out).all()
    diffattn.remove(model)


def test_real_shapes_on_meta_device():
    """Default constructor arguments (the real LTX-Video 2B layout), one block, no memory."""
    with torch.device("meta"):
        model = LTXVideoTransformer3DModel(num_layers=1)
    before = dict(model.attn_processors)
    handle = diffattn.apply(model, SlidingWindow((3, 5, 5)))
    assert handle.replaced["transformer"] == ["transformer_blocks.0.attn1.processor"]
    assert isinstance(model.attn_processors["transformer_blocks.0.attn1.processor"], LTXSparseProcessor)
    cross = "transformer_blocks.0.attn2.processor"
    assert model.attn_processors[cross] is before[cross]
    diffattn.remove(model)
    assert all(model.attn_processors[n] is p for n, p in before.items())


def test_processor_declares_diffusers_parameters():
    """diffusers' LTXAttention.forward filters keyword arguments by the processor's signature."""
    import inspect

    from diffusers.models.transformers.transformer_ltx import LTXVideoAttnProcessor

    ours = inspect.signature(LTXSparseProcessor.__call__).parameters
    theirs = inspect.signature(LTXVideoAttnProcessor.__call__).parameters
    assert [(p.name, p.kind) for p in ours.values()] == [(p.name, p.kind) for p in theirs.values()]
