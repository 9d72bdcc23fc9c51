"""diffattn on MiniMax-H3: a tiny random-weight MiniMaxH3Transformer3DModel (saved and loaded back)
over a packed [text | keyframe | audio | target video] sequence built like the modular pipeline's,
and the released shape on the meta device."""

import inspect
from types import SimpleNamespace

import pytest
import torch
from diffusers import MiniMaxH3Scheduler, MiniMaxH3Transformer3DModel
from diffusers.modular_pipelines.minimax_h3.before_denoise import (MiniMaxH3PrepareLayoutStep,
                                                                   MiniMaxH3Ref2VAPrepareLayoutStep,
                                                                   MiniMaxH3SetTimestepsStep)
from diffusers.models.transformers.transformer_minimax_h3 import MiniMaxH3AttnProcessor

import diffattn
from diffattn import Dense, Radial, SlidingWindow, TokenLayout
from diffattn.integration.families.minimax_h3 import ADAPTER, MiniMaxH3SparseProcessor, trailing_grid

CONFIG = dict(num_attention_heads=2, attention_head_dim=16, hidden_size=32, num_layers=2, num_refiner_layers=1,
              ffn_dim=64, in_channels=4, audio_in_channels=4, patch_size=(1, 2, 2), text_dim=16, freq_dim=16,
              time_embed_hidden_dim=32, time_embed_dim=16, rope_freq_dim=2)
NAMES = ["transformer_blocks.0.attn.processor", "transformer_blocks.1.attn.processor"]
GRID = (3, 4, 5)  # latent 3 x 8 x 10, patch (1, 2, 2)
TEXT, AUDIO_LATENTS, AUDIO_CHANNELS = 5, 3, 2
AUDIO = AUDIO_LATENTS * AUDIO_CHANNELS


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.manual_seed(0)
    built = MiniMaxH3Transformer3DModel(**CONFIG)
    path = tmp_path_factory.mktemp("minimax_h3") / "transformer"
    built.save_pretrained(path)
    return MiniMaxH3Transformer3DModel.from_pretrained(path).eval()


def packed(t=0.3, task="fl2va", grid=GRID, seed=1):
    """A packed sequence laid out by diffusers' own MiniMax-H3 layout steps: ``t2va`` = [text | audio |
    video]; ``fl2va`` = [text | first and last keyframes | audio | video]; ``ref2va`` = [text | image
    reference | video reference with its soundtrack | audio | video]. Per-row timesteps as the pipeline
    assigns them (conditioning video at max(t, 0.9), reference audio clean)."""
    gen = torch.Generator().manual_seed(seed)
    f, h, w = grid
    tags = torch.ones(TEXT, dtype=torch.long)
    shape = (f, h * 2, w * 2)
    if task == "ref2va":
        refs = [SimpleNamespace(kind="image"), SimpleNamespace(kind="video", has_audio=True)]
        conditions = [torch.zeros(1, 4, 1, 6, 6), torch.zeros(1, 4, 2, *shape[1:])]
        layout = MiniMaxH3Ref2VAPrepareLayoutStep.build_ref2va_packed_sequence(
            tags, refs, conditions, [torch.zeros(4, 4)], *shape, AUDIO_LATENTS, (1, 2, 2), AUDIO_CHANNELS, 2, 0)
    else:
        anchors = ("first", "last") if task == "fl2va" else ()
        layout = MiniMaxH3PrepareLayoutStep.build_packed_sequence(tags, *shape, AUDIO_LATENTS, (1, 2, 2),
                                                                  AUDIO_CHANNELS, 2, 0, anchors)
    positions, token_tags, video_indices, audio_indices, text_indices, cond_video, cond_audio = layout
    timesteps, timestep_indices = MiniMaxH3SetTimestepsStep.build_row_timesteps(
        video_indices, audio_indices, cond_video, cond_audio, TEXT, t, min(t + 0.05, 1.0), max(t, 0.9), 1.0)
    return dict(hidden_states=torch.randn(1, video_indices.numel(), 16, generator=gen),
                audio_hidden_states=torch.randn(1, audio_indices.numel(), 4, generator=gen),
                encoder_hidden_states=torch.randn(1, TEXT, 16, generator=gen),
                timestep=timesteps, timestep_indices=timestep_indices, token_tags=token_tags,
                position_ids=positions, video_indices=video_indices, audio_indices=audio_indices,
                text_indices=text_indices)


def dense_len(inputs, grid=GRID):
    return inputs["position_ids"].shape[0] - grid[0] * grid[1] * grid[2]


@pytest.fixture
def inputs():
    return packed()


@torch.no_grad()
def run(model, inputs):
    out = model(**inputs)
    return out.sample, out.audio_sample


def test_processor_declares_exactly_diffusers_parameters():
    ours = list(inspect.signature(MiniMaxH3SparseProcessor.__call__).parameters)
    assert ours == list(inspect.signature(MiniMaxH3AttnProcessor.__call__).parameters)


@torch.no_grad()
def test_dense_is_bit_exact_and_remove_restores(model, inputs):
    video, audio = run(model, inputs)
    before = model.attn_processors
    handle = diffattn.apply(model, Dense())
    assert handle.family == "minimax_h3" and handle.replaced["transformer"] == NAMES
    assert all(model.attn_processors[n] is p for n, p in before.items() if "token_refiner" in n)
    out = run(model, inputs)
    assert torch.equal(out[0], video) and torch.equal(out[1], audio)
    # text, both keyframes and the audio dense in front; the target video is the grid
    frame = GRID[1] * GRID[2]
    assert handle.states["transformer"].layout == TokenLayout(GRID, text_len=TEXT + 2 * frame + AUDIO, text_first=True)
    diffattn.apply(model, SlidingWindow((1, 3, 3)))
    assert not torch.allclose(run(model, inputs)[0], video)
    diffattn.remove(model)
    assert all(model.attn_processors[n] is p for n, p in before.items())
    out = run(model, inputs)
    assert torch.equal(out[0], video) and torch.equal(out[1], audio)


@pytest.mark.parametrize("task", ["t2va", "fl2va", "ref2va"])
@torch.no_grad()
def test_window_covering_the_grid_matches_default(model, task):
    inputs = packed(task=task)
    video, audio = run(model, inputs)
    handle = diffattn.apply(model, SlidingWindow(GRID))
    out = run(model, inputs)
    assert handle.states["transformer"].layout == TokenLayout(GRID, text_len=dense_len(inputs), text_first=True)
    torch.testing.assert_close(out[0], video, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], audio, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_small_window_is_finite_and_differs(model, inputs):
    video, audio = run(model, inputs)
    diffattn.apply(model, SlidingWindow((1, 3, 3), stride=(1, 1, 2)))
    out = run(model, inputs)
    assert torch.isfinite(out[0]).all() and (out[0] - video).abs().max() > 1e-3
    assert torch.isfinite(out[1]).all()


@torch.no_grad()
def test_resolution_and_length_change(model):
    handle = diffattn.apply(model, SlidingWindow((1, 3, 3)))
    for grid in ((1, 4, 5), (2, 6, 3)):
        inputs = packed(task="t2va", grid=grid)
        video, audio = run(model, inputs)
        assert video.shape[1] == grid[0] * grid[1] * grid[2] and torch.isfinite(video).all()
        assert handle.states["transformer"].layout == TokenLayout(grid, text_len=dense_len(inputs, grid),
                                                                  text_first=True)


def test_trailing_grid():
    positions = packed(task="fl2va")["position_ids"]
    frame = GRID[1] * GRID[2]
    video = positions[-GRID[0] * frame :]
    assert trailing_grid(video) == GRID
    assert trailing_grid(video[-frame:]) == (1, 4, 5)
    assert trailing_grid(video[-frame - 1 :]) == (1, 4, 5)  # one row of an earlier frame: not a frame
    # a keyframe anchored at the target's first frame (same time, same grid) right in front: not a frame
    keyframe = positions[TEXT : TEXT + frame]
    assert trailing_grid(torch.cat([keyframe, video])) == GRID
    assert trailing_grid(torch.cat([keyframe, video[:frame]])) == (1, 4, 5)
    # a last frame whose rows run backwards: only its last row is a grid
    flipped = video.clone()
    flipped[-frame:, 1] = flipped[-frame:, 1].flip(0)
    assert trailing_grid(flipped) == (1, 1, 5)
    assert trailing_grid(positions[:TEXT]) == (TEXT, 1, 1)  # text rows: one token per time
    assert trailing_grid(positions[:0]) is None


def test_layout_without_a_grid_runs_dense_with_a_warning(inputs):
    bad = dict(inputs, video_indices=inputs["video_indices"][:-1])  # the last row is not video
    with pytest.warns(UserWarning, match="not one raster"):
        assert ADAPTER.token_layout(None, (), bad) is None


def test_timestep_is_the_target_rows():
    inputs = packed(t=0.3)
    assert inputs["timestep"].numel() == 3  # target video 0.3, target audio 0.35, keyframes 0.9
    assert float(ADAPTER.timestep((), inputs)) == pytest.approx(0.3)


@torch.no_grad()
def test_steps_from_the_rising_schedule(model):
    """MiniMax-H3's timestep t = 1 - sigma rises; with the scheduler the step index is its position."""
    scheduler = MiniMaxH3Scheduler()
    scheduler.set_timesteps(4)
    first, second = (packed(t=float(t)) for t in scheduler.timesteps[:2])
    dense = [run(model, first)[0], run(model, second)[0]]
    model.set_attn_processor(diffattn.sparse_processors(model, SlidingWindow((1, 3, 3)), dense_steps=1,
                                                        scheduler=scheduler))
    assert torch.equal(run(model, first)[0], dense[0])  # step 0: dense
    assert not torch.allclose(run(model, second)[0], dense[1])  # step 1: sparse
    diffattn.remove(model)


def test_released_shape_on_meta():
    with torch.device("meta"):
        model = MiniMaxH3Transformer3DModel(num_layers=2, num_refiner_layers=1)  # MiniMax-H3 layout, two blocks
    handle = diffattn.apply(model, Radial(0.2), dense_layers=1)
    assert handle.replaced["transformer"] == NAMES
    diffattn.remove(model)
