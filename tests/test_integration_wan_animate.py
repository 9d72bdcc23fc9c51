"""diffattn on Wan 2.2 Animate: a tiny random-weight WanAnimateTransformer3DModel (saved and loaded
back) and the released layout on the meta device. Wan's processor; latent frame 0 (the reference
image) is attended densely, like text."""

import pytest
import torch
from diffusers import WanAnimateTransformer3DModel
from diffusers.models.transformers.transformer_wan_animate import WanAnimateFaceBlockAttnProcessor, WanAttnProcessor

import diffattn
from diffattn import Dense, Radial, SlidingWindow, TokenLayout
from diffattn.integration.families.wan import WanSparseProcessor

CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=None, latent_channels=4,
              out_channels=4, text_dim=8, freq_dim=8, ffn_dim=32, num_layers=2, rope_max_seq_len=32, image_dim=12,
              motion_encoder_channel_sizes={"4": 8, "8": 8, "16": 8}, motion_encoder_size=16, motion_style_dim=8,
              motion_dim=4, motion_encoder_dim=8, face_encoder_hidden_dim=8, face_encoder_num_heads=2,
              inject_face_latents_blocks=1, motion_encoder_batch_size=4)
NAMES = ["blocks.0.attn1.processor", "blocks.1.attn1.processor"]
FRAMES = 4  # latent frames: the reference image, then 3 video frames


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.manual_seed(0)
    built = WanAnimateTransformer3DModel(**CONFIG)
    path = tmp_path_factory.mktemp("wan_animate") / "transformer"
    built.save_pretrained(path)
    return WanAnimateTransformer3DModel.from_pretrained(path).eval()


@pytest.fixture
def inputs():
    gen = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(1, 12, FRAMES, 8, 10, generator=gen), timestep=torch.tensor([500]),
                encoder_hidden_states=torch.randn(1, 512, 8, generator=gen),
                encoder_hidden_states_image=torch.randn(1, 4, 12, generator=gen),
                pose_hidden_states=torch.randn(1, 4, FRAMES - 1, 8, 10, generator=gen),
                face_pixel_values=torch.randn(1, 3, 9, 16, 16, generator=gen))


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
    # cross-attention and the face adapter keep diffusers' processors
    assert type(model.attn_processors["blocks.0.attn2.processor"]) is WanAttnProcessor
    assert type(model.attn_processors["face_adapter.0.processor"]) is WanAnimateFaceBlockAttnProcessor
    assert torch.equal(run(model, inputs), base)
    # the reference frame's 20 tokens first and dense, the 3 video frames as the grid
    assert handle.states["transformer"].layout == TokenLayout((3, 4, 5), text_len=20, text_first=True)
    diffattn.apply(model, SlidingWindow((1, 3, 3)))
    assert not torch.allclose(run(model, inputs), base)
    diffattn.remove(model)
    assert all(model.attn_processors[n] is p for n, p in before.items())
    assert torch.equal(run(model, inputs), base)


@torch.no_grad()
def test_window_covering_the_grid_matches_default(model, inputs):
    base = run(model, inputs)
    diffattn.apply(model, SlidingWindow((3, 4, 5)))
    torch.testing.assert_close(run(model, inputs), base, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_small_window_is_finite_and_differs(model, inputs):
    base = run(model, inputs)
    diffattn.apply(model, SlidingWindow((1, 3, 3), stride=(1, 1, 2)))
    out = run(model, inputs)
    assert torch.isfinite(out).all() and (out - base).abs().max() > 1e-3


@torch.no_grad()
def test_reference_frame_reaches_every_frame(model, inputs):
    """With a one-frame window, frames exchange nothing through self-attention (cross-attention,
    feed-forward and the face adapter act per token or per frame) -- except through the reference
    image, which every query attends. Changing the reference latent must move the last frame (on a
    plain (4, 4, 5) grid with a one-frame window it could not)."""
    changed = dict(inputs, hidden_states=inputs["hidden_states"].clone())
    changed["hidden_states"][:, :, 0] += 1.0
    diffattn.apply(model, SlidingWindow((1, 3, 3)))
    moved = (run(model, changed) - run(model, inputs))[:, :, -1].abs().max()
    assert moved > 1e-3


def test_released_shapes_on_meta():
    with torch.device("meta"):
        model = WanAnimateTransformer3DModel(num_layers=2)  # Wan2.2-Animate-14B layout, two blocks
    handle = diffattn.apply(model, Radial(0.2), dense_layers=1)
    assert handle.replaced["transformer"] == NAMES
    diffattn.remove(model)
