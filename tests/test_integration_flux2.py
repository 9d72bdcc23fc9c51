"""diffattn on FLUX.2: a tiny random-weight Flux2Transformer2DModel (saved and loaded back), its two
kinds of attention, reference images of an editing call, the KV-cache processors refused, and the
released shape on the meta device."""

import inspect

import pytest
import torch
from diffusers import Flux2Transformer2DModel
from diffusers.models.transformers.transformer_flux2 import (
    Flux2AttnProcessor,
    Flux2KVAttnProcessor,
    Flux2KVParallelSelfAttnProcessor,
    Flux2ParallelSelfAttnProcessor,
)

import diffattn
from diffattn import Dense, Radial, SlidingWindow, TokenLayout
from diffattn.integration.families._packed import PackedLayout
from diffattn.integration.families.flux2 import (
    ADAPTER,
    Flux2SingleSparseProcessor,
    Flux2SparseProcessor,
    target_grid,
)

GRID = (4, 6)
TEXT = 5
CONFIG = dict(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=16,
              num_attention_heads=2, joint_attention_dim=16, timestep_guidance_channels=16, axes_dims_rope=(4, 4, 4, 4))
DOUBLE = ["transformer_blocks.0.attn.processor", "transformer_blocks.1.attn.processor"]
SINGLE = ["single_transformer_blocks.0.attn.processor", "single_transformer_blocks.1.attn.processor"]


def ids(h, w, t=0):
    grid = torch.cartesian_prod(torch.tensor([t]), torch.arange(h), torch.arange(w), torch.tensor([0]))
    return grid.float()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.manual_seed(0)
    built = Flux2Transformer2DModel(**CONFIG)
    path = tmp_path_factory.mktemp("flux2") / "transformer"
    built.save_pretrained(path)
    return Flux2Transformer2DModel.from_pretrained(path).eval()


def make_inputs(refs=(), seed=1):
    gen = torch.Generator().manual_seed(seed)
    img_ids = torch.cat([ids(*GRID)] + [ids(h, w, t=10 * (i + 1)) for i, (h, w) in enumerate(refs)])
    return dict(hidden_states=torch.randn(1, img_ids.shape[0], 8, generator=gen),
                encoder_hidden_states=torch.randn(1, TEXT, 16, generator=gen), timestep=torch.tensor([0.5]),
                img_ids=img_ids[None], txt_ids=torch.zeros(1, TEXT, 4), guidance=torch.tensor([4.0]))


@pytest.fixture
def inputs():
    return make_inputs()


@torch.no_grad()
def run(model, inputs):
    return model(**inputs).sample


def test_processors_declare_exactly_diffusers_parameters():
    for ours, theirs in ((Flux2SparseProcessor, Flux2AttnProcessor),
                         (Flux2SingleSparseProcessor, Flux2ParallelSelfAttnProcessor)):
        assert list(inspect.signature(ours.__call__).parameters) == list(inspect.signature(theirs.__call__).parameters)


@torch.no_grad()
def test_dense_is_bit_exact_and_remove_restores(model, inputs):
    base = run(model, inputs)
    before = model.attn_processors
    handle = diffattn.apply(model, Dense())
    assert handle.family == "flux2" and handle.replaced["transformer"] == DOUBLE + SINGLE
    procs = model.attn_processors
    assert all(type(procs[n]) is Flux2SparseProcessor for n in DOUBLE)
    assert all(type(procs[n]) is Flux2SingleSparseProcessor for n in SINGLE)
    assert [procs[n].core.layer for n in DOUBLE + SINGLE] == [0, 1, 2, 3]
    assert torch.equal(run(model, inputs), base)
    assert handle.states["transformer"].layout == TokenLayout(GRID, text_len=TEXT, text_first=True)
    diffattn.apply(model, SlidingWindow((3, 3)))
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
    diffattn.apply(model, SlidingWindow((3, 3)))
    out = run(model, inputs)
    assert torch.isfinite(out).all() and (out - base).abs().max() > 1e-3


@torch.no_grad()
def test_dense_layers_count_double_then_single_blocks(model, inputs):
    base = run(model, inputs)
    diffattn.apply(model, SlidingWindow((3, 3)), dense_layers=4)
    assert torch.equal(run(model, inputs), base)
    diffattn.apply(model, SlidingWindow((3, 3)), dense_layers=2)  # only the single-stream blocks sparse
    mixed = run(model, inputs)
    assert torch.isfinite(mixed).all() and not torch.allclose(mixed, base, atol=1e-4)


@torch.no_grad()
def test_reference_images_are_dense(model):
    """An editing call appends reference tokens (t = 10, 20, ...) after the target: dense, like text."""
    inputs = make_inputs(refs=((2, 3), (3, 2)))
    base = run(model, inputs)
    handle = diffattn.apply(model, SlidingWindow(GRID))
    torch.testing.assert_close(run(model, inputs), base, atol=1e-5, rtol=1e-5)
    layout = handle.states["transformer"].layout
    assert isinstance(layout, PackedLayout)
    assert (layout.grid, layout.text_len, layout.runs) == (GRID, TEXT + 12, (("text", 5), ("grid", 24), ("dense", 12)))
    diffattn.apply(model, SlidingWindow((3, 3)))
    out = run(model, inputs)
    assert torch.isfinite(out).all() and (out - base).abs().max() > 1e-3


def test_target_grid_from_img_ids():
    assert target_grid(ids(*GRID), 24) == (GRID, 24, "")
    with_refs = torch.cat([ids(*GRID), ids(2, 3, t=10)])
    assert target_grid(with_refs, 30) == (GRID, 24, "")
    transposed = ids(*GRID)[:, [0, 2, 1, 3]]
    assert target_grid(transposed, 24)[0] is None
    assert target_grid(ids(*GRID), 25)[0] is None


@torch.no_grad()
def test_img_ids_that_are_not_a_grid_run_dense_with_a_warning(model, inputs):
    order = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    shuffled = dict(inputs, img_ids=inputs["img_ids"][:, order])
    base = run(model, shuffled)
    diffattn.apply(model, SlidingWindow((3, 3)))
    with pytest.warns(UserWarning, match="not one \\(H, W\\) grid"):
        assert torch.equal(run(model, shuffled), base)  # exactly diffusers' dense result for those ids


def test_kv_cache_processors_are_refused(model):
    model.transformer_blocks[0].attn.set_processor(Flux2KVAttnProcessor())
    model.single_transformer_blocks[0].attn.set_processor(Flux2KVParallelSelfAttnProcessor())
    try:
        with pytest.raises(ValueError, match="KV cache"):
            diffattn.apply(model, SlidingWindow((3, 3)))
    finally:
        model.transformer_blocks[0].attn.set_processor(Flux2AttnProcessor())
        model.single_transformer_blocks[0].attn.set_processor(Flux2ParallelSelfAttnProcessor())
    with pytest.raises(ValueError, match="kv_cache_mode"):
        ADAPTER.token_layout(model, (), {"kv_cache_mode": "extract"})


def test_timestep_in_scheduler_units():
    assert ADAPTER.timestep((), {"timestep": torch.tensor([0.75])}) == 750.0


def test_released_shapes_on_meta():
    with torch.device("meta"):
        dev = Flux2Transformer2DModel(num_layers=2, num_single_layers=2)  # FLUX.2 [dev] layout, fewer blocks
        klein = Flux2Transformer2DModel(num_layers=2, num_single_layers=2, num_attention_heads=24,
                                        joint_attention_dim=7680, guidance_embeds=False)  # [klein]-like
    for model in (dev, klein):
        handle = diffattn.apply(model, Radial(0.2), dense_layers=1)
        assert handle.replaced["transformer"] == DOUBLE + SINGLE
        diffattn.remove(model)
