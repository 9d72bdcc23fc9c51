"""diffattn.apply / remove on a tiny random-weight Wan transformer, saved and loaded back."""

import pytest
import torch
from diffusers import WanTransformer3DModel

import diffattn
from diffattn import Dense, Radial, SlidingWindow


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.manual_seed(0)
    built = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=8, freq_dim=8, ffn_dim=32, num_layers=3, rope_max_seq_len=32,
    )
    path = tmp_path_factory.mktemp("wan") / "transformer"
    built.save_pretrained(path)
    return WanTransformer3DModel.from_pretrained(path).eval()


@pytest.fixture
def inputs():
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(1, 4, 3, 8, 10, generator=gen), torch.tensor([500]), torch.randn(1, 5, 8, generator=gen))


@torch.no_grad()
def run(model, inputs):
    return model(*inputs).sample


@torch.no_grad()
def test_dense_is_bit_exact_and_remove_restores(model, inputs):
    base = run(model, inputs)
    handle = diffattn.apply(model, Dense())
    assert handle.replaced["transformer"] == [f"blocks.{i}.attn1.processor" for i in range(3)]
    assert torch.equal(run(model, inputs), base)
    diffattn.apply(model, SlidingWindow((1, 3, 3)))
    assert not torch.allclose(run(model, inputs), base)
    diffattn.remove(model)
    assert torch.equal(run(model, inputs), base)
    with pytest.raises(ValueError, match="not applied"):
        diffattn.remove(model)


@torch.no_grad()
def test_window_covering_the_grid_matches_default(model, inputs):
    base = run(model, inputs)
    diffattn.apply(model, SlidingWindow((3, 4, 5)))  # the whole (3, 4, 5) token grid
    torch.testing.assert_close(run(model, inputs), base, atol=1e-5, rtol=1e-5)
    diffattn.remove(model)


@torch.no_grad()
def test_small_window_is_finite_and_differs(model, inputs):
    base = run(model, inputs)
    diffattn.apply(model, SlidingWindow((1, 3, 3), stride=(1, 1, 2)))
    out = run(model, inputs)
    diffattn.remove(model)
    assert torch.isfinite(out).all() and (out - base).abs().max() > 1e-3


@torch.no_grad()
def test_dense_layers_and_cross_attention_untouched(model, inputs):
    base = run(model, inputs)
    cross = {n: p for n, p in model.attn_processors.items() if "attn2" in n}
    diffattn.apply(model, SlidingWindow((1, 3, 3)), dense_layers=3)  # every block dense
    assert torch.equal(run(model, inputs), base)
    assert all(model.attn_processors[n] is p for n, p in cross.items())
    diffattn.remove(model)


@torch.no_grad()
def test_apply_twice_replaces_cleanly(model, inputs):
    base = run(model, inputs)
    diffattn.apply(model, SlidingWindow((1, 3, 3)))
    diffattn.apply(model, Radial(0.2, block=16))
    diffattn.remove(model)
    assert torch.equal(run(model, inputs), base)


def test_bad_arguments(model):
    with pytest.raises(TypeError, match="pattern"):
        diffattn.apply(model, "window")
    with pytest.raises(ValueError, match="impl"):
        diffattn.apply(model, Dense(), impl="cuda")
    with pytest.raises(ValueError, match="dense_steps"):
        diffattn.apply(model, Dense(), dense_steps=-1)
    with pytest.raises(ValueError, match="no adapter"):
        diffattn.apply(torch.nn.Linear(2, 2), Dense())
    with pytest.raises(TypeError, match="pipeline"):
        diffattn.apply(object(), Dense())


@torch.no_grad()
def test_step_index_from_timesteps_without_scheduler(model, inputs):
    x, _, enc = inputs
    handle = diffattn.apply(model, Dense())
    state = handle.states["transformer"]
    steps = []
    for t in (900, 900, 600, 600, 300, 900, 600):  # CFG pairs, then a new generation
        model(x, torch.tensor([t]), enc)
        steps.append(state.step)
    diffattn.remove(model)
    assert steps == [0, 0, 1, 1, 2, 0, 1]


@torch.no_grad()
def test_resolution_change_between_calls(model):
    diffattn.apply(model, SlidingWindow((1, 3, 3)))
    enc = torch.randn(1, 5, 8)
    for shape in ((1, 4, 3, 8, 10), (1, 4, 2, 12, 6)):
        out = model(torch.randn(shape), torch.tensor([500]), enc).sample
        assert out.shape == shape and torch.isfinite(out).all()
    diffattn.remove(model)


@torch.no_grad()
def test_sparse_processors_for_set_attn_processor(model, inputs):
    base = run(model, inputs)
    diffattn.apply(model, SlidingWindow((1, 3, 3)))
    want = run(model, inputs)
    diffattn.remove(model)
    model.set_attn_processor(diffattn.sparse_processors(model, SlidingWindow((1, 3, 3))))
    assert torch.equal(run(model, inputs), want)
    diffattn.remove(model)
    assert torch.equal(run(model, inputs), base)


def _cache_configs():
    from diffusers.hooks import FirstBlockCacheConfig, PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig

    return {
        "first_block": FirstBlockCacheConfig(threshold=0.05),
        "pyramid_attention_broadcast": PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(100, 950),
            current_timestep_callback=lambda: 500),
        "taylorseer": TaylorSeerCacheConfig(),
    }


@pytest.mark.parametrize("cache", ["first_block", "pyramid_attention_broadcast", "taylorseer"])
@torch.no_grad()
def test_composes_with_diffusers_caches(model, inputs, cache):
    diffattn.apply(model, SlidingWindow((1, 3, 3)))
    model.enable_cache(_cache_configs()[cache])
    x, t, enc = inputs
    with model.cache_context("cond"):
        outs = [model(x, torch.tensor([s]), enc).sample for s in (900, 800, 700, 600)]
    model.disable_cache()
    diffattn.remove(model)
    assert all(torch.isfinite(o).all() for o in outs)


def test_real_shapes_on_meta():
    with torch.device("meta"):
        t2v = WanTransformer3DModel(num_layers=2)  # Wan2.1-14B layout, two blocks
        i2v = WanTransformer3DModel(num_layers=2, image_dim=1280, added_kv_proj_dim=5120)  # Wan2.1-I2V layout
    for model in (t2v, i2v):
        handle = diffattn.apply(model, Radial(0.2), dense_layers=1)
        assert handle.replaced["transformer"] == ["blocks.0.attn1.processor", "blocks.1.attn1.processor"]
        diffattn.remove(model)


@torch.no_grad()
def test_i2v_image_context_branch_untouched():
    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=8,
                                  out_channels=4, text_dim=8, freq_dim=8, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
                                  image_dim=12, added_kv_proj_dim=32).eval()
    x, t = torch.randn(1, 8, 3, 8, 10), torch.tensor([500])
    enc, img = torch.randn(1, 512, 8), torch.randn(1, 4, 12)
    base = model(x, t, enc, encoder_hidden_states_image=img).sample
    diffattn.apply(model, SlidingWindow((3, 4, 5)))
    torch.testing.assert_close(model(x, t, enc, encoder_hidden_states_image=img).sample, base, atol=1e-5, rtol=1e-5)
    diffattn.apply(model, Dense())
    assert torch.equal(model(x, t, enc, encoder_hidden_states_image=img).sample, base)
    diffattn.remove(model)


@pytest.mark.skipif(__import__("os").environ.get("TRITON_INTERPRET") != "1", reason="kernel under the interpreter")
@torch.no_grad()
def test_block_compiles_without_graph_breaks(model, inputs):
    """A transformer block with diffattn's processor compiles with fullgraph=True (kernel path)."""
    import torch._dynamo

    handle = diffattn.apply(model, SlidingWindow((1, 3, 3)), impl="triton")
    run(model, inputs)  # eager: records the layout
    state = handle.states["transformer"]
    from diffattn.tokens import TokenLayout

    state.layout = TokenLayout((3, 4, 5))
    block = model.blocks[0]
    hidden = torch.randn(1, 60, 32)
    enc = torch.randn(1, 5, 32)
    temb = torch.randn(1, 6, 32)
    rope = model.rope(inputs[0])
    eager = block(hidden, enc, temb, rope)
    torch._dynamo.reset()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)(hidden, enc, temb, rope)
    diffattn.remove(model)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
