"""Presets: every shipped YAML loads, its pattern fits its token grid; bad files are clear errors."""

import dataclasses
import doctest
import importlib
import inspect
import re
from pathlib import Path

import pytest
import yaml

import diffattn
from diffattn import Radial, SlidingWindow, TokenLayout, build_block_layout
from diffattn.kernels import kernel_block_size
from diffattn.presets import (
    FAMILIES,
    GENERATION_KEYS,
    PatternConfig,
    Preset,
    PresetError,
    configs_dir,
    list_presets,
    load_preset,
    token_grid,
)

REPO = Path(__file__).resolve().parent.parent
REQUIRED = [
    "wan-radial", "wan-window", "hunyuan_video-radial", "hunyuan_video-window", "cogvideox-window",
    "flux-window", "sd3-window", "ltx-window",
]
# Head dims of the released checkpoints (diffusers constructor defaults): the kernel's block sizes.
HEAD_DIM = {"wan": 128, "hunyuan_video": 128, "cogvideox": 64, "flux": 128, "sd3": 64, "ltx": 64, "wan_vace": 128,
            "wan_animate": 128, "skyreels_v2": 128, "hunyuan_video15": 128, "ltx2": 128, "kandinsky5": 64,
            "motif_video": 128, "qwen_image": 128, "flux2": 128, "mochi": 128, "cosmos": 128, "z_image": 128}
# Dense tokens beside the grid in the self-attention of the released pipelines (text, Wan Animate's
# reference frame; dense in both directions). Families whose count varies with the prompt: 0.
TEXT_LEN = {"wan": 0, "hunyuan_video": 256, "cogvideox": 226, "flux": 512, "sd3": 333, "ltx": 0, "wan_animate": 3600,
            "flux2": 512}
DIFFUSERS_PIPELINE = {"wan": "WanPipeline", "hunyuan_video": "HunyuanVideoPipeline", "cogvideox": "CogVideoXPipeline",
                      "flux": "FluxPipeline", "sd3": "StableDiffusion3Pipeline", "ltx": "LTXPipeline",
                      "wan_vace": "WanVACEPipeline", "wan_animate": "WanAnimatePipeline",
                      "skyreels_v2": "SkyReelsV2DiffusionForcingPipeline", "hunyuan_video15": "HunyuanVideo15Pipeline",
                      "ltx2": "LTX2Pipeline", "kandinsky5": "Kandinsky5T2VPipeline", "motif_video": "MotifVideoPipeline",
                      "qwen_image": "QwenImagePipeline", "flux2": "Flux2Pipeline", "mochi": "MochiPipeline",
                      "cosmos": "Cosmos2VideoToWorldPipeline", "z_image": "ZImagePipeline"}


def test_required_presets_are_shipped():
    assert configs_dir() == REPO / "configs"  # a source checkout without the package-data mapping
    assert set(REQUIRED) <= set(list_presets())
    assert list_presets() == sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("name", list_presets())
def test_preset_loads_and_its_pattern_fits_its_grid(name, record_property):
    preset = load_preset(name)
    assert preset.path == REPO / "configs" / f"{name}.yaml"
    assert preset.name == name == f"{preset.family}-{preset.method}"
    assert preset.model.count("/") == 1 and preset.source
    assert tuple(preset.generation) == GENERATION_KEYS[preset.family]
    steps = preset.generation["num_inference_steps"]
    assert preset.schedule.dense_steps + preset.schedule.dense_last_steps < steps
    # Loading by path gives the same preset.
    assert load_preset(REPO / "configs" / f"{name}.yaml") == preset

    pattern = preset.build_pattern()
    grid = preset.token_grid()
    pattern.validate(grid)
    block_q, block_k = kernel_block_size(HEAD_DIM[preset.family])
    blocks = build_block_layout(pattern, grid, block_q, block_k)
    # Radial keeps whole 128-token blocks, so what it attends is what the layout computes
    # (test_radial checks that); building its mask twice at 115k tokens would take seconds.
    attended = blocks.block_density if isinstance(pattern, Radial) else pattern.attended_fraction(TokenLayout(grid))
    n, t = blocks.num_tokens, TEXT_LEN.get(preset.family, 0)
    with_text = (attended * n * n + 2 * n * t + t * t) / (n + t) ** 2  # text is dense both ways
    computed = blocks.block_density
    report = (f"{name}: {'x'.join(map(str, grid))} tokens, {pattern}: attends {attended:.1%} "
              f"({with_text:.1%} with {t} dense tokens), computes {computed:.1%} "
              f"in {block_q}x{block_k} blocks")
    print(report)
    record_property("density", report)
    assert attended <= computed + 1e-9  # the kernel visits every attended pair
    assert 0.05 < attended and computed < 0.4, report  # sparse enough to be worth it, not degenerate
    # The documented numbers in the preset's source are the measured ones.
    for number in re.findall(r"(?<![\d.])(?<!paper )(\d+\.\d)%", preset.source):
        assert any(abs(float(number) - 100 * x) < 0.05 for x in (attended, with_text, computed)), (number, report)


def test_radial_presets_match_the_paper():
    wan = load_preset("wan-radial")
    assert wan.build_pattern() == Radial(0.2, sink=True)
    assert (wan.schedule.dense_steps, wan.schedule.dense_layers, wan.generation["num_inference_steps"]) == (12, 1, 50)
    # The original's block rule (tests/test_radial.py): 0.3435 at 21x30x52 (paper 0.339).
    assert wan.token_grid() == (21, 30, 52)
    assert wan.build_pattern().attended_fraction(TokenLayout(wan.token_grid())) == 368672832 / 32760**2
    hunyuan = load_preset("hunyuan_video-radial")
    assert hunyuan.build_pattern() == Radial(0.95, sink=False)
    assert hunyuan.token_grid() == (30, 48, 80)  # 0.2746
    assert hunyuan.build_pattern().attended_fraction(TokenLayout(hunyuan.token_grid())) == 3644653568 / 115200**2
    assert (hunyuan.schedule.dense_steps, hunyuan.schedule.dense_layers, hunyuan.generation["num_inference_steps"]) == (12, 0, 50)


@pytest.mark.parametrize("family, size, grid", [
    ("wan", (480, 832, 81), (21, 30, 52)),
    ("wan", (720, 1280, 81), (21, 45, 80)),
    ("hunyuan_video", (768, 1280, 117), (30, 48, 80)),
    ("hunyuan_video", (720, 1280, 129), (33, 45, 80)),
    ("cogvideox", (480, 720, 49), (13, 30, 45)),
    ("ltx", (512, 704, 161), (21, 16, 22)),
    ("flux", (1024, 1024, None), (64, 64)),
    ("sd3", (1024, 768, None), (64, 48)),
    ("wan_animate", (720, 1280, 77), (20, 45, 80)),   # segment_frame_length 77: the frames behind the reference
    ("skyreels_v2", (544, 960, 97), (25, 34, 60)),
    ("hunyuan_video15", (480, 848, 121), (31, 30, 53)),
    ("ltx2", (512, 768, 121), (16, 16, 24)),
    ("kandinsky5", (512, 768, 121), (31, 32, 48)),
    ("motif_video", (736, 1280, 121), (31, 46, 80)),
    ("qwen_image", (1024, 1024, None), (64, 64)),
    ("flux2", (1024, 1024, None), (64, 64)),
    ("mochi", (480, 848, 163), (28, 30, 53)),        # 6x temporal VAE
    ("mochi", (480, 848, 19), (4, 30, 53)),          # MochiPipeline's default length
    ("cosmos", (704, 1280, 93), (24, 44, 80)),       # Cosmos-Predict2 / 2.5
    ("z_image", (1024, 1024, None), (64, 64)),
])
def test_token_grid(family, size, grid):
    assert token_grid(family, *size) == grid


@pytest.mark.parametrize("args, match", [
    (("wan", 480, 830, 81), "width must be a positive multiple of 16"),
    (("ltx", 496, 704, 161), "height must be a positive multiple of 32"),
    (("wan", 480, 832, 80), r"num_frames must be 4k \+ 1"),
    (("ltx", 512, 704, 85), r"num_frames must be 8k \+ 1"),
    (("flux", 1024, 1024, 9), "images: num_frames must be None"),
    (("minimax_h3", 480, 848, 33), "family must be one of"),  # an adapter without presets
    (("mochi", 480, 848, 81), r"num_frames must be 6k \+ 1"),
    (("wan_animate", 720, 1280, 76), r"segment_frame_length must be 4k \+ 1"),
    (("hunyuan_video15", 480, 840, 121), "width must be a positive multiple of 16"),
])
def test_token_grid_errors(args, match):
    with pytest.raises(ValueError, match=match):
        token_grid(*args)


def test_generation_keys_are_pipeline_arguments():
    import diffusers

    assert set(GENERATION_KEYS) == set(FAMILIES)
    for family, keys in GENERATION_KEYS.items():
        parameters = inspect.signature(getattr(diffusers, DIFFUSERS_PIPELINE[family]).__call__).parameters
        assert set(keys) <= set(parameters), family
        assert ("num_frames" in keys) == ("num_frames" in parameters), family


def test_preset_is_frozen_and_round_trips():
    preset = load_preset("wan-window")
    with pytest.raises(dataclasses.FrozenInstanceError):
        preset.family = "flux"
    assert preset.pattern == PatternConfig("window", {"window": [9, 15, None]})
    assert preset.build_pattern() == SlidingWindow((9, 15, None))
    assert preset.schedule == diffattn.Schedule(12, 1, 0)
    data = preset.to_dict()
    assert data == yaml.safe_load((REPO / "configs" / "wan-window.yaml").read_text()) | {"source": preset.source}
    assert preset.schedule_kwargs() == {"dense_steps": 12, "dense_layers": 1, "dense_last_steps": 0}


def test_override_revalidates():
    preset = load_preset("wan-radial")
    window = preset.override(pattern="window:1x3x3", schedule={"dense_steps": 0})
    assert window.method == "window" and window.build_pattern() == SlidingWindow((1, 3, 3))
    assert window.schedule == diffattn.Schedule(0, 1, 0)  # the other fields kept
    assert preset.override(pattern=SlidingWindow(3)).pattern.kind == "window"
    assert preset.override(pattern={"kind": "radial", "decay": 0.5}).build_pattern() == Radial(0.5)
    assert preset.override(generation={"num_inference_steps": 20}).generation["num_inference_steps"] == 20
    with pytest.raises(PresetError, match="schedule.dense_steps must be an int >= 0, got -2"):
        preset.override(schedule={"dense_steps": -2})
    with pytest.raises(PresetError, match=r"dense_last_steps \(12\) exceed generation.num_inference_steps \(8\)"):
        preset.override(generation={"num_inference_steps": 8})
    with pytest.raises(PresetError, match="pattern does not fit the token grid 21x30x52"):
        preset.override(pattern="window:22x3x3")
    with pytest.raises(PresetError, match="generation.num_frames is not a setting of flux"):
        load_preset("flux-window").override(generation={"num_frames": 9})


def test_call_kwargs_checks_the_pattern_against_the_new_grid():
    preset = load_preset("wan-window")
    assert preset.call_kwargs() == dict(preset.generation)
    kwargs = preset.call_kwargs(height=720, width=1280)
    assert (kwargs["height"], kwargs["width"], kwargs["num_frames"]) == (720, 1280, 81)
    assert preset.token_grid(height=720, width=1280) == (21, 45, 80)
    # The embedded demo's 128x128x17 generation is a 5x8x8 grid: a 9-frame window does not fit.
    with pytest.raises(PresetError, match=r"does not fit the token grid 5x8x8 of 128x128x17: SlidingWindow window\[0\]=9"):
        preset.call_kwargs(height=128, width=128, num_frames=17)
    with pytest.raises(PresetError, match="generation.fps is not a setting of wan"):
        preset.call_kwargs(fps=16)


# --- bad files ------------------------------------------------------------------------------


def base() -> dict:
    return yaml.safe_load((REPO / "configs" / "wan-radial.yaml").read_text())


def write(tmp_path, data, name="bad.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def edited(**changes):
    """``base()`` with dotted keys set (value ...: deleted)."""
    data = base()
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        target = data
        for parent in parents:
            target = target[parent]
        if value is ...:
            del target[key]
        else:
            target[key] = value
    return data


BAD = {
    "unknown top-level key": (edited(sched={}), "sched is not a preset key; allowed: family, method"),
    "unknown schedule key": (edited(schedule__dense_step=3), "schedule.dense_step is not a schedule setting"),
    "unknown generation key": (edited(generation__fps=16), "generation.fps is not a setting of wan"),
    "unknown pattern key": (edited(pattern__decay_factor=1.0), "pattern.decay_factor is not an argument of the radial pattern"),
    "negative steps": (edited(schedule__dense_steps=-1), "schedule.dense_steps must be an int >= 0, got -1"),
    "string layers": (edited(schedule__dense_layers="1"), "schedule.dense_layers must be an int >= 0, got '1'"),
    "float steps": (edited(schedule__dense_last_steps=1.5), "schedule.dense_last_steps must be an int >= 0, got 1.5"),
    "bool steps": (edited(schedule__dense_steps=True), "schedule.dense_steps must be an int >= 0, got True"),
    "schedule not a mapping": (edited(schedule=[12, 1]), "schedule must be a mapping"),
    "too many dense steps": (edited(schedule__dense_steps=60), r"schedule.dense_steps \+ schedule.dense_last_steps \(60\) exceed"),
    "string height": (edited(generation__height="480"), "generation.height must be an int >= 1, got '480'"),
    "zero steps": (edited(generation__num_inference_steps=0), "generation.num_inference_steps must be an int >= 1, got 0"),
    "bad guidance": (edited(generation__guidance_scale="high"), "generation.guidance_scale must be a number >= 0, got 'high'"),
    "odd height": (edited(generation__height=481), "generation: height must be a positive multiple of 16 for wan, got 481"),
    "bad frame count": (edited(generation__num_frames=80), r"generation: num_frames must be 4k \+ 1"),
    "missing frames": (edited(generation__num_frames=...), "generation.num_frames is required"),
    "generation not a mapping": (edited(generation="480p"), "generation must be a mapping"),
    "unknown family": (edited(family="wan3"), "family must be one of wan, hunyuan_video, cogvideox, flux, sd3, ltx, .*got 'wan3'"),
    "unknown method": (edited(method="topk"), "method must be one of dense, window, radial, got 'topk'"),
    "unknown kind": (edited(pattern__kind="topk"), "pattern.kind must be one of dense, window, radial, got 'topk'"),
    "missing kind": (edited(pattern__kind=...), r"pattern.kind is required"),
    "kind and method disagree": (edited(method="window"), r"pattern.kind \('radial'\) must equal method \('window'\)"),
    "negative decay": (edited(pattern__decay=-1), "pattern.decay must be a number > 0, got -1"),
    "string sink": (edited(pattern__sink="yes"), "pattern.sink must be true or false, got 'yes'"),
    "bad block": (edited(pattern__block=100), "pattern.block must be a power of two >= 16, got 100"),
    "missing decay": (edited(pattern__decay=...), r"pattern.decay is required for the radial pattern"),
    "pattern not a mapping": (edited(pattern="radial:0.2"), "pattern must be a mapping with a kind"),
    "window rejected by the class": (
        edited(method="window", pattern={"kind": "window", "window": [3, 3, 3], "stride": [1, 1]}),
        "pattern: SlidingWindow window, stride, dilation and tile tuples must have the same length"),
    "window of zero": (edited(method="window", pattern={"kind": "window", "window": [0, 3, 3]}), "pattern.window must be"),
    "window larger than the grid": (
        edited(method="window", pattern={"kind": "window", "window": [22, 3, 3]}),
        r"pattern does not fit the token grid 21x30x52 of 480x832x81: SlidingWindow window\[0\]=22"),
    "2-d window on a video grid": (
        edited(method="window", pattern={"kind": "window", "window": [9, 15]}), "pattern does not fit the token grid"),
    "stride larger than the window": (
        edited(method="window", pattern={"kind": "window", "window": [3, 3, 3], "stride": [4, 1, 1]}),
        r"pattern does not fit .*stride\[0\]=4 is larger than window\[0\]=3"),
    "dense with options": (edited(method="dense", pattern={"kind": "dense", "window": 3}),
                           "pattern.window is not an argument of the dense pattern; allowed: none"),
    "missing model": (edited(model=...), "model is required"),
    "model not a string": (edited(model=123), "model must be a string, got 123"),
    "source not a string": (edited(source=["a"]), "source must be a string"),
    "image family with frames": (
        edited(family="flux", method="window", pattern={"kind": "window", "window": [21, None]}),
        r"generation.num_frames is not a setting of flux \(an image family: no num_frames\)"),
    "num_frames for wan_animate": (
        edited(family="wan_animate"),
        r"generation.num_frames is not a setting of wan_animate \(its frames setting is segment_frame_length\)"),
    "guidance for a guider family": (
        edited(family="hunyuan_video15", generation={"height": 480, "width": 848, "num_frames": 121,
                                                      "num_inference_steps": 50, "guidance_scale": 6.0}),
        "generation.guidance_scale is not a setting of hunyuan_video15; allowed: height, width, num_frames, "
        "num_inference_steps$"),
    "bad true_cfg_scale": (
        edited(family="qwen_image", method="window", pattern={"kind": "window", "window": [21, None]},
               generation={"height": 1024, "width": 1024, "num_inference_steps": 50, "true_cfg_scale": -1}),
        "generation.true_cfg_scale must be a number >= 0, got -1"),
    "not a mapping": ("- family\n- wan\n", "a preset must be a mapping"),
    "empty file": ("", "a preset must be a mapping .* got NoneType"),
    "invalid yaml": ("family: [wan\n", "not valid YAML"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_preset_names_file_and_key(tmp_path, case):
    data, match = BAD[case]
    path = write(tmp_path, data)
    with pytest.raises(PresetError, match=match) as info:
        load_preset(path)
    assert str(info.value).startswith(f"{path}: "), str(info.value)
    assert isinstance(info.value, ValueError)


def test_error_names_the_file_relative_to_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    write(tmp_path / "configs", edited(schedule__dense_steps=-1), "wan-radial.yaml")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PresetError) as info:
        load_preset("configs/wan-radial.yaml")
    assert str(info.value) == "configs/wan-radial.yaml: schedule.dense_steps must be an int >= 0, got -1"


def test_optional_keys_default(tmp_path):
    data = edited(schedule=..., source=...)
    preset = load_preset(write(tmp_path, data, "mine.yaml"))
    assert preset.schedule == diffattn.Schedule() and preset.source == "" and preset.name == "mine"


def test_unknown_names_and_missing_files(tmp_path):
    with pytest.raises(PresetError, match=r"unknown preset 'wan-topk'; available: cogvideox-window, .*wan-radial"):
        load_preset("wan-topk")
    with pytest.raises(PresetError, match="preset file '.*nope.yaml' does not exist"):
        load_preset(tmp_path / "nope.yaml")
    with pytest.raises(PresetError, match="does not exist"):
        load_preset("nope.yaml")
    with pytest.raises(PresetError, match="preset must be a preset name"):
        load_preset(42)


def test_preset_built_in_code_is_validated():
    pattern = PatternConfig("radial", {"decay": 0.2})
    generation = dict(height=480, width=832, num_frames=81, num_inference_steps=50, guidance_scale=5)
    preset = Preset("wan", "radial", "some/model", pattern, generation=generation)
    assert preset.name == "wan-radial" and preset.generation["guidance_scale"] == 5.0
    with pytest.raises(PresetError, match=r"preset flux-radial: generation.num_frames is not a setting of flux"):
        Preset("flux", "radial", "some/model", pattern, generation=generation)
    with pytest.raises(PresetError, match="pattern.kind must be one of"):
        PatternConfig("topk", {})
    assert PatternConfig.from_pattern("radial:0.95,sink=false").build() == Radial(0.95, sink=False)
    assert PatternConfig.from_pattern(diffattn.Dense()).to_dict() == {"kind": "dense"}


@pytest.mark.parametrize("name", ["diffattn.presets", "diffattn.pipelines.load"])
def test_docstring_examples(name):
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in doctest.DocTestFinder(exclude_empty=True).find(module, name):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted > 0 and result.failed == 0


def test_tiled_window_round_trips_through_strings_and_presets():
    from diffattn import SlidingWindow
    from diffattn.patterns.spec import parse_pattern
    from diffattn.presets import PatternConfig

    sta = SlidingWindow.tiled(tile=(6, 8, 8), window_tiles=(3, 3, 3))
    assert parse_pattern("window:18x24x24,stride=6x8x8,tile=6x8x8") == sta
    assert parse_pattern("window:18x24x24,stride=6x8x8,tile=true") == sta
    assert parse_pattern("window:18x24x24,stride=6x8x8,tile=false").tile is None
    config = PatternConfig.from_pattern(sta)
    assert config.build() == sta
    options = {k: v for k, v in config.to_dict().items() if k != "kind"}
    assert PatternConfig("window", options).build() == sta  # as read back from YAML
    assert "tile" not in PatternConfig.from_pattern(SlidingWindow((3, 9, 9))).options
