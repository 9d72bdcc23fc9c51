"""diffattn on Mochi: a tiny random-weight MochiTransformer3DModel (saved and loaded back; its
zero-initialised RoPE frequencies randomised), padded text per batch row, and the released shape on
the meta device."""

import inspect

import pytest
import torch
from diffusers import MochiTransformer3DModel
from diffusers.models.attention_processor import MochiAttnProcessor2_0

import diffattn
from diffattn import Dense, Radial, SlidingWindow, TokenLayout
from diffattn.integration.families.mochi import MochiSparseProcessor
from diffattn.integration.processors import attn_processors

CONFIG = dict(patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=2, pooled_projection_dim=16,
              in_channels=4, text_embed_dim=16, time_embed_dim=8, max_sequence_length=8)
NAMES = ["transformer_blocks.0.attn1.processor", "transformer_blocks.1.attn1.processor"]
GRID = (3, 4, 5)
TEXT = 6
pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast")  # MochiRoPE's float32 autocast on CPU


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.manual_seed(0)
    built = MochiTransformer3DModel(**CONFIG)
    with torch.no_grad():  # zeros in diffusers (loaded from the checkpoint): RoPE would be the identity
        built.pos_frequencies.normal_(0.0, 0.5)
    path = tmp_path_factory.mktemp("mochi") / "transformer"
    built.save_pretrained(path)
    return MochiTransformer3DModel.from_pretrained(path).eval()


def make_inputs(frames=3, height=8, width=10, valid=(4, 6), seed=1):
    """A batch of len(valid) rows (a CFG pair by default), row i with valid[i] real text tokens first."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(valid)
    mask = torch.arange(TEXT)[None, :] < torch.tensor(valid)[:, None]
    return dict(hidden_states=torch.randn(batch, 4, frames, height, width, generator=gen),
                encoder_hidden_states=torch.randn(batch, TEXT, 16, generator=gen),
                timestep=torch.full((batch,), 500.0), encoder_attention_mask=mask)


@pytest.fixture
def inputs():
    return make_inputs()


@torch.no_grad()
def run(model, inputs):
    return model(**inputs).sample


def test_processor_declares_exactly_diffusers_parameters():
    ours = list(inspect.signature(MochiSparseProcessor.__call__).parameters)
    assert ours == list(inspect.signature(MochiAttnProcessor2_0.__call__).parameters)


@torch.no_grad()
def test_dense_is_bit_exact_and_remove_restores(model, inputs):
    base = run(model, inputs)
    before = attn_processors(model)
    handle = diffattn.apply(model, Dense())
    assert handle.family == "mochi" and handle.replaced["transformer"] == NAMES
    assert all(isinstance(p, MochiSparseProcessor) for p in attn_processors(model).values())
    assert torch.equal(run(model, inputs), base)
    assert handle.states["transformer"].layout == TokenLayout(GRID, text_len=TEXT, text_first=False)
    diffattn.apply(model, SlidingWindow((1, 3, 3)))
    assert not torch.allclose(run(model, inputs), base)
    diffattn.remove(model)
    assert all(attn_processors(model)[n] is p for n, p in before.items())
    assert torch.equal(run(model, inputs), base)


@pytest.mark.parametrize("valid", [(4, 6), (6,), (0, 3)])
@torch.no_grad()
def test_window_covering_the_grid_matches_default(model, valid):
    """Padded text per row (a CFG pair with different prompt lengths, an all-padding row)."""
    inputs = make_inputs(valid=valid)
    base = run(model, inputs)
    diffattn.apply(model, SlidingWindow(GRID))
    torch.testing.assert_close(run(model, inputs), base, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_block_outputs_incl_padded_text_rows(model, inputs):
    """One block's attention returns, for padded text rows too, what diffusers' processor returns."""
    attn = model.transformer_blocks[0].attn1
    gen = torch.Generator().manual_seed(5)
    hidden, text = torch.randn(2, 60, 32, generator=gen), torch.randn(2, TEXT, 16, generator=gen)
    rope = model.rope(model.pos_frequencies, *GRID, dtype=torch.float32)
    mask = inputs["encoder_attention_mask"]
    video, encoder = MochiAttnProcessor2_0()(attn, hidden, text, mask, rope)
    handle = diffattn.apply(model, SlidingWindow(GRID))
    handle.states["transformer"].layout = TokenLayout(GRID, text_len=TEXT, text_first=False)
    ours = attn_processors(model)["transformer_blocks.0.attn1.processor"](attn, hidden, text, mask, rope)
    torch.testing.assert_close(ours[0], video, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[1], encoder, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_small_window_is_finite_and_differs(model, inputs):
    base = run(model, inputs)
    diffattn.apply(model, SlidingWindow((1, 3, 3), stride=(1, 1, 2)))
    out = run(model, inputs)
    assert torch.isfinite(out).all() and (out - base).abs().max() > 1e-3


@torch.no_grad()
def test_resolution_change_and_dense_schedule(model):
    handle = diffattn.apply(model, SlidingWindow((1, 3, 3)), dense_layers=1)
    for frames, height, width in ((1, 8, 10), (2, 12, 6)):
        out = run(model, make_inputs(frames, height, width))
        assert out.shape == (2, 4, frames, height, width) and torch.isfinite(out).all()
        assert handle.states["transformer"].layout == TokenLayout((frames, height // 2, width // 2), text_len=TEXT,
                                                                  text_first=False)


def test_foreign_processor_is_refused(model):
    model.transformer_blocks[1].attn1.processor = object.__new__(type("OtherProcessor", (), {"__call__": None}))
    try:
        with pytest.raises(ValueError, match="MochiAttnProcessor2_0"):
            diffattn.apply(model, SlidingWindow((1, 3, 3)))
    finally:
        model.transformer_blocks[1].attn1.processor = MochiAttnProcessor2_0()


def test_released_shape_on_meta():
    with torch.device("meta"):
        model = MochiTransformer3DModel(num_layers=2)  # Mochi 1 layout, two blocks
    handle = diffattn.apply(model, Radial(0.2), dense_layers=1)
    assert handle.replaced["transformer"] == NAMES
    diffattn.remove(model)
