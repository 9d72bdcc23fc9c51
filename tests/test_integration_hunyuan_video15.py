"""diffattn on HunyuanVideo 1.5: a tiny random-weight HunyuanVideo15Transformer3DModel (saved and
loaded back), padded conditions (T2V and I2V), and the released shape on the meta device."""

import inspect

import pytest
import torch
from diffusers import HunyuanVideo15Transformer3DModel
from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15AttnProcessor2_0

import diffattn
from diffattn import Dense, Radial, SlidingWindow, TokenLayout
from diffattn.integration.families.hunyuan_video15 import HunyuanVideo15SparseProcessor

CONFIG = dict(in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
              num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16,
              text_embed_2_dim=8, image_embed_dim=12, rope_axes_dim=(4, 6, 6))
NAMES = ["transformer_blocks.0.attn.processor", "transformer_blocks.1.attn.processor"]
GRID = (3, 4, 5)
TEXT = 6 + 4 + 3  # MLLM + ByT5 + image tokens


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.manual_seed(0)
    built = HunyuanVideo15Transformer3DModel(**CONFIG)
    path = tmp_path_factory.mktemp("hunyuan_video15") / "transformer"
    built.save_pretrained(path)
    return HunyuanVideo15Transformer3DModel.from_pretrained(path).eval()


def make_inputs(i2v=True, seed=1):
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(1, 3, 12, generator=gen) if i2v else torch.zeros(1, 3, 12)
    return dict(hidden_states=torch.randn(1, 9, *GRID, generator=gen), timestep=torch.tensor([500.0]),
                encoder_hidden_states=torch.randn(1, 6, 16, generator=gen),
                encoder_attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0]]),
                encoder_hidden_states_2=torch.randn(1, 4, 8, generator=gen),
                encoder_attention_mask_2=torch.tensor([[1, 1, 0, 0]]), image_embeds=image)


@pytest.fixture
def inputs():
    return make_inputs()


@torch.no_grad()
def run(model, inputs):
    return model(**inputs).sample


def test_processor_declares_exactly_diffusers_parameters():
    ours = list(inspect.signature(HunyuanVideo15SparseProcessor.__call__).parameters)
    assert ours == list(inspect.signature(HunyuanVideo15AttnProcessor2_0.__call__).parameters)


@pytest.mark.parametrize("i2v", [True, False])
@torch.no_grad()
def test_dense_is_bit_exact_and_remove_restores(model, i2v):
    inputs = make_inputs(i2v=i2v)
    base = run(model, inputs)
    before = model.attn_processors
    handle = diffattn.apply(model, Dense())
    assert handle.family == "hunyuan_video15" and handle.replaced["transformer"] == NAMES
    assert torch.equal(run(model, inputs), base)
    assert handle.states["transformer"].layout == TokenLayout(GRID, text_len=TEXT, text_first=False)
    diffattn.apply(model, SlidingWindow((1, 3, 3)))
    assert not torch.allclose(run(model, inputs), base)
    diffattn.remove(model)
    assert all(model.attn_processors[n] is p for n, p in before.items())
    assert torch.equal(run(model, inputs), base)


@torch.no_grad()
def test_padded_condition_rows_match_diffusers_bit_for_bit(model, inputs):
    """diffusers masks padded condition tokens as queries too (their rows come out zero); diffattn
    masks keys and zeroes those rows: a block's outputs, padded rows included, are identical."""
    block = model.transformer_blocks[0]
    gen = torch.Generator().manual_seed(2)
    hidden, enc = torch.randn(1, 60, 32, generator=gen), torch.randn(1, TEXT, 32, generator=gen)
    temb = torch.randn(1, 32, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]])  # valid first, as the transformer packs it
    rope = model.rope(inputs["hidden_states"])
    base = block(hidden, enc, temb, mask, rope)
    diffattn.apply(model, Dense())
    run(model, inputs)  # records the call's layout (60 video + 13 condition tokens)
    out = block(hidden, enc, temb, mask, rope)
    assert torch.equal(out[0], base[0]) and torch.equal(out[1], base[1])


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
def test_refiner_keeps_its_processor_and_resolution_changes(model):
    handle = diffattn.apply(model, SlidingWindow((1, 3, 3)))
    assert not any("context_embedder" in n for n in handle.replaced["transformer"])
    for grid in ((3, 4, 5), (2, 6, 3)):
        inputs = make_inputs()
        inputs["hidden_states"] = torch.randn(1, 9, *grid)
        out = run(model, inputs)
        assert out.shape == (1, 4, *grid) and torch.isfinite(out).all()
        assert handle.states["transformer"].layout.grid == grid


def test_released_shape_on_meta():
    with torch.device("meta"):
        model = HunyuanVideo15Transformer3DModel(num_layers=2)  # HunyuanVideo-1.5 (8.3B) layout, two blocks
    handle = diffattn.apply(model, Radial(0.95, sink=False), dense_layers=1)
    assert handle.replaced["transformer"] == NAMES
    diffattn.remove(model)
