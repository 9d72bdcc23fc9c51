"""diffattn on Z-Image: tiny random-weight ZImageTransformer2DModels (saved and loaded back) in basic
mode ([grid | padding | caption | batch padding]) and Omni mode ([captions | condition image | grid |
padding | SigLIP | batch padding], reordered per row), and the released shape on the meta device."""

import inspect

import pytest
import torch
import torch.nn.functional as F
from diffusers import ZImageTransformer2DModel
from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor

import diffattn
from diffattn import Dense, Radial, SlidingWindow, TokenLayout
from diffattn.integration.apply import _installed_hook
from diffattn.integration.families.z_image import ADAPTER, RowsLayout, ZImageSparseProcessor
from diffattn.integration.processors import attn_processors

CONFIG = dict(in_channels=4, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16,
              axes_dims=[4, 6, 6], axes_lens=[256, 32, 32])
NAMES = ["layers.0.attention.processor", "layers.1.attention.processor"]
GRID = (4, 5)  # latent 8 x 10, patch 2: 20 tokens, padded to 32


def load(tmp_path_factory, name, **config):
    torch.manual_seed(0)
    built = ZImageTransformer2DModel(**dict(CONFIG, **config))
    with torch.no_grad():  # zeros in diffusers: give the padding tokens content
        built.x_pad_token.normal_()
        built.cap_pad_token.normal_()
    path = tmp_path_factory.mktemp(name) / "transformer"
    built.save_pretrained(path)
    return ZImageTransformer2DModel.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load(tmp_path_factory, "z_image")


@pytest.fixture(scope="module")
def omni(tmp_path_factory):
    return load(tmp_path_factory, "z_image_omni", siglip_feat_dim=8)


@pytest.fixture(autouse=True)
def clean(request):
    yield
    for name in ("model", "omni"):
        if name in request.fixturenames:
            transformer = request.getfixturevalue(name)
            if _installed_hook(transformer) is not None:
                diffattn.remove(transformer)


def make_inputs(caps=(5, 40), height=8, width=10, seed=1):
    """A batch of one row per caption length (a CFG pair by default: 32 and 64 caption tokens padded)."""
    gen = torch.Generator().manual_seed(seed)
    return dict(x=[torch.randn(4, 1, height, width, generator=gen) for _ in caps],
                t=torch.full((len(caps),), 0.3), cap_feats=[torch.randn(n, 16, generator=gen) for n in caps])


def omni_inputs(seed=2):
    """Two rows: [caption, caption] x [condition 6x6, target 8x10], SigLIP for the condition image; the
    rows' captions differ in length, so the grid starts at another position in each row."""
    gen = torch.Generator().manual_seed(seed)
    return dict(x=[[torch.randn(4, 1, 6, 6, generator=gen), torch.randn(4, 1, 8, 10, generator=gen)] for _ in range(2)],
                t=torch.full((2,), 0.3),
                cap_feats=[[torch.randn(5, 16, generator=gen), torch.randn(7, 16, generator=gen)],
                           [torch.randn(40, 16, generator=gen), torch.randn(3, 16, generator=gen)]],
                siglip_feats=[[torch.randn(3, 3, 8, generator=gen), None] for _ in range(2)],
                image_noise_mask=[[0, 1], [0, 1]])


@pytest.fixture
def inputs():
    return make_inputs()


@torch.no_grad()
def run(model, inputs):
    return torch.stack(model(**inputs).sample)


def test_processor_declares_exactly_diffusers_parameters():
    ours = list(inspect.signature(ZImageSparseProcessor.__call__).parameters)
    assert ours == list(inspect.signature(ZSingleStreamAttnProcessor.__call__).parameters)


@torch.no_grad()
def test_dense_is_bit_exact_and_remove_restores(model, inputs):
    base = run(model, inputs)
    before = attn_processors(model)
    handle = diffattn.apply(model, Dense())
    assert handle.family == "z_image" and handle.replaced["transformer"] == NAMES
    assert all(attn_processors(model)[n] is p for n, p in before.items() if "refiner" in n)
    assert torch.equal(run(model, inputs), base)
    # [grid 20 | image padding 12 | caption 32 or 64 | batch padding]: everything after the grid dense
    assert handle.states["transformer"].layout == TokenLayout(GRID, text_len=12 + 64, text_first=False)
    diffattn.apply(model, SlidingWindow((3, 3)))
    assert not torch.allclose(run(model, inputs), base)
    diffattn.remove(model)
    assert all(attn_processors(model)[n] is p for n, p in before.items())
    assert torch.equal(run(model, inputs), base)


@pytest.mark.parametrize("caps", [(5, 40), (7,)])
@torch.no_grad()
def test_window_covering_the_grid_matches_default(model, caps):
    inputs = make_inputs(caps)
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
def test_resolution_change_and_mixed_sizes(model):
    handle = diffattn.apply(model, SlidingWindow((3, 3)))
    for height, width in ((16, 12), (6, 14)):
        out = run(model, make_inputs(height=height, width=width))
        assert out.shape == (2, 4, 1, height, width) and torch.isfinite(out).all()
        grid = (height // 2, width // 2)
        assert handle.states["transformer"].layout.grid == grid
    mixed = make_inputs()
    mixed["x"][1] = torch.randn(4, 1, 12, 10)
    with pytest.warns(UserWarning, match="mixes target sizes"):
        out = model(**mixed).sample
    assert handle.states["transformer"].layout is None and all(torch.isfinite(o).all() for o in out)


def test_timestep_in_scheduler_units():
    assert float(ADAPTER.timestep((), dict(t=torch.tensor([0.25, 0.25])))) == pytest.approx(750.0)


@torch.no_grad()
def test_omni_rows_are_reordered(omni):
    inputs = omni_inputs()
    base = run(omni, inputs)
    handle = diffattn.apply(omni, Dense())
    out = run(omni, inputs)
    torch.testing.assert_close(out, base, atol=1e-6, rtol=1e-6)  # the same attention, keys in another order
    layout = handle.states["transformer"].layout
    # row 0: captions 32 + 32, condition 32 -> grid at 96, + target 32 + SigLIP 32 + 32 = 192 of 224
    assert isinstance(layout, RowsLayout) and layout.grid == GRID and layout.text_first
    assert layout.rows == ((96, 192), (128, 224)) and layout.seq_len == 224
    diffattn.apply(omni, SlidingWindow(GRID))
    torch.testing.assert_close(run(omni, inputs), base, atol=1e-5, rtol=1e-5)
    diffattn.apply(omni, SlidingWindow((3, 3)))
    out = run(omni, inputs)
    assert torch.isfinite(out).all() and (out - base).abs().max() > 1e-3


@pytest.mark.parametrize("pattern", [SlidingWindow((3, 3)), Radial(0.2, block=16)])
@torch.no_grad()
def test_omni_attention_is_the_pattern_in_model_order(omni, pattern):
    """One block's sparse attention over two rows with the grid at different places equals masked
    SDPA in model order: grid queries attend grid keys by the pattern and every dense key, dense
    queries attend every key, batch padding is masked."""
    layout = RowsLayout(GRID, text_len=224 - 20, text_first=True, rows=((96, 192), (128, 224)))
    attn = omni.layers[0].attention
    handle = diffattn.apply(omni, pattern, impl="reference")
    handle.states["transformer"].layout = layout
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 224, 32, generator=gen)
    freqs = torch.polar(torch.ones(2, 224, 8), torch.randn(2, 224, 8, generator=gen))
    valid = torch.arange(224)[None, :] < torch.tensor([[192], [224]])
    out = attn_processors(omni)[NAMES[0]](attn, hidden, None, valid, freqs)

    q = attn.norm_q(attn.to_q(hidden).unflatten(-1, (2, -1)))
    k = attn.norm_k(attn.to_k(hidden).unflatten(-1, (2, -1)))
    v = attn.to_v(hidden).unflatten(-1, (2, -1))
    rotate = lambda x: torch.view_as_real(torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))  # noqa: E731
                                          * freqs.unsqueeze(2)).flatten(3)
    q, k = rotate(q), rotate(k)
    qi, ki = torch.meshgrid(torch.arange(224), torch.arange(224), indexing="ij")
    mask_layout = pattern.mask_mod(TokenLayout(GRID, text_len=204, text_first=True))(qi, ki)
    wants = []
    for row, (start, length) in enumerate(layout.rows):
        model_of_layout = torch.cat([torch.arange(0, start), torch.arange(start + 20, length),
                                     torch.arange(length, 224), torch.arange(start, start + 20)])
        mask = torch.zeros(224, 224, dtype=torch.bool)
        mask[model_of_layout[:, None], model_of_layout[None, :]] = mask_layout
        mask &= valid[row][None, :]
        wants.append(F.scaled_dot_product_attention(q[row : row + 1].transpose(1, 2), k[row : row + 1].transpose(1, 2),
                                                    v[row : row + 1].transpose(1, 2), attn_mask=mask).transpose(1, 2))
    want = attn.to_out[0](torch.cat(wants).flatten(2, 3))
    torch.testing.assert_close(out[0, :192], want[0, :192], atol=1e-5, rtol=1e-5)  # batch padding rows aside
    torch.testing.assert_close(out[1], want[1], atol=1e-5, rtol=1e-5)


def test_released_shape_on_meta():
    with torch.device("meta"):
        model = ZImageTransformer2DModel(n_layers=2)  # Z-Image layout, two main blocks
    handle = diffattn.apply(model, Radial(0.2), dense_layers=1)
    assert handle.replaced["transformer"] == NAMES
    diffattn.remove(model)
