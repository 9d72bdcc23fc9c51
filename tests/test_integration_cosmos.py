"""diffattn on Cosmos: a tiny random-weight CosmosTransformer3DModel (saved and loaded back) for
Text2World, Video2World (condition mask, per-frame timesteps) and Cosmos 2.5's image context, the step
from a scheduler whose timesteps are in other units than the call's, and the released shape on the meta
device."""

import inspect

import pytest
import torch
from diffusers import CosmosTransformer3DModel, FlowMatchEulerDiscreteScheduler
from diffusers.models.transformers.transformer_cosmos import CosmosAttnProcessor2_0, CosmosAttnProcessor2_5

import diffattn
from diffattn import Dense, Radial, SlidingWindow, TokenLayout
from diffattn.integration.apply import _installed_hook
from diffattn.integration.families.cosmos import ADAPTER, CosmosSparseProcessor
from diffattn.integration.processors import attn_processors, set_attn_processors

CONFIG = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=2, mlp_ratio=2.0,
              text_embed_dim=16, adaln_lora_dim=4, max_size=(4, 32, 32), patch_size=(1, 2, 2),
              concat_padding_mask=False)  # the padding-mask channel needs torchvision (not a test dependency)
NAMES = ["transformer_blocks.0.attn1.processor", "transformer_blocks.1.attn1.processor"]
GRID = (3, 4, 5)


def load(tmp_path_factory, name, **config):
    torch.manual_seed(0)
    built = CosmosTransformer3DModel(**dict(CONFIG, **config))
    path = tmp_path_factory.mktemp(name) / "transformer"
    built.save_pretrained(path)
    return CosmosTransformer3DModel.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load(tmp_path_factory, "cosmos")


def make_inputs(frames=3, height=8, width=10, seed=1, t=0.5):
    gen = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 4, frames, height, width, generator=gen), timestep=torch.tensor([t]),
                encoder_hidden_states=torch.randn(1, 5, 16, generator=gen),
                attention_mask=torch.tensor([[True, True, True, False, False]]), fps=24)


@pytest.fixture
def inputs():
    return make_inputs()


@torch.no_grad()
def run(model, inputs):
    return model(**inputs).sample


def test_processor_declares_exactly_diffusers_parameters():
    ours = list(inspect.signature(CosmosSparseProcessor.__call__).parameters)
    assert ours == list(inspect.signature(CosmosAttnProcessor2_0.__call__).parameters)


@torch.no_grad()
def test_dense_is_bit_exact_and_remove_restores(model, inputs):
    base = run(model, inputs)
    before = attn_processors(model)
    handle = diffattn.apply(model, Dense())
    assert handle.family == "cosmos" and handle.replaced["transformer"] == NAMES
    assert all(attn_processors(model)[n] is p for n, p in before.items() if "attn2" in n)  # cross-attention
    assert torch.equal(run(model, inputs), base)
    assert handle.states["transformer"].layout == TokenLayout(GRID)
    diffattn.apply(model, SlidingWindow((1, 3, 3)))
    assert not torch.allclose(run(model, inputs), base)
    diffattn.remove(model)
    assert all(attn_processors(model)[n] is p for n, p in before.items())
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
        inputs = make_inputs(frames, height, width)
        inputs.pop("fps")  # images: no fps
        out = run(model, inputs)
        assert out.shape == (1, 4, frames, height, width) and torch.isfinite(out).all()
        assert handle.states["transformer"].layout == TokenLayout((frames, height // 2, width // 2))


@torch.no_grad()
def test_video2world_condition_frames_and_image_context(tmp_path_factory):
    """Video2World: a condition-mask channel and per-frame timesteps (conditioning frame first); Cosmos
    2.5's image context in the cross-attention (CosmosAttnProcessor2_5, untouched)."""
    model = load(tmp_path_factory, "cosmos_v2w", in_channels=5, img_context_dim_in=8, img_context_num_tokens=3,
                 img_context_dim_out=24)
    inputs = make_inputs()
    condition = torch.zeros(1, 1, 3, 8, 10)
    condition[:, :, 0] = 1.0
    timestep = torch.full((1, 1, 3, 1, 1), 0.5)
    timestep[:, :, 0] = 0.001
    gen = torch.Generator().manual_seed(4)
    inputs.pop("attention_mask")  # Cosmos 2.5 pipelines pass none (the image-context processor takes no tensor)
    inputs.update(condition_mask=condition, timestep=timestep,
                  encoder_hidden_states=(inputs["encoder_hidden_states"], torch.randn(1, 3, 8, generator=gen)))
    base = run(model, inputs)
    handle = diffattn.apply(model, SlidingWindow(GRID))
    assert type(attn_processors(model)["transformer_blocks.0.attn2.processor"]) is CosmosAttnProcessor2_5
    torch.testing.assert_close(run(model, inputs), base, atol=1e-5, rtol=1e-5)
    assert handle.states["transformer"].layout == TokenLayout(GRID)
    assert float(ADAPTER.timestep((), inputs)) == 0.5  # the last (generated) frame's
    diffattn.apply(model, SlidingWindow((1, 3, 3)))
    out = run(model, inputs)
    assert torch.isfinite(out).all() and (out - base).abs().max() > 1e-3
    diffattn.remove(model)


@torch.no_grad()
def test_steps_from_a_scheduler_in_other_units(model):
    """Cosmos 2 pipelines pass sigma / (sigma + 1) while the scheduler's timesteps are 1000 * sigma (as
    Cosmos2TextToImagePipeline configures it): the step comes from the scheduler's step_index."""
    scheduler = FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True)
    scheduler.register_to_config(sigma_max=80.0, sigma_min=0.002, sigma_data=1.0, final_sigmas_type="sigma_min")
    scheduler.set_timesteps(sigmas=torch.linspace(0, 1, 4).numpy())
    calls = [make_inputs(t=float(s / (s + 1))) for s in scheduler.sigmas[:2]]
    dense = [run(model, c) for c in calls]
    set_attn_processors(model, diffattn.sparse_processors(model, SlidingWindow((1, 3, 3)), dense_steps=1,
                                                          scheduler=scheduler))
    state = _installed_hook(model).state
    assert torch.equal(run(model, calls[0]), dense[0]) and (state.step, state.num_steps) == (0, 4)  # dense
    scheduler.step(torch.zeros(1), scheduler.timesteps[0], torch.zeros(1))  # the pipeline steps the scheduler
    assert not torch.allclose(run(model, calls[1]), dense[1]) and state.step == 1  # sparse
    diffattn.remove(model)


def test_released_shape_on_meta():
    with torch.device("meta"):
        model = CosmosTransformer3DModel(num_layers=2)  # Cosmos layout, two blocks
    handle = diffattn.apply(model, Radial(0.2), dense_layers=1)
    assert handle.replaced["transformer"] == NAMES
    diffattn.remove(model)
