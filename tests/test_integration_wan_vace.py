"""diffattn on Wan VACE: a tiny random-weight WanVACETransformer3DModel (saved and loaded back) and
the released 14B layout on the meta device. VACE shares Wan's processor; its control blocks are
sparse too."""

import pytest
import torch
from diffusers import WanVACETransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

import diffattn
from diffattn import Dense, Radial, SlidingWindow, TokenLayout
from diffattn.integration.families.wan import WanSparseProcessor

CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
              text_dim=8, freq_dim=8, ffn_dim=32, num_layers=3, rope_max_seq_len=32, vace_layers=[0, 2],
              vace_in_channels=6)
NAMES = ["vace_blocks.0.attn1.processor", "vace_blocks.1.attn1.processor",
         "blocks.0.attn1.processor", "blocks.1.attn1.processor", "blocks.2.attn1.processor"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.manual_seed(0)
    built = WanVACETransformer3DModel(**CONFIG)
    path = tmp_path_factory.mktemp("wan_vace") / "transformer"
    built.save_pretrained(path)
    return WanVACETransformer3DModel.from_pretrained(path).eval()


@pytest.fixture
def inputs():
    gen = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(1, 4, 3, 8, 10, generator=gen), timestep=torch.tensor([500]),
                encoder_hidden_states=torch.randn(1, 5, 8, generator=gen),
                control_hidden_states=torch.randn(1, 6, 3, 8, 10, generator=gen))


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
    assert torch.equal(run(model, inputs), base)
    assert handle.states["transformer"].layout == TokenLayout((3, 4, 5))
    diffattn.apply(model, SlidingWindow((1, 3, 3)))
    assert not torch.allclose(run(model, inputs), base)
    diffattn.remove(model)
    assert all(model.attn_processors[n] is p for n, p in before.items())
    assert all(type(p) is WanAttnProcessor for p in model.attn_processors.values())
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
def test_control_blocks_are_sparse_and_count_as_their_layer(model, inputs):
    base = run(model, inputs)
    procs_before = model.attn_processors
    diffattn.apply(model, SlidingWindow((1, 3, 3)), dense_layers=1)
    procs = model.attn_processors
    # control block j is layer vace_layers[j]; slots (step cache, selection) are all distinct
    assert [procs[n].core.layer for n in NAMES] == [0, 2, 0, 1, 2]
    assert len({procs[n].core.slot for n in NAMES}) == len(NAMES)
    assert all(procs[n] is p for n, p in procs_before.items() if "attn2" in n)  # cross-attention untouched
    diffattn.apply(model, SlidingWindow((1, 3, 3)), dense_layers=3)  # every layer dense, control blocks too
    assert torch.equal(run(model, inputs), base)


@torch.no_grad()
def test_control_branch_alone_sparse_changes_the_output(model, inputs):
    base = run(model, inputs)
    original = model.attn_processors
    processors = diffattn.sparse_processors(model, SlidingWindow((1, 3, 3)))
    for name in NAMES[2:]:  # main blocks back to diffusers' processor: only the control branch is sparse
        processors[name] = original[name]
    model.set_attn_processor(processors)
    out = run(model, inputs)
    assert torch.isfinite(out).all() and (out - base).abs().max() > 1e-4


@torch.no_grad()
def test_resolution_change_between_calls(model, inputs):
    handle = diffattn.apply(model, SlidingWindow((1, 3, 3)))
    for shape in ((3, 8, 10), (2, 12, 6)):
        x = torch.randn(1, 4, *shape)
        ctrl = torch.randn(1, 6, *shape)
        out = model(x, torch.tensor([500]), inputs["encoder_hidden_states"], control_hidden_states=ctrl).sample
        assert out.shape == x.shape and torch.isfinite(out).all()
        assert handle.states["transformer"].layout == TokenLayout((shape[0], shape[1] // 2, shape[2] // 2))


def test_released_shapes_on_meta():
    with torch.device("meta"):
        model = WanVACETransformer3DModel()  # Wan2.1-VACE-14B layout: 40 blocks, 8 control blocks
    handle = diffattn.apply(model, Radial(0.2), dense_layers=1)
    names = handle.replaced["transformer"]
    assert len(names) == 48 and names[:8] == [f"vace_blocks.{j}.attn1.processor" for j in range(8)]
    diffattn.remove(model)
