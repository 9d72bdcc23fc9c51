"""diffattn on Qwen-Image: a tiny random-weight QwenImageTransformer2DModel (saved and loaded back),
Edit-style condition images and Layered layers, the reordering of dense tokens, and the released
shape on the meta device."""

import inspect

import pytest
import torch
import torch.nn.functional as F
from diffusers import QwenImageTransformer2DModel
from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0

import diffattn
from diffattn import Dense, Radial, SlidingWindow, TokenLayout
from diffattn.integration.core import Schedule, SparseAttentionCore
from diffattn.integration.families._packed import PackedLayout, attend_packed, packed_layout
from diffattn.integration.families.qwen_image import ADAPTER, QwenImageSparseProcessor
from diffattn.integration.state import GenerationState

GRID = (4, 6)
TEXT = 5
CONFIG = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
              joint_attention_dim=16, axes_dims_rope=(4, 6, 6))
NAMES = ["transformer_blocks.0.attn.processor", "transformer_blocks.1.attn.processor"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.manual_seed(0)
    built = QwenImageTransformer2DModel(**CONFIG)
    path = tmp_path_factory.mktemp("qwen_image") / "transformer"
    built.save_pretrained(path)
    return QwenImageTransformer2DModel.from_pretrained(path).eval()


def make_inputs(images=(GRID,), text_mask=(1, 1, 1, 0, 0), seed=1):
    gen = torch.Generator().manual_seed(seed)
    tokens = sum(h * w for h, w in images)
    return dict(hidden_states=torch.randn(1, tokens, 16, generator=gen),
                encoder_hidden_states=torch.randn(1, TEXT, 16, generator=gen),
                encoder_hidden_states_mask=None if text_mask is None else torch.tensor([text_mask]),
                timestep=torch.tensor([0.5]), img_shapes=[[(1, h, w) for h, w in images]])


@pytest.fixture
def inputs():
    return make_inputs()


@torch.no_grad()
def run(model, inputs):
    return model(**inputs).sample


def test_processor_declares_exactly_diffusers_parameters():
    ours = list(inspect.signature(QwenImageSparseProcessor.__call__).parameters)
    theirs = list(inspect.signature(QwenDoubleStreamAttnProcessor2_0.__call__).parameters)
    assert ours == theirs


@torch.no_grad()
def test_dense_is_bit_exact_and_remove_restores(model, inputs):
    base = run(model, inputs)
    before = model.attn_processors
    handle = diffattn.apply(model, Dense())
    assert handle.family == "qwen_image" and handle.replaced["transformer"] == NAMES
    assert torch.equal(run(model, inputs), base)
    assert handle.states["transformer"].layout == TokenLayout(GRID, text_len=TEXT, text_first=True)
    diffattn.apply(model, SlidingWindow((3, 3)))
    assert not torch.allclose(run(model, inputs), base)
    diffattn.remove(model)
    assert all(model.attn_processors[n] is p for n, p in before.items())
    assert torch.equal(run(model, inputs), base)


@pytest.mark.parametrize("text_mask", [(1, 1, 1, 0, 0), None])
@torch.no_grad()
def test_window_covering_the_grid_matches_default(model, text_mask):
    inputs = make_inputs(text_mask=text_mask)
    base = run(model, inputs)
    diffattn.apply(model, SlidingWindow(GRID))
    torch.testing.assert_close(run(model, inputs), base, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_small_window_is_finite_and_differs(model, inputs):
    base = run(model, inputs)
    diffattn.apply(model, SlidingWindow((3, 3)))
    out = run(model, inputs)
    assert torch.isfinite(out).all() and (out - base).abs().max() > 1e-3


@torch.no_grad()
def test_edit_condition_images_are_dense_and_reordered(model):
    """Qwen-Image-Edit packs [text; target; condition image]: the condition tokens are dense, the
    target is the grid. A whole-grid window reproduces diffusers (up to summation order)."""
    inputs = make_inputs(images=(GRID, (2, 3)))
    base = run(model, inputs)
    handle = diffattn.apply(model, Dense())
    torch.testing.assert_close(run(model, inputs), base, atol=1e-6, rtol=1e-6)
    layout = handle.states["transformer"].layout
    assert isinstance(layout, PackedLayout)
    assert (layout.grid, layout.text_len, layout.runs) == (GRID, TEXT + 6, (("text", 5), ("grid", 24), ("dense", 6)))
    diffattn.apply(model, SlidingWindow(GRID))
    torch.testing.assert_close(run(model, inputs), base, atol=1e-5, rtol=1e-5)
    diffattn.apply(model, SlidingWindow((3, 3)))
    out = run(model, inputs)
    assert torch.isfinite(out).all() and (out - base).abs().max() > 1e-3


@pytest.mark.parametrize("pattern", [SlidingWindow((3, 3)), Radial(0.2, block=16)])
def test_reordered_attention_is_the_pattern_in_model_order(pattern):
    """attend_packed on [text (2 padded); grid 4x6; condition 6] equals masked SDPA in model order
    with the pattern's mask: every query attends the text and condition keys, text and condition
    queries attend every key, grid queries attend grid keys by the pattern; padded text is masked."""
    torch.manual_seed(0)
    layout = packed_layout(GRID, [("text", TEXT), ("grid", 24), ("dense", 6)])
    state = GenerationState(layout=layout)
    core = SparseAttentionCore(pattern, Schedule(), 0, state, "reference")
    s = TEXT + 24 + 6
    q, k, v = (torch.randn(1, s, 2, 16) for _ in range(3))
    valid = torch.ones(1, s, dtype=torch.bool)
    valid[0, 3:TEXT] = False  # 2 padded text tokens
    out = attend_packed(core, q, k, v, attn_mask=valid[:, None, None, :])
    # the pattern's mask in layout order [condition; text; grid], moved to model order
    plain = TokenLayout(GRID, text_len=TEXT + 6, text_first=True)
    qi, ki = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    mask_layout = pattern.mask_mod(plain)(qi, ki)
    model_of_layout = torch.cat([torch.arange(TEXT + 24, s), torch.arange(TEXT), torch.arange(TEXT, TEXT + 24)])
    mask = torch.zeros(s, s, dtype=torch.bool)
    mask[model_of_layout[:, None], model_of_layout[None, :]] = mask_layout
    mask = mask & valid[0][None, :]
    want = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_mask=mask).transpose(1, 2)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_packed_layout_is_plain_when_the_order_already_fits():
    assert type(packed_layout(GRID, [("text", 5), ("grid", 24)])) is TokenLayout
    assert type(packed_layout(GRID, [("grid", 24), ("dense", 3), ("text", 5)], text_first=False)) is TokenLayout
    assert type(packed_layout(GRID, [("text", 5), ("grid", 24), ("dense", 0)])) is TokenLayout
    assert isinstance(packed_layout(GRID, [("text", 5), ("grid", 24), ("dense", 2)]), PackedLayout)
    with pytest.raises(ValueError, match="grid tokens"):
        PackedLayout(GRID, text_len=5, runs=(("text", 5), ("grid", 20)))


@torch.no_grad()
def test_layered_layers_form_one_grid():
    """Qwen-Image-Layered (use_layer3d_rope): the target's layers are frames of one (L, H, W) grid;
    the final condition image is dense."""
    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(**CONFIG, use_layer3d_rope=True).eval()
    inputs = make_inputs(images=(GRID, GRID, GRID, (2, 3)))
    base = run(model, inputs)
    handle = diffattn.apply(model, SlidingWindow((3, 4, 6)))
    torch.testing.assert_close(run(model, inputs), base, atol=1e-5, rtol=1e-5)
    layout = handle.states["transformer"].layout
    assert (layout.grid, layout.text_len) == ((3, *GRID), TEXT + 6)
    diffattn.apply(model, SlidingWindow((1, 3, 3)))
    assert torch.isfinite(run(model, inputs)).all()
    diffattn.remove(model)


def test_img_shapes_that_do_not_fit_run_dense_with_a_warning(model, inputs):
    bad = dict(inputs, img_shapes=[[(1, 5, 5)]])
    with pytest.warns(UserWarning, match="do not describe"):
        assert ADAPTER.token_layout(model, (), bad) is None  # the call then runs diffusers' dense attention


def test_refuses_a_foreign_processor(model):
    from diffusers.models.attention_processor import AttnProcessor2_0

    model.set_attn_processor(AttnProcessor2_0())
    try:
        with pytest.raises(ValueError, match="QwenDoubleStreamAttnProcessor2_0"):
            diffattn.apply(model, SlidingWindow((3, 3)))
    finally:
        model.set_attn_processor(QwenDoubleStreamAttnProcessor2_0())


def test_timestep_in_scheduler_units():
    assert ADAPTER.timestep((), {"timestep": torch.tensor([0.25])}) == 250.0


def test_released_shape_on_meta():
    with torch.device("meta"):
        model = QwenImageTransformer2DModel()  # Qwen-Image 20B layout: 60 blocks
    handle = diffattn.apply(model, SlidingWindow((16, 16)), dense_layers=2)
    assert handle.replaced["transformer"] == [f"transformer_blocks.{i}.attn.processor" for i in range(60)]
    diffattn.remove(model)
