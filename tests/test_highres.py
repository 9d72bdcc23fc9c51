"""Training-free high resolution (FreeSwim): window branch, full branch, cross-attention override,
guide-step reuse, the pipeline and the CLI."""

import doctest
import importlib
import json
import math

import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel

from diffattn import SlidingWindow, TokenLayout
from diffattn.integration.core import Schedule, SparseAttentionCore
from diffattn.integration.cross_attention_override import CrossAttentionOverride
from diffattn.integration.dual_path import BranchCore, DualPath
from diffattn.integration.state import GenerationState
from diffattn.pipelines.highres import (
    HighResConfig,
    boundary_timestep,
    cross_cache_bytes,
    default_scale_factor,
    default_window,
    denoise,
    expert_schedule,
    generate_highres,
    parse_highres_config,
    target_size,
)

GRID = (2, 6, 6)  # latent [1, 4, 2, 12, 12] with 1x2x2 patches


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny models here run thousands of small ops; with a second intra-op thread on a busy
    2-core machine each op waits for it, so these tests run single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_wan(seed=0, layers=2):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                      text_dim=8, freq_dim=8, ffn_dim=32, num_layers=layers, cross_attn_norm=True,
                                      qk_norm="rms_norm_across_heads")
    return model.eval()


def inputs(seed=0, t=500.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, GRID[0], GRID[1] * 2, GRID[2] * 2, generator=g)
    text = torch.randn(1, 5, 8, generator=g)
    return x, torch.tensor([t]), text


def call(model, x, t, text):
    with torch.no_grad():
        return model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]


def record_cross(model):
    """Forward hooks that collect every attn2 module output, per call, in block order."""
    calls = []

    def hook(module, args, output):
        calls.append(output.detach().clone())

    handles = [block.attn2.register_forward_hook(hook) for block in model.blocks]
    return calls, handles


@pytest.fixture(scope="module")
def embedded():
    from diffattn.pipelines import build_embedded_wan_pipeline

    return build_embedded_wan_pipeline(seed=0, random_weights=True)


BOUNDARY_RATIO = 0.875  # Wan 2.2 T2V A14B's: switch at t = 875 of 1000


@pytest.fixture(scope="module")
def two_experts(embedded):
    """A tiny Wan 2.2-style two-expert WanPipeline: the embedded pipeline's text encoder and VAE,
    two random 2-block transformers (high noise, low noise) and boundary_ratio 0.875."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    from diffattn.pipelines.embedded import EMBEDDED_SCHEDULER_CONFIG, EMBEDDED_TRANSFORMER_CONFIG

    experts = []
    for seed in (1, 2):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            experts.append(WanTransformer3DModel(**dict(EMBEDDED_TRANSFORMER_CONFIG, num_layers=2)).eval())
    return WanPipeline(tokenizer=embedded.tokenizer, text_encoder=embedded.text_encoder, vae=embedded.vae,
                       scheduler=UniPCMultistepScheduler(**dict(EMBEDDED_SCHEDULER_CONFIG)), transformer=experts[0],
                       transformer_2=experts[1], boundary_ratio=BOUNDARY_RATIO)


# --- the branches -----------------------------------------------------------------------------


def test_window_covering_the_grid_equals_full_attention():
    model = tiny_wan()
    x, t, text = inputs()
    dense = call(model, x, t, text)
    dual = DualPath.install(model, SlidingWindow((None, GRID[1], GRID[2])), guide_every=None, scale_factor=1.0,
                            impl="reference")
    window_only = dual.unconditional(lambda: call(model, x, t, text))
    dual.remove()
    torch.testing.assert_close(window_only, dense, rtol=1e-5, atol=1e-5)
    # With both branches equal, the override replaces a block's cross-attention by the same values.
    dual = DualPath.install(model, SlidingWindow((None, GRID[1], GRID[2])), guide_every=1, scale_factor=1.0,
                            impl="reference")
    both = dual.conditional(lambda: call(model, x, t, text), 0)
    dual.remove()
    torch.testing.assert_close(both, dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(call(model, x, t, text), dense, rtol=0, atol=0)  # removed cleanly


def test_dual_path_on_an_image_conditioned_transformer():
    """Wan 2.1 I2V's transformer (image-latent channels, image tokens in attn2 through add_k/v): the
    override records attn2's whole output, so a covering window still equals full attention."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=12, out_channels=4,
                                      text_dim=8, freq_dim=8, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                                      qk_norm="rms_norm_across_heads", image_dim=8, added_kv_proj_dim=32).eval()
    x, t, text = inputs()
    x = torch.cat([x, torch.randn(1, 8, *x.shape[2:])], dim=1)
    image = torch.randn(1, 3, 8)

    def run():
        with torch.no_grad():
            return model(hidden_states=x, timestep=t, encoder_hidden_states=text, encoder_hidden_states_image=image,
                         return_dict=False)[0]

    dense = run()
    dual = DualPath.install(model, SlidingWindow((None, GRID[1], GRID[2])), guide_every=1, impl="reference")
    out = dual.conditional(run, 0)
    dual.remove()
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)


def test_small_window_differs_from_full_attention():
    model = tiny_wan()
    x, t, text = inputs()
    dual = DualPath.install(model, SlidingWindow((None, 3, 3)), guide_every=None, scale_factor=1.0, impl="reference")
    out = dual.unconditional(lambda: call(model, x, t, text))
    dual.remove()
    assert (out - call(model, x, t, text)).abs().max() > 1e-3


@pytest.mark.parametrize("branch", ["window", "full"])
def test_scale_factor_multiplies_the_softmax_scale(branch):
    layout = TokenLayout(GRID)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, layout.seq_len, 2, 16, generator=g) for _ in range(3))
    core = SparseAttentionCore(SlidingWindow((None, GRID[1], GRID[2])), Schedule(), 0,
                               GenerationState(layout=layout), "reference")
    wrapped = BranchCore(core, scale_factor=1.7)
    wrapped.branch = branch
    out = wrapped.attend(q, k, v)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=1.7 / 4.0).transpose(1, 2)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_override_replaces_window_cross_attention_with_the_full_branchs():
    """Reference built from plain forward hooks: a full-attention pass records each block's
    cross-attention output, then a window pass has them substituted."""
    model = tiny_wan()
    x, t, text = inputs()
    window = SlidingWindow((None, 3, 3))
    factor = 1.3
    # Reference, step by step: the full branch is dense attention with the scale factor.
    dual = DualPath.install(model, window, guide_every=None, scale_factor=factor, impl="reference")
    for core in dual.cores:
        core.branch = "full"
    calls, handles = record_cross(model)
    call(model, x, t, text)
    for h in handles:
        h.remove()
    for core in dual.cores:
        core.branch = "window"
    replace = [block.attn2.register_forward_hook(lambda m, a, o, i=i: calls[i]) for i, block in enumerate(model.blocks)]
    reference = call(model, x, t, text)
    for h in replace:
        h.remove()
    dual.remove()

    dual = DualPath.install(model, window, guide_every=1, scale_factor=factor, impl="reference")
    out = dual.conditional(lambda: call(model, x, t, text), 0)
    assert (dual.full_passes, dual.window_passes) == (1, 1)
    dual.remove()
    torch.testing.assert_close(out, reference, rtol=0, atol=0)


@pytest.mark.parametrize("k", [1, 3])
def test_guide_steps_reuse_exactly_what_the_full_branch_computed(k):
    model = tiny_wan()
    dual = DualPath.install(model, SlidingWindow((None, 3, 3)), guide_every=k, scale_factor=1.0, impl="reference")
    calls, handles = record_cross(model)
    full_at, used_at = {}, {}
    steps = 5
    for step in range(steps):
        x, t, text = inputs(seed=step, t=900.0 - 100 * step)
        before = len(calls)
        guided = dual.is_guide_step(step)
        dual.conditional(lambda: call(model, x, t, text), step)
        outputs = calls[before:]
        if guided:  # full pass (recorded) then window pass (replayed)
            full_at[step], used_at[step] = outputs[:2], outputs[2:]
        else:
            used_at[step] = outputs
    for h in handles:
        h.remove()
    assert dual.full_passes == len(range(0, steps, k)) and dual.window_passes == steps
    for step in range(steps):
        guide = step - step % k
        for used, computed in zip(used_at[step], full_at[guide]):
            assert torch.equal(used, computed)
    if k == 1:
        assert not torch.equal(full_at[0][0], full_at[1][0])  # every step computes its own
    dual.remove()


def test_store_dtype_and_offload_account_for_memory():
    model = tiny_wan()
    x, t, text = inputs()
    seq, channels = math.prod(GRID), 32
    results = {}
    for dtype, offload in ((None, False), (torch.float16, True)):
        dual = DualPath.install(model, SlidingWindow((None, 3, 3)), guide_every=2, store_dtype=dtype, offload=offload,
                                impl="reference")
        results[dtype] = dual.conditional(lambda: call(model, x, t, text), 0)
        itemsize = 2 if dtype == torch.float16 else 4
        assert dual.store.peak_bytes == 2 * seq * channels * itemsize
        assert dual.store.bytes_per_block() == {0: seq * channels * itemsize, 1: seq * channels * itemsize}
        assert all(entry.device.type == "cpu" for entry in dual.store.entries.values())
        assert dual.record()["cross_cache"]["peak_bytes"] == dual.store.peak_bytes
        dual.remove()
    torch.testing.assert_close(results[torch.float16], results[None], rtol=1e-2, atol=1e-2)


def test_first_step_is_a_guide_step_and_steps_must_increase():
    model = tiny_wan(layers=1)
    dual = DualPath.install(model, SlidingWindow((None, 3, 3)), guide_every=2, impl="reference")
    x, t, text = inputs()
    dual.conditional(lambda: call(model, x, t, text), 3)  # a pass starting mid-schedule records first
    assert dual.guide_steps == [(3, 0)] and dual.full_passes == 1
    with pytest.raises(RuntimeError, match="steps must increase"):
        dual.conditional(lambda: call(model, x, t, text), 3)
    with pytest.raises(ValueError, match=r"expert must be an int in \[0, 1\)"):
        dual.conditional(lambda: call(model, x, t, text), 4, expert=1)
    dual.reset()
    dual.conditional(lambda: call(model, x, t, text), 0)
    assert dual.guide_steps == [(0, 0)]
    dual.remove()


def test_override_processor_modes():
    model = tiny_wan(layers=1)
    dual = DualPath.install(model, SlidingWindow((None, 3, 3)), guide_every=1, impl="reference")
    procs = model.attn_processors
    assert isinstance(procs["blocks.0.attn2.processor"], CrossAttentionOverride)
    assert isinstance(procs["blocks.0.attn1.processor"].core, BranchCore)
    dual.remove()
    assert type(model.attn_processors["blocks.0.attn2.processor"]).__name__ == "WanAttnProcessor"
    assert type(model.attn_processors["blocks.0.attn1.processor"]).__name__ == "WanAttnProcessor"


# --- two experts (Wan 2.2) --------------------------------------------------------------------


def test_cross_attention_cache_is_reset_at_the_expert_switch():
    """Experts 0, 0, 1, 1, 1 with guide_every=3: the first step of expert 1 is a guide step (the
    schedule alone would not guide before step 3), the store then holds only expert 1's outputs,
    and expert 1 replays exactly what its own full branch recorded."""
    experts = [tiny_wan(seed=0), tiny_wan(seed=1)]
    dual = DualPath.install(experts, SlidingWindow((None, 3, 3)), guide_every=3, impl="reference")
    assert "2 + 2 blocks, 2 experts" in repr(dual)
    assert [o.expert for o in dual.overrides] == [0, 0, 1, 1]
    recorded = []
    handles = [block.attn2.register_forward_hook(lambda m, a, o, e=e: recorded.append((e, o.detach().clone())))
               for e, model in enumerate(experts) for block in model.blocks]
    stored_by, used = [], {}
    for step, expert in enumerate([0, 0, 1, 1, 1]):
        x, t, text = inputs(seed=step, t=900.0 - 100 * step)
        before = len(recorded)
        guided = dual.is_guide_step(step, expert)
        dual.conditional(lambda: call(experts[expert], x, t, text), step, expert)
        outputs = recorded[before:]
        assert all(e == expert for e, _ in outputs)  # only the chosen expert ran
        if guided:
            full = [o for _, o in outputs[:2]]
        used[step] = [o for _, o in outputs[-2:]]
        assert all(torch.equal(u, f) for u, f in zip(used[step], full))
        stored_by.append(dual.store.recorded_by())
    for h in handles:
        h.remove()
    assert dual.guide_steps == [(0, 0), (2, 1)] and dual.expert_switches == 1
    assert stored_by == [{0}, {0}, {1}, {1}, {1}]
    assert not torch.equal(used[1][0], used[2][0])
    with pytest.raises(RuntimeError, match="expert 1's, not expert 0's"):
        dual.store.get(0, used[2][0], expert=0)
    record = dual.record()
    assert (record["experts"], record["guide_steps"], record["full_passes"]) == (2, [[0, 0], [2, 1]], 2)
    dual.remove()
    assert all(type(p).__name__ == "WanAttnProcessor" for m in experts for p in m.attn_processors.values())


def _model_calls(pipe):
    """Forward pre-hooks recording which expert ("transformer" / "transformer_2") each call ran."""
    calls = []
    handles = [getattr(pipe, name).register_forward_pre_hook(lambda m, a, name=name: calls.append(name))
               for name in ("transformer", "transformer_2")]
    return calls, handles


@pytest.mark.parametrize("expand_timesteps", [False, True])
def test_denoise_matches_diffusers_two_expert_loop(two_experts, expand_timesteps):
    """The loop of the high-resolution pass, run densely on diffusers' own schedule, is WanPipeline's:
    the same expert at every call (the switch at the same step), guidance_scale_2 for the
    low-noise expert, per-token timesteps with expand_timesteps (Wan 2.2 TI2V), the same latents."""
    from diffusers import WanPipeline

    pipe = WanPipeline(**two_experts.components, boundary_ratio=BOUNDARY_RATIO, expand_timesteps=expand_timesteps)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 2, 4, 4, generator=g)
    embeds, negative = torch.randn(1, 8, 384, generator=g), torch.randn(1, 8, 384, generator=g)
    calls, handles = _model_calls(pipe)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, latents=latents.clone(), height=32,
                    width=32, num_frames=5, num_inference_steps=4, guidance_scale=4.0, guidance_scale_2=2.0,
                    output_type="latent").frames
    diffusers_calls, calls[:] = list(calls), []
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(4)
    scheduler.set_begin_index(0)
    assert scheduler.timesteps.tolist() == [999, 900, 750, 500] and boundary_timestep(pipe, scheduler) == 875.0
    assert expert_schedule(pipe, scheduler.timesteps, scheduler) == ["transformer"] * 2 + ["transformer_2"] * 2
    with torch.no_grad():
        out, _ = denoise(pipe, latents.clone(), scheduler.timesteps, scheduler, embeds, negative,
                         {"transformer": 4.0, "transformer_2": 2.0})
    for h in handles:
        h.remove()
    assert calls == diffusers_calls == ["transformer"] * 4 + ["transformer_2"] * 4  # cond + uncond per step
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_two_experts_generate_the_requested_size(two_experts):
    result = generate_highres(two_experts, "a red fox in the snow", height=32, width=32, num_frames=5,
                              num_inference_steps=4, guidance_scale=4.0, guidance_scale_2=2.0,
                              max_sequence_length=16, upscale=2, config=HighResConfig(strength=1.0),
                              progress=False)
    assert result.frames.shape == (5, 64, 64, 3) and result.base_frames.shape == (5, 32, 32, 3)
    assert np.isfinite(result.frames).all() and result.frames.min() >= 0 and result.frames.max() <= 1
    highres = result.record["highres"]
    assert highres["experts"] == ["transformer", "transformer_2"] and highres["boundary_timestep"] == 875.0
    # flow_shift 9: timesteps 999, 964, 900, 750 -> the low-noise expert runs the last step only
    assert highres["expert_per_step"] == ["transformer"] * 3 + ["transformer_2"]
    assert highres["guidance_scales"] == {"transformer": 4.0, "transformer_2": 2.0}
    dual = highres["dual_path"]
    # guide_every=2: steps 0 and 2 of the first expert, and step 3 (forced: the second expert's first)
    assert dual["guide_steps"] == [[0, 0], [2, 0], [3, 1]] and dual["expert_switches"] == 1
    assert (dual["full_passes"], dual["window_passes"]) == (3, 8)
    assert dual["cross_cache"]["peak_bytes"] == highres["cross_cache_estimate_bytes"] > 0
    json.dumps(result.record)
    for name in ("transformer", "transformer_2"):
        assert all(type(p).__name__ == "WanAttnProcessor" for p in getattr(two_experts, name).attn_processors.values())


def test_two_experts_with_a_covering_window_equal_a_dense_video_to_video_run(two_experts):
    frames = np.random.default_rng(0).random((5, 32, 32, 3), dtype=np.float32)
    base = dict(height=32, width=32, num_frames=5, num_inference_steps=4, guidance_scale=4.0, guidance_scale_2=2.0,
                max_sequence_length=16, upscale=2, base_frames=frames, progress=False)
    dense = generate_highres(two_experts, "a fox", config=HighResConfig(attention="dense"), **base)
    dual = generate_highres(two_experts, "a fox", config=HighResConfig(window=(4, 4), scale_factor=1.0,
                                                                       impl="reference"), **base)
    assert dual.record["highres"]["dual_path"]["guide_steps"] == [[0, 0], [1, 1]]  # strength 0.7: 2 steps
    np.testing.assert_allclose(dual.frames, dense.frames, rtol=0, atol=1e-5)


def test_cli_generate_upscale_loads_a_two_expert_pipeline(two_experts, tmp_path):
    from diffattn.cli import main

    two_experts.save_pretrained(tmp_path / "wan22")
    out = tmp_path / "fox.mp4"
    rc = main(["generate", "--model", str(tmp_path / "wan22"), "--upscale", "2", "--size", "32x32", "--frames", "5",
               "--steps", "4", "--highres", "strength=1", "--guidance", "4", "--guidance-2", "3", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    record = json.loads(out.with_suffix(".json").read_text())
    assert (record["width"], record["height"]) == (64, 64)
    assert record["highres"]["guidance_scales"] == {"transformer": 4.0, "transformer_2": 3.0}
    assert record["highres"]["expert_per_step"] == ["transformer"] * 3 + ["transformer_2"]
    assert record["highres"]["dual_path"]["guide_steps"] == [[0, 0], [2, 0], [3, 1]]


def test_two_expert_errors(two_experts, embedded):
    base = dict(height=32, width=32, num_frames=5, num_inference_steps=4, max_sequence_length=16, progress=False)
    with pytest.raises(ValueError, match="guidance_scale_2=3.0 is only for two-expert pipelines"):
        generate_highres(embedded, "a fox", guidance_scale_2=3.0, **base)
    from diffusers import WanImageToVideoPipeline

    i2v = WanImageToVideoPipeline(tokenizer=embedded.tokenizer, text_encoder=embedded.text_encoder,
                                  vae=embedded.vae, scheduler=embedded.scheduler,
                                  transformer=WanTransformer3DModel(num_attention_heads=2, attention_head_dim=8,
                                                                    in_channels=36, out_channels=16, text_dim=384,
                                                                    freq_dim=8, ffn_dim=16, num_layers=1))
    with pytest.raises(NotImplementedError, match="image-to-video is not supported"):
        generate_highres(i2v, "a fox", **base)
    with pytest.raises(ValueError, match="experts must be distinct"):
        DualPath.install([two_experts.transformer, two_experts.transformer], SlidingWindow((None, 3, 3)))


# --- defaults and errors ----------------------------------------------------------------------


def test_original_defaults():
    config = HighResConfig()
    assert (config.strength, config.guide_every, config.flow_shift, config.interpolation) == (0.7, 2, 9.0, "linear")
    assert default_window((21, 30, 52), (21, 68, 120)) == (31, 53)  # Wan 480p -> 1088x1920
    assert default_window((5, 8, 8), (5, 12, 12)) == (9, 9)
    assert default_scale_factor((21, 30, 52)) == pytest.approx(math.sqrt(math.log(3120) / math.log(1560)))
    assert default_scale_factor((1, 1, 1)) == 1.0


def test_cross_cache_estimate_for_wan_1_3b_at_1080p():
    class Config:
        num_attention_heads, attention_head_dim, num_layers = 12, 128, 30

    class Transformer:
        config, dtype = Config, torch.bfloat16

    class Pipe:
        transformer = Transformer

    per_block = cross_cache_bytes(Pipe, (21, 68, 120)) / 30
    assert per_block == 21 * 68 * 120 * 1536 * 2 and 0.5e9 < per_block < 0.55e9


def test_target_size(embedded):
    assert target_size(embedded, 128, 128, 2) == (256, 256)
    assert target_size(embedded, 96, 160, 1.5) == (144, 240)
    for bad in (1, 0.5, -2, float("nan"), float("inf"), True, "2"):
        with pytest.raises(ValueError, match="upscale must be a number > 1"):
            target_size(embedded, 128, 128, bad)
    with pytest.raises(ValueError, match="not larger than the native"):
        target_size(embedded, 128, 128, 1.01)
    with pytest.raises(ValueError, match="rope_max_seq_len=64"):  # the embedded DiT covers 1024 px per axis
        target_size(embedded, 128, 128, 9)


@pytest.mark.parametrize("kwargs, match", [
    ({"strength": 0}, "strength must be a number in"),
    ({"strength": 1.5}, "strength must be a number in"),
    ({"guide_every": 0}, "guide_every must be an int >= 1"),
    ({"window": (0, 3)}, "window must be None or two ints"),
    ({"window": (3,)}, "window must be None or two ints"),
    ({"attention": "sparse"}, "attention must be one of"),
    ({"scale_factor": -1.0}, "scale_factor must be None or a positive"),
    ({"interpolation": "bicubic"}, "interpolation must be one of"),
    ({"store_dtype": torch.int8}, "store_dtype must be"),
])
def test_invalid_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HighResConfig(**kwargs)


def test_parse_highres_config():
    config = parse_highres_config("strength=0.5,guide_every=3,window=9x11,scale=1,flow_shift=keep,"
                                  "store_dtype=bfloat16,offload=true,attention=window")
    assert (config.strength, config.guide_every, config.window, config.scale_factor, config.flow_shift,
            config.store_dtype, config.offload, config.attention) == (0.5, 3, (9, 11), 1.0, None, torch.bfloat16,
                                                                      True, "window")
    assert parse_highres_config(None) == HighResConfig()
    with pytest.raises(ValueError, match="unknown highres option 'k'"):
        parse_highres_config("k=2")
    with pytest.raises(ValueError, match="window='9by9' is not valid"):
        parse_highres_config("window=9by9")


def test_generate_highres_errors(embedded):
    base = dict(height=64, width=64, num_frames=5, num_inference_steps=2, max_sequence_length=16, progress=False)
    with pytest.raises(ValueError, match=r"window=\(9, 3\) does not fit the target token grid 8x8"):
        generate_highres(embedded, "a fox", config=HighResConfig(window=(9, 3)), **base)
    with pytest.raises(ValueError, match="runs no step"):
        generate_highres(embedded, "a fox", config=HighResConfig(strength=0.4), **base)
    with pytest.raises(ValueError, match="upscale must be a number > 1"):
        generate_highres(embedded, "a fox", upscale=0.5, **base)
    with pytest.raises(ValueError, match="multiples of 16"):
        generate_highres(embedded, "a fox", **dict(base, height=72))
    with pytest.raises(ValueError, match="needs a Wan pipeline"):
        generate_highres(object(), "a fox", **base)
    import diffattn

    diffattn.apply(embedded, SlidingWindow((None, 3, 3)))
    try:
        with pytest.raises(ValueError, match="already applied"):
            generate_highres(embedded, "a fox", **base)
    finally:
        diffattn.remove(embedded)


# --- the pipeline and the CLI -----------------------------------------------------------------


def test_generate_highres_on_the_embedded_pipeline(embedded):
    result = generate_highres(embedded, "a red fox in the snow", height=64, width=64, num_frames=5,
                              num_inference_steps=2, max_sequence_length=16, upscale=2,
                              config=HighResConfig(strength=1.0), progress=False)
    assert result.frames.shape == (5, 128, 128, 3) and result.base_frames.shape == (5, 64, 64, 3)
    assert np.isfinite(result.frames).all() and result.frames.min() >= 0 and result.frames.max() <= 1
    record = result.record
    assert record["highres"]["token_grid"] == [2, 8, 8] and record["highres"]["window"] == [None, 5, 5]
    dual = record["highres"]["dual_path"]
    assert (dual["full_passes"], dual["window_passes"]) == (1, 4)  # steps 0 (guide) and 1; CFG doubles the window
    assert dual["cross_cache"]["peak_bytes"] == record["highres"]["cross_cache_estimate_bytes"] > 0
    assert len(record["timings_s"]["highres_pass"]["steps"]) == 2
    json.dumps(record)
    assert all(type(p).__name__ == "WanAttnProcessor" for p in embedded.transformer.attn_processors.values())


def test_cli_generate_upscale(tmp_path, capsys):
    from diffattn.cli import main

    out = tmp_path / "fox.mp4"
    rc = main(["generate", "--upscale", "2", "--size", "64x64", "--frames", "5", "--steps", "2", "--highres",
               "strength=1,guide_every=1", "--out", str(out), "--no-progress"])
    assert rc == 0
    record = json.loads(out.with_suffix(".json").read_text())
    assert out.is_file() and (record["width"], record["height"], record["frames"]) == (128, 128, 5)
    assert record["base"]["width"] == 64 and record["highres"]["config"]["guide_every"] == 1
    assert record["highres"]["dual_path"]["full_passes"] == 2
    assert set(record["timings_s"]) >= {"base_pass", "upscale", "highres_pass", "total"}


@pytest.mark.parametrize("argv, match", [
    (["--upscale", "1"], "--upscale must be a factor > 1"),
    (["--upscale", "2", "--method", "window:3x5x5"], "leave --method out"),
    (["--highres", "strength=0.5"], "--highres needs --upscale"),
    (["--upscale", "2", "--highres", "strength=2"], "--highres: strength must be"),
])
def test_cli_errors(argv, match, capsys):
    from diffattn.cli import main

    assert main(["generate", *argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("name", ["diffattn.pipelines.highres", "diffattn.integration.dual_path"])
def test_docstring_examples(name):
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in doctest.DocTestFinder(exclude_empty=True).find(module, name):
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


def test_cli_guidance_2_needs_two_experts(capsys):
    from diffattn.cli import main

    assert main(["generate", "--guidance-2", "3", "--steps", "2", "--no-progress"]) == 2
    assert "guidance_scale_2 (--guidance-2) is for two-expert pipelines" in capsys.readouterr().err
    assert main(["generate", "--guidance-2", "-1"]) == 2


def test_upscale_under_ulysses_is_refused_by_the_api():
    from diffattn.generate import UserError, generate, resolve_method

    with pytest.raises(UserError, match="does not run under Ulysses"):
        generate(prompts=["a fox"], method=resolve_method(None), upscale=2.0, ulysses=2, log=lambda *a, **k: None)
