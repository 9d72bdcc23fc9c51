"""diffattn on Kandinsky 5: a tiny random-weight Kandinsky5Transformer3DModel (saved and loaded back;
its zero-initialised modulations randomised so attention reaches the output), NABLA checkpoints
refused, and the released shape on the meta device."""

import inspect

import pytest
import torch
from diffusers import Kandinsky5Transformer3DModel
from diffusers.models.transformers.transformer_kandinsky import Kandinsky5AttnProcessor

import diffattn
from diffattn import Dense, Radial, SlidingWindow, TokenLayout
from diffattn.integration.families.kandinsky5 import Kandinsky5SparseProcessor

CONFIG = dict(in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, out_visual_dim=4, patch_size=(1, 2, 2),
              model_dim=32, ff_dim=64, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 6, 6))
NAMES = ["visual_transformer_blocks.0.self_attention.processor", "visual_transformer_blocks.1.self_attention.processor"]
FRAMES, HEIGHT, WIDTH = 3, 8, 10
GRID = (3, 4, 5)


def randomise_modulations(model):
    gen = torch.Generator().manual_seed(3)
    for name, module in model.named_modules():
        if name.endswith("modulation.out_layer"):  # zero-initialised in diffusers: attention would not matter
            with torch.no_grad():
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * 0.05)
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.05)
    return model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.manual_seed(0)
    built = randomise_modulations(Kandinsky5Transformer3DModel(**CONFIG))
    path = tmp_path_factory.mktemp("kandinsky5") / "transformer"
    built.save_pretrained(path)
    return Kandinsky5Transformer3DModel.from_pretrained(path).eval()


def make_inputs(frames=FRAMES, height=HEIGHT, width=WIDTH, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, frames, height, width, 4, generator=gen),
                encoder_hidden_states=torch.randn(1, 5, 16, generator=gen), timestep=torch.tensor([500.0]),
                pooled_projections=torch.randn(1, 8, generator=gen),
                visual_rope_pos=[torch.arange(frames), torch.arange(height // 2), torch.arange(width // 2)],
                text_rope_pos=torch.arange(5))


@pytest.fixture
def inputs():
    return make_inputs()


@torch.no_grad()
def run(model, inputs):
    return model(**inputs).sample


def test_processor_declares_exactly_diffusers_parameters():
    ours = list(inspect.signature(Kandinsky5SparseProcessor.__call__).parameters)
    assert ours == list(inspect.signature(Kandinsky5AttnProcessor.__call__).parameters)


@torch.no_grad()
def test_dense_is_bit_exact_and_remove_restores(model, inputs):
    base = run(model, inputs)
    before = model.attn_processors
    handle = diffattn.apply(model, Dense())
    assert handle.family == "kandinsky5" and handle.replaced["transformer"] == NAMES
    procs = model.attn_processors
    assert all(procs[n] is p for n, p in before.items() if n not in NAMES)  # text blocks, cross-attention
    assert torch.equal(run(model, inputs), base)
    assert handle.states["transformer"].layout == TokenLayout(GRID)
    diffattn.apply(model, SlidingWindow((1, 3, 3)))
    assert not torch.allclose(run(model, inputs), base)
    diffattn.remove(model)
    assert all(model.attn_processors[n] is p for n, p in before.items())
    assert torch.equal(run(model, inputs), base)


@torch.no_grad()
def test_window_covering_the_grid_matches_default(model, inputs):
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
def test_image_and_resolution_change(model):
    handle = diffattn.apply(model, SlidingWindow((1, 3, 3)))
    for frames, height, width in ((1, 8, 10), (2, 12, 6)):
        out = run(model, make_inputs(frames, height, width))
        assert out.shape == (1, frames, height, width, 4) and torch.isfinite(out).all()
        assert handle.states["transformer"].layout == TokenLayout((frames, height // 2, width // 2))


def test_nabla_is_refused(model, inputs):
    with pytest.raises(ValueError, match="NABLA"):
        with torch.device("meta"):
            nabla = Kandinsky5Transformer3DModel(**CONFIG, attention_type="nabla")
        diffattn.apply(nabla, SlidingWindow((1, 3, 3)))
    diffattn.apply(model, SlidingWindow((1, 3, 3)))
    with pytest.raises(ValueError, match="NABLA"):
        run(model, dict(inputs, sparse_params={"to_fractal": False, "sta_mask": None, "P": 0.9}))


def test_released_shape_on_meta():
    with torch.device("meta"):
        model = Kandinsky5Transformer3DModel(num_visual_blocks=2)  # Kandinsky 5.0 Video Lite layout, two blocks
    handle = diffattn.apply(model, Radial(0.2), dense_layers=1)
    assert handle.replaced["transformer"] == NAMES
    diffattn.remove(model)
