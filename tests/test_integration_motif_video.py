"""diffattn on Motif-Video: a tiny random-weight MotifVideoTransformer3DModel (saved and loaded back),
I2V image tokens and padded text, text cross-attention and decoder blocks untouched, and the released
shape on the meta device."""

import inspect

import pytest
import torch
from diffusers import MotifVideoTransformer3DModel
from diffusers.models.transformers.transformer_motif_video import MotifVideoAttnProcessor2_0

import diffattn
from diffattn import Dense, Radial, SlidingWindow, TokenLayout
from diffattn.integration.families.motif_video import MotifVideoSparseProcessor

CONFIG = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
              num_single_layers=2, mlp_ratio=2.0, patch_size=2, text_embed_dim=16, image_embed_dim=12,
              rope_axes_dim=(4, 6, 6), enable_text_cross_attention_dual=True, enable_text_cross_attention_single=True)
NAMES = ["transformer_blocks.0.attn.processor", "single_transformer_blocks.0.attn.processor",
         "single_transformer_blocks.1.attn.processor"]
GRID = (3, 4, 5)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.manual_seed(0)
    built = MotifVideoTransformer3DModel(**CONFIG)
    path = tmp_path_factory.mktemp("motif_video") / "transformer"
    built.save_pretrained(path)
    return MotifVideoTransformer3DModel.from_pretrained(path).eval()


def make_inputs(i2v=True, mask=True, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 4, 3, 8, 10, generator=gen), timestep=torch.tensor([500.0]),
                encoder_hidden_states=torch.randn(1, 6, 16, generator=gen),
                encoder_attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0]]) if mask else None,
                image_embeds=torch.randn(1, 3, 12, generator=gen) if i2v else None)


@pytest.fixture
def inputs():
    return make_inputs()


@torch.no_grad()
def run(model, inputs):
    return model(**inputs).sample


def test_processor_declares_exactly_diffusers_parameters():
    ours = list(inspect.signature(MotifVideoSparseProcessor.__call__).parameters)
    assert ours == list(inspect.signature(MotifVideoAttnProcessor2_0.__call__).parameters)


@pytest.mark.parametrize("i2v, mask", [(True, True), (False, True), (False, False)])
@torch.no_grad()
def test_dense_is_bit_exact_and_remove_restores(model, i2v, mask):
    inputs = make_inputs(i2v=i2v, mask=mask)
    base = run(model, inputs)
    before = model.attn_processors
    handle = diffattn.apply(model, Dense())
    assert handle.family == "motif_video" and handle.replaced["transformer"] == NAMES
    assert all(model.attn_processors[n] is p for n, p in before.items() if "cross_attn" in n)
    assert torch.equal(run(model, inputs), base)
    text = 6 + (3 if i2v else 0)
    assert handle.states["transformer"].layout == TokenLayout(GRID, text_len=text, text_first=False)
    diffattn.apply(model, SlidingWindow((1, 3, 3)))
    assert not torch.allclose(run(model, inputs), base)
    diffattn.remove(model)
    assert all(model.attn_processors[n] is p for n, p in before.items())
    assert torch.equal(run(model, inputs), base)


@pytest.mark.parametrize("i2v", [True, False])
@torch.no_grad()
def test_window_covering_the_grid_matches_default(model, i2v):
    inputs = make_inputs(i2v=i2v)
    base = run(model, inputs)
    diffattn.apply(model, SlidingWindow(GRID))
    torch.testing.assert_close(run(model, inputs), base, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_small_window_is_finite_and_differs(model, inputs):
    base = run(model, inputs)
    diffattn.apply(model, SlidingWindow((1, 3, 3), stride=(1, 1, 2)))
    out = run(model, inputs)
    assert torch.isfinite(out).all() and (out - base).abs().max() > 1e-3


@torch.no_grad()
def test_decoder_blocks_keep_diffusers_processor():
    """num_decoder_layers > 0: the last single-stream blocks attend [decoder video; encoder video], not
    the call's layout; they stay dense with diffusers' processor."""
    torch.manual_seed(0)
    model = MotifVideoTransformer3DModel(**dict(CONFIG, num_single_layers=3, num_decoder_layers=1)).eval()
    inputs = make_inputs()
    base = run(model, inputs)
    handle = diffattn.apply(model, SlidingWindow(GRID))
    assert handle.replaced["transformer"] == NAMES
    assert type(model.attn_processors["single_transformer_blocks.2.attn.processor"]) is MotifVideoAttnProcessor2_0
    torch.testing.assert_close(run(model, inputs), base, atol=1e-5, rtol=1e-5)
    diffattn.apply(model, SlidingWindow((1, 3, 3)))
    out = run(model, inputs)
    assert torch.isfinite(out).all() and (out - base).abs().max() > 1e-5
    diffattn.remove(model)


def test_released_shape_on_meta():
    with torch.device("meta"):
        model = MotifVideoTransformer3DModel(num_layers=2, num_single_layers=2)  # Motif-Video layout, fewer blocks
    handle = diffattn.apply(model, Radial(0.2), dense_layers=1)
    assert handle.replaced["transformer"] == ["transformer_blocks.0.attn.processor", "transformer_blocks.1.attn.processor",
                                              "single_transformer_blocks.0.attn.processor",
                                              "single_transformer_blocks.1.attn.processor"]
    diffattn.remove(model)
