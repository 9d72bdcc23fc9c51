"""The embedded tiny Wan pipeline's mechanics (``random_weights=True``: seeded random DiT/VAE + real MiniLM
text encoder) and diffattn.video. The trained weights: tests/test_embedded_trained.py."""

import dataclasses
import doctest
import importlib
import json

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffattn.pipelines import (  # noqa: E402
    EMBEDDED_DEFAULTS,
    EmbeddedDefaults,
    build_embedded_wan_pipeline,
    save_embedded_wan_pipeline,
)
from diffattn.pipelines.embedded import (  # noqa: E402
    EMBEDDED_TRANSFORMER_CONFIG,
    minilm_model_dir,
)
from diffattn.video import read_video, to_uint8_frames, write_png_grid, write_video  # noqa: E402

# Small enough for a fraction of a second per generation on 2 CPU cores.
SMALL = dict(height=64, width=64, num_frames=9, num_inference_steps=4, guidance_scale=5.0, max_sequence_length=32)


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, prompt="a red fox running through snow", seed=0, **overrides):
    kwargs = {**SMALL, **overrides}
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **kwargs).frames


def _realign(module):
    """Copy every tensor into a fresh allocation (see test_save_and_from_pretrained_round_trip)."""
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            tensor.data = tensor.data.clone()


@pytest.fixture(scope="module")
def pipe():
    return _quiet(build_embedded_wan_pipeline(seed=0, random_weights=True))


@pytest.fixture(scope="module")
def frames(pipe):
    return _generate(pipe)


# --- the pipeline ------------------------------------------------------------------------


def test_components_are_wan_with_a_real_minilm_text_encoder(pipe):
    assert isinstance(pipe, diffusers.WanPipeline)
    assert isinstance(pipe.transformer, diffusers.WanTransformer3DModel)
    assert isinstance(pipe.vae, diffusers.AutoencoderKLWan)
    assert type(pipe.text_encoder).__name__ == "BertModel"
    assert pipe.text_encoder.config.hidden_size == pipe.transformer.config.text_dim == 384
    assert pipe.transformer.config.in_channels == pipe.vae.config.z_dim
    assert pipe.vae_scale_factor_spatial == 8 and pipe.vae_scale_factor_temporal == 4
    for key, value in EMBEDDED_TRANSFORMER_CONFIG.items():
        got = pipe.transformer.config[key]
        assert (list(got) if isinstance(got, tuple) else got) == (list(value) if isinstance(value, tuple) else value)
    # The text encoder is the packaged pretrained checkpoint, not a random one.
    from safetensors.torch import load_file

    checkpoint = load_file(str(minilm_model_dir() / "model.safetensors"))
    state = pipe.text_encoder.state_dict()
    name = "embeddings.word_embeddings.weight"
    assert torch.equal(state[name], checkpoint[name])
    assert not pipe.transformer.training and not pipe.vae.training and not pipe.text_encoder.training


def test_generates_frames_of_the_requested_size(frames):
    assert frames.shape == (1, 9, 64, 64, 3)
    assert frames.dtype == np.float32
    assert np.isfinite(frames).all()
    assert frames.min() >= 0.0 and frames.max() <= 1.0
    assert frames.std() > 0.0  # noise, but not a constant picture


def test_pil_output_and_a_non_square_size(pipe):
    video = _generate(pipe, output_type="pil", height=48, width=80, num_frames=5, num_inference_steps=2)[0]
    assert len(video) == 5
    assert all(image.size == (80, 48) and image.mode == "RGB" for image in video)


def test_same_seed_gives_identical_weights_and_frames(pipe, frames):
    rng_before = torch.get_rng_state()
    again = _quiet(build_embedded_wan_pipeline(seed=0, random_weights=True))
    assert torch.equal(torch.get_rng_state(), rng_before), "building must not disturb the global RNG"
    for name in ("transformer", "vae", "text_encoder"):
        ours, theirs = getattr(pipe, name).state_dict(), getattr(again, name).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    np.testing.assert_array_equal(_generate(again), frames)

    other = build_embedded_wan_pipeline(seed=1, random_weights=True)
    weight = "blocks.0.attn1.to_q.weight"
    assert not torch.equal(other.transformer.state_dict()[weight], pipe.transformer.state_dict()[weight])
    words = "embeddings.word_embeddings.weight"  # the pretrained text encoder does not depend on the seed
    assert torch.equal(other.text_encoder.state_dict()[words], pipe.text_encoder.state_dict()[words])


def test_different_prompts_give_different_embeddings(pipe, frames):
    def embed(prompt):
        embeds, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=32)
        return embeds

    cat, car = embed("a cat sleeping on a sofa"), embed("a red sports car on a race track at night")
    assert cat.shape == car.shape == (1, 32, 384)
    assert torch.equal(cat, embed("a cat sleeping on a sofa"))
    # Real tokens differ; the pipeline zeroes everything after each prompt's tokens.
    cat_len = int(pipe.tokenizer("a cat sleeping on a sofa", return_tensors="pt").attention_mask.sum())
    car_len = int(pipe.tokenizer("a red sports car on a race track at night", return_tensors="pt").attention_mask.sum())
    assert cat_len < car_len < 32
    assert (cat[0, :cat_len].norm(dim=-1) > 0).all() and (cat[0, cat_len:] == 0).all()
    assert (car[0, car_len:] == 0).all()
    assert (cat[0, :cat_len] - car[0, :cat_len]).abs().max() > 0.1
    # ... and the prompt reaches the frames through cross-attention.
    assert np.abs(_generate(pipe, prompt="a red sports car on a race track at night") - frames).max() > 0


def test_save_and_from_pretrained_round_trip(tmp_path, frames):
    path = save_embedded_wan_pipeline(tmp_path / "embedded-wan", seed=0, random_weights=True)
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline"
    assert index["text_encoder"] == ["transformers", "BertModel"]
    assert index["tokenizer"][0] == "transformers" and index["tokenizer"][1].startswith("BertTokenizer")
    assert index["scheduler"] == ["diffusers", "UniPCMultistepScheduler"]

    loaded = _quiet(diffusers.WanPipeline.from_pretrained(str(path)))
    assert type(loaded.text_encoder).__name__ == "BertModel"
    reference = build_embedded_wan_pipeline(seed=0, random_weights=True)
    for name in ("transformer", "vae", "text_encoder"):
        ours, theirs = getattr(reference, name).state_dict(), getattr(loaded, name).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    def public(config):
        return {k: v for k, v in config.items() if not k.startswith("_")}

    assert public(loaded.scheduler.config) == public(reference.scheduler.config)

    # from_pretrained leaves weights at 8-byte-aligned addresses inside one loaded buffer;
    # CPU BLAS then takes other code paths and the frames differ by ~1e-6 ...
    np.testing.assert_allclose(_generate(loaded), frames, rtol=0, atol=1e-4)
    # ... with the very same weights in fresh (64-byte-aligned) memory they are bit-identical.
    for name in ("transformer", "vae", "text_encoder"):
        _realign(getattr(loaded, name))
    np.testing.assert_array_equal(_generate(loaded), frames)


def test_bfloat16_keeps_wan_fp32_modules_and_runs():
    pipe = _quiet(build_embedded_wan_pipeline(seed=0, dtype=torch.bfloat16))
    dtypes = {name: p.dtype for name, p in pipe.transformer.named_parameters()}
    assert dtypes["blocks.0.attn1.to_q.weight"] == torch.bfloat16
    assert dtypes["condition_embedder.time_embedder.linear_1.weight"] == torch.float32  # as from_pretrained keeps it
    assert dtypes["scale_shift_table"] == torch.float32
    assert pipe.text_encoder.dtype == torch.bfloat16
    assert pipe.vae.dtype == torch.float32
    video = _generate(pipe, num_frames=5, num_inference_steps=2)
    assert video.shape == (1, 5, 64, 64, 3) and np.isfinite(video).all()


def test_bad_arguments():
    with pytest.raises(TypeError, match="seed"):
        build_embedded_wan_pipeline(seed="0")
    with pytest.raises(TypeError, match="dtype"):
        build_embedded_wan_pipeline(dtype=torch.int8)


def test_defaults_are_frozen_and_valid():
    assert EMBEDDED_DEFAULTS.height % 16 == 0 and EMBEDDED_DEFAULTS.width % 16 == 0
    assert (EMBEDDED_DEFAULTS.num_frames - 1) % 4 == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        EMBEDDED_DEFAULTS.height = 32
    kwargs = EMBEDDED_DEFAULTS.call_kwargs(num_inference_steps=2)
    assert kwargs["num_inference_steps"] == 2 and kwargs["height"] == EMBEDDED_DEFAULTS.height
    assert set(kwargs) == {
        "height", "width", "num_frames", "num_inference_steps", "guidance_scale", "max_sequence_length"
    }  # fmt: skip
    with pytest.raises(TypeError, match="unknown"):
        EMBEDDED_DEFAULTS.call_kwargs(steps=2)
    with pytest.raises(ValueError, match="height"):
        EmbeddedDefaults(height=100)
    with pytest.raises(ValueError, match="num_frames"):
        EmbeddedDefaults(num_frames=8)
    with pytest.raises(ValueError, match="max_sequence_length"):
        EmbeddedDefaults(max_sequence_length=1000)


def test_pipeline_frames_to_mp4_and_contact_sheet(frames, tmp_path):
    video = write_video(frames[0], tmp_path / "out" / "noise.mp4", fps=8)
    back = read_video(video)
    assert back.shape == (9, 64, 64, 3) and back.dtype == np.uint8
    sheet = write_png_grid(frames[0], tmp_path / "out" / "noise.png", columns=3)
    from PIL import Image

    with Image.open(sheet) as image:
        assert image.size == (3 * 64 + 4 * 2, 3 * 64 + 4 * 2)


# --- diffattn.video ----------------------------------------------------------------------


def _moving_square(count=7, height=32, width=48):
    """Float frames in [0, 1]: a white square moving right over a dark gradient."""
    frames = np.zeros((count, height, width, 3), dtype=np.float32)
    frames[..., 2] = np.linspace(0.1, 0.4, width)[None, None, :]
    for i in range(count):
        frames[i, 8:20, 4 + 4 * i : 16 + 4 * i] = 1.0
    return frames


def test_mp4_round_trip(tmp_path):
    frames = _moving_square()
    path = write_video(frames, tmp_path / "square.mp4", fps=12)
    assert path.stat().st_size > 0
    back = read_video(path)
    assert back.shape == (7, 32, 48, 3) and back.dtype == np.uint8
    # H.264 is lossy: close, not equal.
    assert np.abs(back.astype(float) - to_uint8_frames(frames).astype(float)).mean() < 4.0


def test_mp4_odd_sizes_are_padded_to_even(tmp_path):
    frames = (np.random.default_rng(0).random((5, 33, 45, 3)) * 255).astype(np.uint8)
    back = read_video(write_video(frames, tmp_path / "odd.mp4"))
    assert back.shape == (5, 34, 46, 3)


def test_gif_round_trip_from_pil_images(tmp_path):
    from PIL import Image

    uint8 = to_uint8_frames(_moving_square())
    images = [Image.fromarray(frame) for frame in uint8]
    back = read_video(write_video(images, tmp_path / "square.GIF", fps=10))
    assert back.shape == uint8.shape
    np.testing.assert_array_equal(back, uint8)  # few colours: GIF's palette is exact


def test_frame_inputs_are_converted_or_refused():
    assert to_uint8_frames(np.ones((2, 3, 4), dtype=np.float64)).shape == (2, 3, 4, 3)
    assert to_uint8_frames(torch.zeros(2, 3, 4, 3)).dtype == np.uint8
    assert (to_uint8_frames(np.full((1, 2, 2, 3), 1.004)) == 255).all()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        to_uint8_frames(np.full((1, 2, 2, 3), -1.0))
    with pytest.raises(ValueError, match="NaN"):
        to_uint8_frames(np.full((1, 2, 2, 3), np.nan))
    with pytest.raises(ValueError, match="0, 255"):
        to_uint8_frames(np.full((1, 2, 2, 3), 300, dtype=np.int32))
    with pytest.raises(ValueError, match="frames\\[0\\]|5 dims"):
        to_uint8_frames(np.zeros((1, 2, 4, 4, 3)))
    with pytest.raises(ValueError, match="empty"):
        to_uint8_frames([])
    with pytest.raises(ValueError, match="same size"):
        to_uint8_frames([np.zeros((2, 2, 3)), np.zeros((3, 2, 3))])
    with pytest.raises(ValueError, match=r"\[F, H, W, 3\]"):
        to_uint8_frames(np.zeros((1, 2, 2, 2)))


@pytest.mark.parametrize("name", ["clip.avi", "clip", "clip.png"])
def test_unsupported_video_extensions_are_refused(tmp_path, name):
    with pytest.raises(ValueError, match="extension"):
        write_video(_moving_square(), tmp_path / name)
    with pytest.raises(ValueError, match="extension"):
        read_video(tmp_path / name)
    assert not (tmp_path / name).exists()


def test_bad_fps_and_grid_arguments(tmp_path):
    with pytest.raises(ValueError, match="fps"):
        write_video(_moving_square(), tmp_path / "a.mp4", fps=0)
    with pytest.raises(ValueError, match="extension"):
        write_png_grid(_moving_square(), tmp_path / "a.jpg")
    with pytest.raises(ValueError, match="columns"):
        write_png_grid(_moving_square(), tmp_path / "a.png", columns=0)


def test_png_grid_layout(tmp_path):
    from PIL import Image

    frames = np.zeros((7, 10, 12, 3), dtype=np.uint8)
    for i in range(7):
        frames[i] = 10 * (i + 1)
    path = write_png_grid(frames, tmp_path / "grid.png", columns=3, padding=2, background=255)
    sheet = np.asarray(Image.open(path))
    assert sheet.shape == (3 * 10 + 4 * 2, 3 * 12 + 4 * 2, 3)
    # frame 4 is row 1, column 1
    assert (sheet[2 + 12 : 2 + 12 + 10, 2 + 14 : 2 + 14 + 12] == 50).all()
    assert (sheet[0] == 255).all()  # padding
    # default: roughly square
    default = np.asarray(Image.open(write_png_grid(frames, tmp_path / "square.png", padding=0)))
    assert default.shape == (3 * 10, 3 * 12, 3)


@pytest.mark.parametrize("name", ["diffattn.video", "diffattn.pipelines.embedded"])
def test_docstring_examples(name):
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in doctest.DocTestFinder(exclude_empty=True).find(module, name) if t.examples]
    assert tests
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0
