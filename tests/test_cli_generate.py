"""``diffattn generate`` on the embedded tiny Wan pipeline, small sizes, CPU."""

import json

import numpy as np
import pytest

from diffattn.cli import main
from diffattn.video import read_video

SMALL = ["--size", "64x64", "--frames", "9", "--steps", "3", "--no-progress"]  # token grid 3x4x4


def run(argv, capsys):
    code = main(["generate", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_video_mp4_gif_and_json(tmp_path, capsys):
    out = tmp_path / "clip" / "fox.mp4"
    code, stdout, _ = run([*SMALL, "--method", "window:3x3x3", "--dense-steps", "1", "--seed", "3",
                           "--prompt", "a fox", "--out", str(out), str(out.with_suffix(".gif"))], capsys)
    assert code == 0
    frames = read_video(out)
    assert frames.shape == (9, 64, 64, 3)
    assert read_video(out.with_suffix(".gif")).shape[1:] == (64, 64, 3)
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["prompt"] == "a fox" and record["seed"] == 3
    assert record["model"]["embedded"] and "coloured shapes" in record["note"] and "coloured shapes" in stdout
    assert record["model"]["random_weights"] is False
    assert record["method"]["pattern"] == "window:3x3x3"
    assert record["method"]["schedule"] == {"dense_steps": 1, "dense_layers": 0, "dense_last_steps": 0}
    assert record["token_grid"] == [3, 4, 4] and record["seq_len"] == 48
    assert 0 < record["attended_fraction"] < record["effective_attended_fraction"] < 1  # step 0 is dense
    assert record["settings"]["num_inference_steps"] == 3 and record["frames"] == 9
    timings = record["timings_s"]
    assert timings["generate"] > 0 and len(timings["steps"]) == 3 and timings["self_attention"] > 0
    assert record["cache"]["enabled"] is False and record["cache"]["memory_bytes"] == 0
    assert {"diffattn", "torch", "diffusers"} <= set(record["versions"])
    assert set(record["outputs"]) == {"mp4", "gif"}


def test_one_frame_writes_png(tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "still.png"
    code, _, _ = run(["--size", "64x48", "--frames", "1", "--steps", "2", "--method", "radial:0.2", "--no-progress",
                      "--out", str(out)], capsys)
    assert code == 0
    with Image.open(out) as image:
        assert image.size == (64, 48)
    record = json.loads((tmp_path / "still.json").read_text())
    assert record["frames"] == 1 and record["token_grid"] == [1, 3, 4] and record["fps"] is None


def test_prompts_file_gives_one_output_each(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\n# a comment\na dog on a beach\n")
    folder = tmp_path / "many"
    code, _, _ = run([*SMALL, "--method", "dense", "--prompts", str(prompts), "--out", str(folder)], capsys)
    assert code == 0
    records = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    assert [r["prompt"] for r in records] == ["a cat", "a dog on a beach"]
    assert sorted(p.name for p in folder.glob("*.mp4")) == ["001-a-cat.mp4", "002-a-dog-on-a-beach.mp4"]
    assert (folder / "001-a-cat-frames.png").is_file()
    a, b = (read_video(folder / f"{name}.mp4") for name in ("001-a-cat", "002-a-dog-on-a-beach"))
    assert a.shape == b.shape == (9, 64, 64, 3) and not np.array_equal(a, b)  # the prompt matters
    assert records[0]["method"]["pattern"] == "dense" and records[0]["attended_fraction"] == 1.0


def test_several_prompts_number_file_outputs(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\ntwo\n")
    code, _, _ = run(["--size", "64x64", "--frames", "1", "--steps", "1", "--no-progress", "--prompts", str(prompts),
                      "--out", str(tmp_path / "img.png")], capsys)
    assert code == 0
    assert sorted(p.name for p in tmp_path.glob("img-*")) == ["img-001.json", "img-001.png", "img-002.json",
                                                                "img-002.png"]


@pytest.mark.parametrize("argv, words", [
    (["--steps", "-1"], "--steps"),
    (["--steps", "abc"], "--steps"),
    (["--frames", "0"], "--frames"),
    (["--dense-steps", "-2"], "--dense-steps"),
    (["--method", "blobs"], "unknown method 'blobs'"),
    (["--method", "window:3x5x5"], "does not fit the token grid 3x4x4"),  # 64x64x9 -> 3x4x4 tokens
    (["--prompt", "a", "--prompts", "PROMPTS"], "not both"),
    (["--prompts", "MISSING"], "no file"),
    (["--preset", "no-such-preset"], "preset"),
    (["--cache"], "needs a sparse method"),
    (["--method", "window:1x3x3", "--cache", "refresh_every=0"], "refresh_every"),
    (["--method", "window:1x3x3", "--cache", "bogus=1"], "unknown cache option"),
    (["--height", "64"], "--size"),  # --size and --height together
    (["--frames", "8"], "4k + 1"),
    (["--out", "OUT.avi"], ".avi"),
    (["--model", "MISSING"], "cannot load model"),
])
def test_bad_arguments_fail_cleanly(argv, words, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    substitutions = {"PROMPTS": str(prompts), "MISSING": str(tmp_path / "missing"), "OUT.avi": str(tmp_path / "o.avi")}
    argv = [substitutions.get(a, a) for a in argv]
    out_args = [] if "--out" in argv else ["--out", str(tmp_path / "out")]
    try:
        code = main(["generate", *SMALL, *argv, *out_args])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "error" in err[0] and words in err[0], err
    assert "Traceback" not in err[0]
    assert not list(tmp_path.glob("out/*"))


def test_local_model_folder(tmp_path, capsys):
    """--model with a saved pipeline folder: the real from_pretrained path (not the embedded label)."""
    from diffattn.pipelines import save_embedded_wan_pipeline

    folder = save_embedded_wan_pipeline(tmp_path / "model")
    capsys.readouterr()
    out = tmp_path / "local.mp4"
    code, _, _ = run([*SMALL, "--model", str(folder), "--method", "window:1x3x3", "--out", str(out)], capsys)
    assert code == 0
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["note"] is None and record["model"]["embedded"] is False and record["model"]["model"] == str(folder)
    assert read_video(out).shape == (9, 64, 64, 3) and record["token_grid"] == [3, 4, 4]


def test_preset_method_on_embedded_model(tmp_path, capsys):
    pytest.importorskip("diffattn.presets")
    out = tmp_path / "p.mp4"
    code, _, _ = run([*SMALL, "--preset", "wan-radial", "--model", "embedded", "--dense-steps", "1", "--out", str(out)],
                     capsys)
    assert code == 0
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["preset"] == "wan-radial" and record["method"]["pattern"] == "radial:0.2"
    # the preset's schedule (12 dense steps, 1 dense layer), with --dense-steps overriding
    assert record["method"]["schedule"] == {"dense_steps": 1, "dense_layers": 1, "dense_last_steps": 0}
    assert record["settings"]["height"] == 64  # the preset's 480x832 is for its real model
