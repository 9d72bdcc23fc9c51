"""diffattn on Flux: a tiny random-weight FluxTransformer2DModel (saved and loaded back), the real
architecture on the meta device, and a whole tiny FluxPipeline."""

import inspect
import warnings

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, FluxIPAdapterAttnProcessor

import diffattn
from diffattn import Dense, Radial, SlidingWindow, TokenLayout
from diffattn.integration.apply import _installed_hook
from diffattn.integration.families.flux import ADAPTER, FluxSparseProcessor, image_grid

GRID = (4, 6)  # image tokens (rows, columns): not square, so a transposed grid would show
TEXT = 5
CONFIG = dict(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=16,
              num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
NAMES = ["transformer_blocks.0.attn.processor", "transformer_blocks.1.attn.processor",
         "single_transformer_blocks.0.attn.processor", "single_transformer_blocks.1.attn.processor"]


def raster_ids(h, w, first=0.0):
    ids = torch.zeros(h, w, 3)
    ids[..., 0] = first
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.manual_seed(0)
    built = FluxTransformer2DModel(**CONFIG)
    path = tmp_path_factory.mktemp("flux") / "transformer"
    built.save_pretrained(path)
    return FluxTransformer2DModel.from_pretrained(path).eval()


@pytest.fixture
def inputs():
    gen = torch.Generator().manual_seed(1)
    h, w = GRID
    return dict(hidden_states=torch.randn(1, h * w, 8, generator=gen),
                encoder_hidden_states=torch.randn(1, TEXT, 32, generator=gen),
                pooled_projections=torch.randn(1, 32, generator=gen), timestep=torch.tensor([0.5]),
                img_ids=raster_ids(h, w), txt_ids=torch.zeros(TEXT, 3))


@torch.no_grad()
def run(model, inputs):
    return model(**inputs).sample


def test_processor_declares_exactly_diffusers_parameters():
    ours = list(inspect.signature(FluxSparseProcessor.__call__).parameters)
    theirs = list(inspect.signature(FluxAttnProcessor.__call__).parameters)
    assert ours == theirs == ["self", "attn", "hidden_states", "encoder_hidden_states", "attention_mask",
                              "image_rotary_emb"]


@torch.no_grad()
def test_dense_is_bit_exact_and_remove_restores(model, inputs):
    base = run(model, inputs)
    before = model.attn_processors
    handle = diffattn.apply(model, Dense())
    assert handle.family == "flux" and handle.replaced["transformer"] == NAMES
    assert all(isinstance(model.attn_processors[n], FluxSparseProcessor) for n in NAMES)
    assert torch.equal(run(model, inputs), base)
    assert handle.states["transformer"].layout == TokenLayout(GRID, text_len=TEXT, text_first=True)
    diffattn.apply(model, SlidingWindow((3, 3)))
    assert not torch.allclose(run(model, inputs), base)
    diffattn.remove(model)
    assert all(model.attn_processors[n] is p for n, p in before.items())
    assert torch.equal(run(model, inputs), base)
    with pytest.raises(ValueError, match="not applied"):
        diffattn.remove(model)


@torch.no_grad()
def test_window_covering_the_grid_matches_default(model, inputs):
    base = run(model, inputs)
    diffattn.apply(model, SlidingWindow(GRID))  # the whole (4, 6) image grid
    torch.testing.assert_close(run(model, inputs), base, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_small_window_is_finite_and_differs(model, inputs):
    base = run(model, inputs)
    diffattn.apply(model, SlidingWindow((3, 3)))
    out = run(model, inputs)
    assert torch.isfinite(out).all() and (out - base).abs().max() > 1e-3


@torch.no_grad()
def test_dense_layers_count_double_then_single_stream_blocks(model, inputs):
    base = run(model, inputs)
    diffattn.apply(model, SlidingWindow((3, 3)))
    sparse = run(model, inputs)
    diffattn.apply(model, SlidingWindow((3, 3)), dense_layers=4)  # every block dense
    assert torch.equal(run(model, inputs), base)
    handle = diffattn.apply(model, SlidingWindow((3, 3)), dense_layers=2)  # the double-stream blocks dense
    procs = model.attn_processors
    assert [procs[n].core.layer for n in NAMES] == [0, 1, 2, 3]
    mixed = run(model, inputs)
    assert handle.schedule.dense_layers == 2
    assert not torch.allclose(mixed, base, atol=1e-4) and not torch.allclose(mixed, sparse, atol=1e-4)


@torch.no_grad()
def test_apply_twice_replaces_cleanly(model, inputs):
    base = run(model, inputs)
    diffattn.apply(model, SlidingWindow((3, 3)))
    window = run(model, inputs)
    diffattn.apply(model, Radial(0.2, block=16))
    assert len(model._diffusers_hook.hooks) == 1
    assert all(model.attn_processors[n].core.pattern == Radial(0.2, block=16) for n in NAMES)
    diffattn.apply(model, SlidingWindow((3, 3)))
    assert torch.equal(run(model, inputs), window)
    diffattn.remove(model)
    assert torch.equal(run(model, inputs), base)
    assert all(type(p) is FluxAttnProcessor for p in model.attn_processors.values())


def _window_mask(h, w, kh, kw, text):
    """bool [S, S] of [text; image] tokens: text rows and columns all True, image tokens in an
    odd (kh, kw) window (NATTEN: the window keeps its size at the borders), written out here."""
    def axis(n, k):
        i = torch.arange(n)
        start = (i - k // 2).clamp(0, n - k)
        return (i[None, :] >= start[:, None]) & (i[None, :] < start[:, None] + k)
    rows, cols = axis(h, kh), axis(w, kw)
    image = (rows[:, None, :, None] & cols[None, :, None, :]).reshape(h * w, h * w)
    mask = torch.ones(text + h * w, text + h * w, dtype=torch.bool)
    mask[text:, text:] = image
    return mask


@torch.no_grad()
def test_text_first_and_attended_densely(model, inputs):
    """One double-stream and one single-stream call: the attention over [text; image] equals a
    masked softmax where text queries see every key and every query sees every text key."""
    diffattn.apply(model, SlidingWindow((3, 3)), impl="reference")
    records = {}
    for name in (NAMES[0], NAMES[2]):
        core = model.attn_processors[name].core
        attend = core.attend

        def spy(q, k, v, _attend=attend, _name=name, **kw):
            out = _attend(q, k, v, **kw)
            records[_name] = (q, k, v, out)
            return out

        core.attend = spy
    run(model, inputs)
    assert sorted(records) == [NAMES[2], NAMES[0]]
    mask = _window_mask(*GRID, 3, 3, TEXT)
    expected_layout = TokenLayout(GRID, text_len=TEXT, text_first=True)
    for name, (q, k, v, out) in records.items():
        assert q.shape == (1, TEXT + GRID[0] * GRID[1], 2, 16), name
        scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * 16 ** -0.5
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        oracle = torch.einsum("bhqk,bkhd->bqhd", probs, v.double()).to(out.dtype)
        torch.testing.assert_close(out, oracle, atol=1e-5, rtol=1e-5)
        again = diffattn.attention(q, k, v, SlidingWindow((3, 3)), layout=expected_layout, impl="reference")
        assert torch.equal(out, again)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        dense = sdpa(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
        torch.testing.assert_close(out[:, :TEXT], dense[:, :TEXT], atol=1e-5, rtol=1e-5)  # text rows are dense


@torch.no_grad()
def test_layout_from_deprecated_3d_ids_and_positional_arguments(model, inputs):
    handle = diffattn.apply(model, Dense())
    state = handle.states["transformer"]
    model(**{**inputs, "img_ids": inputs["img_ids"][None], "txt_ids": inputs["txt_ids"][None]})
    assert state.layout == TokenLayout(GRID, text_len=TEXT)
    state.reset()
    i = inputs
    model(i["hidden_states"], i["encoder_hidden_states"], i["pooled_projections"], i["timestep"], i["img_ids"],
          i["txt_ids"])
    assert state.layout == TokenLayout(GRID, text_len=TEXT) and state.timestep == 500.0


def test_image_grid_accepts_raster_grids_only():
    assert image_grid(raster_ids(4, 6)) == ((4, 6), "")
    assert image_grid(raster_ids(1, 7)) == ((1, 7), "")
    assert image_grid(raster_ids(3, 2) + torch.tensor([2.0, 10.0, 5.0])) == ((3, 2), "")  # offsets are fine
    big = FluxPipeline._prepare_latent_image_ids(1, 300, 260, "cpu", torch.bfloat16)  # bf16 rounds rows > 256
    assert image_grid(big) == ((300, 260), "")
    transposed = raster_ids(6, 4)[:, [0, 2, 1]]
    assert image_grid(transposed)[0] is None and "raster" in image_grid(transposed)[1]
    kontext = torch.cat([raster_ids(4, 6), raster_ids(3, 5, first=1.0)])
    grid, why = image_grid(kontext)
    assert grid is None and "15 of 39" in why and "Kontext" in why
    assert image_grid(raster_ids(4, 6), 25)[0] is None
    assert image_grid(torch.zeros(0, 3))[0] is None and image_grid(torch.zeros(4, 2))[0] is None


@torch.no_grad()
def test_unknown_layout_runs_dense_with_a_warning(model, inputs):
    """Kontext-style reference-image tokens, or ids not in raster order: diffusers' dense attention."""
    h, w = GRID
    gen = torch.Generator().manual_seed(2)
    kontext = {**inputs, "hidden_states": torch.randn(1, h * w + 15, 8, generator=gen),
               "img_ids": torch.cat([raster_ids(h, w), raster_ids(3, 5, first=1.0)])}
    shuffled = {**inputs, "img_ids": raster_ids(h, w)[torch.randperm(h * w, generator=gen)]}
    for case, match in ((kontext, "Kontext"), (shuffled, "raster order")):
        base = run(model, case)
        handle = diffattn.apply(model, SlidingWindow((3, 3)))
        with pytest.warns(UserWarning, match=match):
            out = run(model, case)
        assert handle.states["transformer"].layout is None
        diffattn.remove(model)
        assert torch.equal(out, base)
    diffattn.apply(model, SlidingWindow((3, 3)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(model, inputs)  # a raster grid: no warning


def test_ip_adapter_is_refused(model):
    procs = dict(model.attn_processors)
    with_ip = dict(procs)
    for name in NAMES[:2]:
        with_ip[name] = FluxIPAdapterAttnProcessor(hidden_size=32, cross_attention_dim=16, num_tokens=(4,))
    model.set_attn_processor(dict(with_ip))  # set_attn_processor empties the dict it is given
    try:
        with pytest.raises(ValueError, match="transformer_blocks.0.attn.processor.*IP-Adapter"):
            diffattn.apply(model, SlidingWindow((3, 3)))
        assert _installed_hook(model) is None
        assert all(model.attn_processors[n] is with_ip[n] for n in NAMES)
    finally:
        model.set_attn_processor(procs)


@torch.no_grad()
def test_fused_qkv_projections(inputs):
    torch.manual_seed(0)
    fused = FluxTransformer2DModel(**CONFIG).eval()
    fused.fuse_qkv_projections()
    assert fused.transformer_blocks[0].attn.fused_projections
    base = run(fused, inputs)
    diffattn.apply(fused, Dense())
    assert torch.equal(run(fused, inputs), base)
    diffattn.apply(fused, SlidingWindow(GRID))
    torch.testing.assert_close(run(fused, inputs), base, atol=1e-5, rtol=1e-5)
    diffattn.remove(fused)


def test_timestep_in_scheduler_units():
    assert ADAPTER.timestep((), {"timestep": torch.tensor([0.25, 0.25])}) == 250.0
    assert ADAPTER.timestep((None, None, None, 0.5), {}) == 500.0
    assert ADAPTER.timestep((), {}) is None


def test_real_model_shapes_on_meta():
    with torch.device("meta"):
        model = FluxTransformer2DModel(num_layers=1, num_single_layers=1)
    assert model.transformer_blocks[0].attn.heads == 24 and model.transformer_blocks[0].attn.head_dim == 128
    before = model.attn_processors
    names = ["transformer_blocks.0.attn.processor", "single_transformer_blocks.0.attn.processor"]
    assert sorted(before) == sorted(names)
    handle = diffattn.apply(model, SlidingWindow((9, 9)), dense_layers=1)
    assert handle.replaced == {"transformer": names}
    procs = model.attn_processors
    assert [procs[n].core.layer for n in names] == [0, 1]
    assert all(isinstance(procs[n], FluxSparseProcessor) for n in names)
    diffattn.remove(model)
    assert all(model.attn_processors[n] is p for n, p in before.items())


# ----------------------------------------------------------------------------- a whole FluxPipeline

PIPE_TEXT = 8
SETTINGS = dict(height=64, width=64, num_inference_steps=4, guidance_scale=3.5, output_type="np")
PATTERN = SlidingWindow((3, 3))  # the image token grid is (8, 8): sparse


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(**{**CONFIG, "in_channels": 16, "guidance_embeds": True})
    path = tmp_path_factory.mktemp("flux-pipe") / "transformer"
    transformer.save_pretrained(path)
    transformer = FluxTransformer2DModel.from_pretrained(path)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 8, 8), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=64, scaling_factor=1.5,
                        shift_factor=0.1, use_quant_conv=False, use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def prompt():
    gen = torch.Generator().manual_seed(3)
    return dict(prompt_embeds=torch.randn(1, PIPE_TEXT, 32, generator=gen),
                pooled_prompt_embeds=torch.randn(1, 32, generator=gen),
                negative_prompt_embeds=torch.randn(1, PIPE_TEXT, 32, generator=gen),
                negative_pooled_prompt_embeds=torch.randn(1, 32, generator=gen))


def generate(pipe, prompt, seed=0, true_cfg=False, **extra):
    embeds = prompt if true_cfg else {k: v for k, v in prompt.items() if not k.startswith("negative")}
    settings = {**SETTINGS, **({"true_cfg_scale": 2.0} if true_cfg else {}), **extra}
    return pipe(generator=torch.Generator().manual_seed(seed), **embeds, **settings).images[0]


def test_pipeline_dense_steps_schedule(pipe, prompt):
    dense = generate(pipe, prompt)
    try:
        diffattn.apply(pipe, PATTERN, dense_steps=4)
        all_dense_steps = generate(pipe, prompt)
        diffattn.apply(pipe, PATTERN)
        sparse = generate(pipe, prompt)
        diffattn.apply(pipe, PATTERN, dense_steps=2)
        mixed = generate(pipe, prompt)
        mixed_again = generate(pipe, prompt)  # state resets: identical calls give identical outputs
    finally:
        diffattn.remove(pipe)
    after = generate(pipe, prompt)
    assert np.array_equal(all_dense_steps, dense)
    assert np.isfinite(sparse).all() and not np.allclose(sparse, dense, atol=1e-4)
    assert not np.allclose(mixed, dense, atol=1e-4) and not np.allclose(mixed, sparse, atol=1e-4)
    assert np.array_equal(mixed, mixed_again)
    assert np.array_equal(after, dense)


def test_pipeline_dense_last_steps(pipe, prompt):
    dense = generate(pipe, prompt)
    try:
        diffattn.apply(pipe, PATTERN, dense_steps=2, dense_last_steps=2)
        covered = generate(pipe, prompt)
        diffattn.apply(pipe, PATTERN, dense_last_steps=2)
        last_only = generate(pipe, prompt)
    finally:
        diffattn.remove(pipe)
    assert np.array_equal(covered, dense)
    assert not np.allclose(last_only, dense, atol=1e-4)


def test_pipeline_step_index_with_true_cfg(pipe, prompt):
    """Flux pipelines call the transformer with timestep / 1000; both true-CFG calls of a step
    share its index in scheduler.timesteps."""
    handle = diffattn.apply(pipe, PATTERN, dense_steps=1)
    state = handle.states["transformer"]
    seen = []
    hook = pipe.transformer.register_forward_hook(
        lambda module, args, output: seen.append((state.step, state.num_steps, state.layout)))
    try:
        generate(pipe, prompt, true_cfg=True)
    finally:
        hook.remove()
        diffattn.remove(pipe)
    layout = TokenLayout((8, 8), text_len=PIPE_TEXT, text_first=True)
    assert seen == [(i, 4, layout) for i in range(4) for _ in range(2)]


def test_bf16_timesteps_of_a_long_shifted_schedule_map_to_their_step():
    """A bf16 Flux call passes t / 1000, which rounds onto a neighbouring step near t = 1000 when
    the schedule is long; the scheduler's step_index resolves it."""
    from types import SimpleNamespace

    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffattn.integration.state import match_step

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(200)
    timesteps = scheduler.timesteps
    passed = [float((t / 1000).to(torch.bfloat16)) * 1000 for t in timesteps]  # what the adapter reads
    assert any(match_step(timesteps, t) != i for i, t in enumerate(passed))  # nearest alone is off
    for i, t in enumerate(passed):
        assert match_step(timesteps, t, SimpleNamespace(step_index=i, begin_index=None)) == i
    # fp32 timesteps: the nearest entry, whatever the scheduler says about a far step
    assert match_step(timesteps, float(timesteps[50]), SimpleNamespace(step_index=120, begin_index=None)) == 50
