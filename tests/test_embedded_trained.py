"""The trained embedded pipeline: its training data (procedural shape clips), the shipped weights,
a short generation that shows what the prompt asks for, and the training script (a tiny run)."""

import json

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffattn.pipelines import EMBEDDED_DEFAULTS, build_embedded_wan_pipeline  # noqa: E402
from diffattn.pipelines.embedded import (  # noqa: E402
    EMBEDDED_TRANSFORMER_CONFIG,
    EMBEDDED_VAE_CONFIG,
    embedded_weights_dir,
)
from diffattn.pipelines.shapes_data import (  # noqa: E402
    COLORS,
    MOTIONS,
    SHAPES,
    ObjectSpec,
    check_prompt,
    color_mask,
    make_clip,
    make_clips,
    motion_of,
    parse_prompt,
    prompt_of,
    track,
)

# --- the data generator ---------------------------------------------------------------------


def test_clips_are_deterministic_from_seed_and_index():
    a, b = make_clip(7, 3, num_frames=9, height=64, width=64), make_clip(7, 3, num_frames=9, height=64, width=64)
    assert a.prompt == b.prompt and np.array_equal(a.frames, b.frames) and np.array_equal(a.centers, b.centers)
    assert a.frames.shape == (9, 64, 64, 3) and a.frames.dtype == np.float32
    assert 0.0 <= a.frames.min() and a.frames.max() <= 1.0
    others = [make_clip(7, i, num_frames=9, height=64, width=64) for i in range(4, 8)] + [make_clip(8, 3, num_frames=9,
                                                                                                    height=64, width=64)]
    assert all(not np.array_equal(a.frames, o.frames) for o in others)
    assert [c.prompt for c in make_clips(3, seed=7, start=2, num_frames=9, height=64, width=64)][1] == a.prompt


def test_prompts_follow_the_grammar_and_cover_everything():
    clips = make_clips(120, seed=0, num_frames=5, height=32, width=32)
    objects = [o for c in clips for o in c.objects]
    assert {o.color for o in objects} == set(COLORS)
    assert {o.shape for o in objects} == set(SHAPES)
    assert {o.motion for o in objects} == set(MOTIONS)
    assert any(len(c.objects) == 2 for c in clips) and any(len(c.objects) == 1 for c in clips)
    for c in clips:
        assert parse_prompt(c.prompt) == list(c.objects)
        assert prompt_of(c.objects) == c.prompt
        if len(c.objects) == 2:
            assert c.objects[0].color != c.objects[1].color
    assert parse_prompt("a white square standing still") == [ObjectSpec("white", "square", "still")]
    assert parse_prompt("a cat on a sofa") == []


@pytest.mark.parametrize("index", range(12))
def test_the_clip_shows_its_prompt(index):
    """Colour and motion detectable from the pixels alone, and agreeing with the generator's own paths."""
    clip = make_clip(11, index, num_frames=17, height=128, width=128)
    result = check_prompt(clip.frames, clip.prompt)
    assert result["ok"], (clip.prompt, result)
    for obj, path, found in zip(clip.objects, clip.centers, result["objects"]):
        assert found["color_present"] and found["motion"] == obj.motion
        dx, dy = path[-1] - path[0]
        assert (np.sign(dx), np.sign(dy)) == MOTIONS[obj.motion]
        if len(clip.objects) == 1:  # unoccluded: the colour's centroid is the object's centre
            centers = track(clip.frames, obj.color)
            assert np.nanmax(np.abs(centers - path)) < 2.0


def test_the_centred_layout_keeps_objects_near_the_middle_and_in_the_frame():
    """The transformer's training clips: objects near the centre (two: one per diagonal quarter)."""
    clips = make_clips(60, seed=3, num_frames=17, height=64, width=64, layout="centred", two_objects=0.3)
    assert any(len(c.objects) == 2 for c in clips)
    for c in clips:
        assert check_prompt(c.frames, c.prompt)["ok"], c.prompt
        for path, r, obj in zip(c.centers, c.sizes, c.objects):
            assert (path >= r).all() and (path <= 64 - r).all()
            middle = path.mean(0) / 64
            if len(c.objects) == 1:
                assert np.abs(middle - 0.5).max() < 0.12
            dx, dy = path[-1] - path[0]
            assert (np.sign(dx), np.sign(dy)) == MOTIONS[obj.motion]
    free = make_clip(3, 0, num_frames=5, height=32, width=32)
    assert np.array_equal(free.frames, make_clip(3, 0, num_frames=5, height=32, width=32, layout="free").frames)
    with pytest.raises(ValueError, match="layout must be one of"):
        make_clip(3, 0, layout="corner")


def test_the_dark_background_is_one_plain_colour_and_the_objects_are_the_same():
    """The transformer's training clips use the ``dark`` background: the same objects and paths as
    the ``varied`` one (the same draws), on DARK everywhere no object covers."""
    from diffattn.pipelines.shapes_data import BACKGROUNDS, DARK

    for index in range(6):
        varied = make_clip(5, index, num_frames=5, height=48, width=48)
        dark = make_clip(5, index, num_frames=5, height=48, width=48, background="dark")
        assert dark.prompt == varied.prompt and np.array_equal(dark.centers, varied.centers)
        corners = dark.frames[:, [0, 0, -1, -1], [0, -1, 0, -1]]
        assert np.allclose(corners, np.asarray(DARK, dtype=np.float32), atol=1e-6)
        assert check_prompt(dark.frames, dark.prompt)["ok"]
    assert BACKGROUNDS == ("varied", "dark")
    with pytest.raises(ValueError, match="background must be one of"):
        make_clip(3, 0, background="white")


def test_the_detector_rejects_wrong_colours_and_directions():
    clip = make_clip(0, 0, num_frames=17, height=64, width=64)
    obj = clip.objects[0]
    other_color = next(c for c in COLORS if c not in {o.color for o in clip.objects})
    assert check_prompt(clip.frames, clip.prompt.replace(obj.color, other_color, 1))["ok"] is False
    wrong = {"left": "right", "right": "left", "up": "down", "down": "up", "still": "left"}[obj.motion]
    wrong_prompt = prompt_of([ObjectSpec(obj.color, obj.shape, wrong), *clip.objects[1:]])
    assert check_prompt(clip.frames, wrong_prompt)["ok"] is False
    assert check_prompt(clip.frames, "a cat on a sofa") == {"objects": [], "ok": None}
    blank = np.zeros((5, 32, 32, 3), np.float32)
    assert not color_mask(blank, "red").any() and motion_of(track(blank, "red"), (32, 32)) is None


# --- the shipped weights ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe():
    pipe = build_embedded_wan_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_weights_load_offline(pipe, monkeypatch):
    from safetensors.torch import load_file

    folder = embedded_weights_dir()
    for name, model in (("transformer", pipe.transformer), ("vae", pipe.vae)):
        file = folder / name / "diffusion_pytorch_model.safetensors"
        assert file.stat().st_size < 8_000_000
        saved = load_file(str(file))
        state = model.state_dict()
        assert saved.keys() == state.keys()
        assert all(torch.equal(saved[k].float(), state[k].float()) for k in saved), name
    config = pipe.transformer.config
    for key, value in EMBEDDED_TRANSFORMER_CONFIG.items():
        got = config[key]
        assert (list(got) if isinstance(got, tuple) else got) == (list(value) if isinstance(value, tuple) else value)
    for key, value in EMBEDDED_VAE_CONFIG.items():
        assert pipe.vae.config[key] == value, key
    # The trained latent statistics replace the Wan defaults.
    assert len(pipe.vae.config.latents_mean) == len(pipe.vae.config.latents_std) == 16
    assert pipe.vae.config.latents_mean[0] != -0.7571
    assert pipe.vae_scale_factor_spatial == 8 and pipe.vae_scale_factor_temporal == 4
    record = json.loads((folder / "training.json").read_text())
    assert record["config"]["size"] == EMBEDDED_DEFAULTS.height == EMBEDDED_DEFAULTS.width
    assert record["config"]["frames"] == EMBEDDED_DEFAULTS.num_frames
    # Offline: loading again with the hub disabled works (nothing is fetched).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = build_embedded_wan_pipeline()
    assert torch.equal(again.transformer.state_dict()["blocks.0.attn1.to_q.weight"],
                       pipe.transformer.state_dict()["blocks.0.attn1.to_q.weight"])


def test_random_weights_option_keeps_the_old_behaviour(pipe):
    rng = torch.get_rng_state()
    a = build_embedded_wan_pipeline(seed=0, random_weights=True)
    b = build_embedded_wan_pipeline(seed=0, random_weights=True)
    c = build_embedded_wan_pipeline(seed=1, random_weights=True)
    assert torch.equal(torch.get_rng_state(), rng)
    name = "blocks.0.attn1.to_q.weight"
    assert torch.equal(a.transformer.state_dict()[name], b.transformer.state_dict()[name])
    assert not torch.equal(a.transformer.state_dict()[name], c.transformer.state_dict()[name])
    assert not torch.equal(a.transformer.state_dict()[name], pipe.transformer.state_dict()[name])
    assert a.transformer.config.num_attention_heads == pipe.transformer.config.num_attention_heads
    with pytest.raises(TypeError, match="random_weights"):
        build_embedded_wan_pipeline(random_weights="yes")


@pytest.mark.parametrize("prompt, color", [("a red circle moving right", "red"), ("a blue square moving up", "blue")])
def test_a_short_generation_shows_the_asked_colour(pipe, prompt, color):
    """At the trained size, 6 steps (a few seconds): the asked colour covers a good part of some frames,
    no other object colour comes near it, and the detector sees it move the asked way."""
    frames = pipe(prompt, generator=torch.Generator().manual_seed(0),
                  **EMBEDDED_DEFAULTS.call_kwargs(num_inference_steps=6)).frames[0]
    assert frames.shape == (17, 256, 256, 3)
    result = check_prompt(frames, prompt)
    assert result["objects"][0]["color_present"] and result["ok"], result
    asked = color_mask(frames, color).mean()
    assert asked > 0.005
    assert all(asked > 5 * color_mask(frames, other).mean() for other in COLORS if other != color)


# --- the training script ----------------------------------------------------------------------


def test_training_runs_a_few_steps_and_saves_loadable_weights(tmp_path):
    from diffattn.pipelines.train_embedded import QUICK, main, train

    record = train(QUICK, tmp_path / "w", plot=tmp_path / "loss.png", progress=False, log=lambda *a: None)
    assert len(record["losses"]["vae_l1"]) == QUICK.vae_steps
    assert len(record["losses"]["transformer_mse"]) == QUICK.short_steps + QUICK.dit_steps
    assert len(record["losses"]["transformer_mse_more"]) == QUICK.more_short_steps + QUICK.more_steps
    assert all(np.isfinite(v) for v in record["losses"]["transformer_mse"])
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    transformer = diffusers.WanTransformer3DModel.from_pretrained(str(tmp_path / "w" / "transformer"))
    vae = diffusers.AutoencoderKLWan.from_pretrained(str(tmp_path / "w" / "vae"))
    assert transformer.config.num_layers == EMBEDDED_TRANSFORMER_CONFIG["num_layers"]
    assert len(vae.config.latents_std) == vae.config.z_dim
    # Deterministic: the transformer's two rounds alone, from the saved VAE, give the same transformer.
    assert main(["--quick", "--out", str(tmp_path / "w"), "--stages", "dit,dit-more", "--no-progress"]) == 0
    again = diffusers.WanTransformer3DModel.from_pretrained(str(tmp_path / "w" / "transformer"))
    assert all(torch.equal(a, b) for a, b in zip(transformer.state_dict().values(), again.state_dict().values()))
    # ... and so do the two rounds run one after the other, the second from the first's saved weights.
    for stage in ("dit", "dit-more"):
        assert main(["--quick", "--out", str(tmp_path / "w"), "--stages", stage, "--no-progress"]) == 0
    again = diffusers.WanTransformer3DModel.from_pretrained(str(tmp_path / "w" / "transformer"))
    assert all(torch.equal(a, b) for a, b in zip(transformer.state_dict().values(), again.state_dict().values()))


# --- the command line ---------------------------------------------------------------------------


def test_cli_uses_the_trained_weights_unless_random_weights_is_given(tmp_path, capsys):
    from diffattn.cli import main

    tiny = ["generate", "--size", "64x64", "--frames", "1", "--steps", "1", "--no-progress"]
    records = {}
    for name, extra in (("trained", []), ("random", ["--random-weights"])):
        out = tmp_path / f"{name}.png"
        assert main([*tiny, *extra, "--out", str(out)]) == 0
        records[name] = json.loads(out.with_suffix(".json").read_text())
    assert records["trained"]["model"]["random_weights"] is False and "coloured shapes" in records["trained"]["note"]
    assert records["random"]["model"]["random_weights"] is True and "noise" in records["random"]["note"]
    assert records["random"]["model"]["weights_seed"] == 0
    capsys.readouterr()
    assert main([*tiny, "--random-weights", "--model", str(tmp_path / "some-checkpoint"), "--out",
                 str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--random-weights is for the embedded pipeline" in err[0]


def test_the_detector_reads_the_shape():
    from diffattn.pipelines.shapes_data import shape_of

    clips = make_clips(24, seed=11, num_frames=5, height=128, width=128, two_objects=0.0)
    assert {c.objects[0].shape for c in clips} == set(SHAPES)
    for clip in clips:
        obj = clip.objects[0]
        assert shape_of(clip.frames, obj.color) == obj.shape, clip.prompt
        assert check_prompt(clip.frames, clip.prompt)["objects"][0]["shape_ok"]
    assert shape_of(np.zeros((3, 32, 32, 3), np.float32), "red") is None
