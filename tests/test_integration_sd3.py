"""diffattn.apply / remove on tiny random-weight SD3 (joint attention) and SD3.5 (joint attention
plus MMDiT-X image-only ``attn2``) transformers, saved and loaded back."""

import pytest
import torch
from diffusers import SD3Transformer2DModel

import diffattn
from diffattn import Dense, Radial, SlidingWindow, TokenLayout
from diffattn.integration.families.sd3 import SD3SparseProcessor

TINY = dict(sample_size=16, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=8, caption_projection_dim=32, pooled_projection_dim=8, out_channels=4,
            pos_embed_max_size=16)
CONFIGS = {
    "sd3": dict(TINY),
    "sd35": dict(TINY, dual_attention_layers=(0, 1), qk_norm="rms_norm"),  # SD3.5 Medium style
}
NAMES = {
    "sd3": [f"transformer_blocks.{i}.attn.processor" for i in range(3)],
    "sd35": ["transformer_blocks.0.attn.processor", "transformer_blocks.0.attn2.processor",
             "transformer_blocks.1.attn.processor", "transformer_blocks.1.attn2.processor",
             "transformer_blocks.2.attn.processor"],
}
GRID = (4, 6)  # latents 8 x 12, patch 2
TEXT_LEN = 5


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def variant(request, tmp_path_factory):
    torch.manual_seed(0)
    built = SD3Transformer2DModel(**CONFIGS[request.param])
    path = tmp_path_factory.mktemp(request.param) / "transformer"
    built.save_pretrained(path)
    return request.param, SD3Transformer2DModel.from_pretrained(path).eval()


@pytest.fixture
def model(variant):
    return variant[1]


@pytest.fixture
def inputs():
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(1, 4, 8, 12, generator=gen), torch.randn(1, TEXT_LEN, 8, generator=gen),
            torch.randn(1, 8, generator=gen), torch.tensor([500]))


@torch.no_grad()
def run(model, inputs):
    return model(*inputs).sample


@torch.no_grad()
def test_dense_is_bit_exact_and_remove_restores(variant, inputs):
    kind, model = variant
    base = run(model, inputs)
    handle = diffattn.apply(model, Dense())
    assert handle.family == "sd3"
    assert handle.replaced["transformer"] == NAMES[kind]
    assert all(isinstance(model.attn_processors[n], SD3SparseProcessor) for n in NAMES[kind])
    assert torch.equal(run(model, inputs), base)
    diffattn.apply(model, SlidingWindow((3, 3)))
    assert not torch.allclose(run(model, inputs), base)
    diffattn.remove(model)
    assert torch.equal(run(model, inputs), base)
    with pytest.raises(ValueError, match="not applied"):
        diffattn.remove(model)


@torch.no_grad()
def test_window_covering_the_grid_matches_default(model, inputs):
    base = run(model, inputs)
    diffattn.apply(model, SlidingWindow(GRID))  # the whole (4, 6) token grid
    torch.testing.assert_close(run(model, inputs), base, atol=1e-5, rtol=1e-5)
    diffattn.remove(model)


@torch.no_grad()
def test_small_window_is_finite_and_differs(model, inputs):
    base = run(model, inputs)
    diffattn.apply(model, SlidingWindow((3, 3)))
    out = run(model, inputs)
    diffattn.remove(model)
    assert torch.isfinite(out).all() and (out - base).abs().max() > 1e-3


@torch.no_grad()
def test_every_layer_dense_is_bit_exact(variant, inputs):
    kind, model = variant
    base = run(model, inputs)
    diffattn.apply(model, SlidingWindow((3, 3)), dense_layers=len(NAMES[kind]))
    assert torch.equal(run(model, inputs), base)
    diffattn.remove(model)


@torch.no_grad()
def test_apply_twice_replaces_cleanly(model, inputs):
    base = run(model, inputs)
    diffattn.apply(model, SlidingWindow((3, 3)))
    diffattn.apply(model, Radial(0.2, block=16))
    assert torch.isfinite(run(model, inputs)).all()
    diffattn.remove(model)
    assert torch.equal(run(model, inputs), base)


@torch.no_grad()
def test_layout_has_text_after_the_image(model, inputs):
    handle = diffattn.apply(model, SlidingWindow((3, 3)))
    run(model, inputs)
    diffattn.remove(model)
    assert handle.states["transformer"].layout == TokenLayout(GRID, text_len=TEXT_LEN, text_first=False)


class _Spy:
    """A stand-in core: records q, k, v and returns v."""

    def __init__(self):
        self.qkv = None

    def attend(self, q, k, v, **kwargs):
        self.qkv = (q, k, v)
        return v


@torch.no_grad()
def test_processor_puts_image_tokens_first_then_text(variant):
    """The sequence the processor attends over is [image; text], as diffusers concatenates it."""
    _, model = variant
    attn = model.transformer_blocks[0].attn
    image, text = torch.randn(2, 24, 32), torch.randn(2, TEXT_LEN, 32)
    spy = _Spy()
    SD3SparseProcessor(spy)(attn, image, text)
    q, k, v = spy.qkv
    assert q.shape == (2, 24 + TEXT_LEN, 2, 16)
    image_v = attn.to_v(image).unflatten(2, (2, 16))
    text_v = attn.add_v_proj(text).unflatten(2, (2, 16))
    assert torch.equal(v[:, :24], image_v) and torch.equal(v[:, 24:], text_v)
    text_q = attn.add_q_proj(text).unflatten(2, (2, 16))
    if attn.norm_added_q is not None:
        text_q = attn.norm_added_q(text_q)
    torch.testing.assert_close(q[:, 24:], text_q, atol=0, rtol=0)


@torch.no_grad()
def test_image_only_attn2_gets_a_text_free_layout(inputs):
    """SD3.5's attn2 sees the image tokens only: its sparse attention runs on the bare grid."""
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**dict(TINY, num_layers=2, dual_attention_layers=(0,))).eval()
    base = run(model, inputs)
    # layer indices in execution order: 0 = block 0 attn, 1 = block 0 attn2, 2 = block 1 attn
    handle = diffattn.apply(model, SlidingWindow((3, 3)), dense_layers=1)
    out = run(model, inputs)  # would raise if attn2 were given the joint (image + text) layout
    diffattn.remove(model)
    assert handle.replaced["transformer"][1] == "transformer_blocks.0.attn2.processor"
    assert torch.isfinite(out).all() and (out - base).abs().max() > 1e-4


@torch.no_grad()
def test_step_index_from_timesteps_without_scheduler(model, inputs):
    x, enc, pooled, _ = inputs
    handle = diffattn.apply(model, Dense())
    state = handle.states["transformer"]
    steps = []
    for t in (900, 900, 600, 600, 300, 900, 600):  # CFG pairs, then a new generation
        model(x, enc, pooled, torch.tensor([t]))
        steps.append(state.step)
    diffattn.remove(model)
    assert steps == [0, 0, 1, 1, 2, 0, 1]


@torch.no_grad()
def test_keyword_call_and_resolution_change(model):
    diffattn.apply(model, SlidingWindow((3, 3)))
    for shape in ((1, 4, 8, 12), (2, 4, 12, 6)):
        out = model(hidden_states=torch.randn(shape), encoder_hidden_states=torch.randn(shape[0], 7, 8),
                    pooled_projections=torch.randn(shape[0], 8), timestep=torch.tensor([500] * shape[0])).sample
        assert out.shape == shape and torch.isfinite(out).all()
    diffattn.remove(model)


def test_non_default_processors_are_refused():
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**dict(TINY, num_layers=1))
    model.fuse_qkv_projections()
    with pytest.raises(ValueError, match="FusedJointAttnProcessor2_0"):
        diffattn.apply(model, Dense())
    model.unfuse_qkv_projections()
    diffattn.apply(model, Dense())
    diffattn.remove(model)


@pytest.mark.parametrize("dual", [(), (0,)], ids=["sd3", "sd35"])
def test_real_shapes_on_meta_device(dual):
    """Default constructor arguments (the real SD3 Medium layout), one block, no memory."""
    with torch.device("meta"):
        model = SD3Transformer2DModel(num_layers=1, dual_attention_layers=dual)
    before = dict(model.attn_processors)
    handle = diffattn.apply(model, SlidingWindow((5, 5)))
    expected = ["transformer_blocks.0.attn.processor"] + (["transformer_blocks.0.attn2.processor"] if dual else [])
    assert handle.replaced["transformer"] == expected
    assert all(isinstance(model.attn_processors[n], SD3SparseProcessor) for n in expected)
    diffattn.remove(model)
    assert all(model.attn_processors[n] is p for n, p in before.items())


def test_processor_declares_diffusers_parameters():
    """diffusers' Attention.forward filters keyword arguments by the processor's signature."""
    import inspect

    from diffusers.models.attention_processor import JointAttnProcessor2_0

    ours = inspect.signature(SD3SparseProcessor.__call__).parameters
    theirs = inspect.signature(JointAttnProcessor2_0.__call__).parameters
    assert [(p.name, p.kind) for p in ours.values()] == [(p.name, p.kind) for p in theirs.values()]


@torch.no_grad()
def test_two_sparse_attentions_of_a_block_keep_their_own_cache(inputs):
    """SD3.5's attn and attn2 share a layer (the schedule) but not a step-cache entry: with
    refresh_every=3 the cache refreshes at the first step only."""
    from diffattn import StepCache

    torch.manual_seed(0)
    model = SD3Transformer2DModel(**CONFIGS["sd35"]).eval()
    x, enc, pooled, _ = inputs
    handle = diffattn.apply(model, SlidingWindow((3, 3)), cache=StepCache(refresh_every=3))
    state = handle.states["transformer"]
    entries = []
    for t in (900, 600, 300):
        model(x, enc, pooled, torch.tensor([t]))
        entries.append({key: entry.step for key, entry in state.cache.items()})
    diffattn.remove(model)
    names = handle.replaced["transformer"]
    assert len(names) > len(model.transformer_blocks) and set(entries[0]) == {(slot, None) for slot in range(len(names))}
    assert all(e == {key: 0 for key in entries[0]} for e in entries)  # reused, never refreshed again
