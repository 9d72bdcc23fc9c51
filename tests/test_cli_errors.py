"""Command-line errors found by trying the CLI as a new user: each is refused in one line before
any model work, or warned about and recorded; a failing record field never costs the output."""

import json

import pytest

import diffattn
from diffattn import parse_pattern
from diffattn.cli import main

SMALL = ["--size", "64x64", "--frames", "9", "--steps", "2", "--no-progress"]  # token grid 3x4x4


def run_cli(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in lines[0], err
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.mark.parametrize("spec, words", [
    ("window:3x5x5,,", "empty entry"),
    ("window:,3x5x5", "empty entry"),
    ("window:stride=1,3x5x5", "must come before"),
    ("window:3x5x5,stride=1,stride=2", "given twice"),
    ("window:3x5x5,=2", "needs a key and a value"),
    ("window:3x5x5,stride=", "needs a key and a value"),
    ("radial:0.2,block=64.5", "whole number"),
    ("piecewise:0.25,order=0.5", "whole number"),
    ("topk:block=16", "needs a density or a cdf"),
    ("topk:", "nothing after ':'"),
    ("blobs:1", "unknown pattern 'blobs'"),
])
def test_bad_pattern_specs(spec, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(")):
        parse_pattern(spec)


def test_piecewise_errors_name_piecewise():
    with pytest.raises(ValueError, match="Piecewise density"):
        diffattn.Piecewise(2.0)
    with pytest.raises(ValueError, match="Piecewise block"):
        diffattn.Piecewise(0.5, block=48)


@pytest.mark.parametrize("command", ["generate", "compare"])
def test_bad_options_of_a_known_method_do_not_say_unknown(command, tmp_path, capsys):
    flag = "--method" if command == "generate" else "--methods"
    code, _, err = run_cli([command, *SMALL, flag, "window:3x5x5,,", "--out", str(tmp_path / "o")], capsys)
    assert code == 2
    one_error_line(err, "method 'window:3x5x5,,'", "empty entry")
    assert "unknown method" not in err


@pytest.mark.parametrize("command, out", [
    ("generate", "/proc/diffattn-test/x.mp4"),
    ("generate", "FILE/x.mp4"),
    ("compare", "FILE/report"),
    ("demo", "FILE/demo"),
    ("show", "FILE/layout.png"),
])
def test_unwritable_outputs_are_refused_before_any_model_work(command, out, tmp_path, capsys, monkeypatch):
    import diffattn.generate as generate

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(generate, "load_target", no_loading)
    monkeypatch.setattr("diffattn.pipelines.build_embedded_wan_pipeline", no_loading)
    (tmp_path / "file").write_text("not a folder")
    out = out.replace("FILE", str(tmp_path / "file"))
    argv = {"generate": ["generate", *SMALL, "--out", out], "compare": ["compare", *SMALL, "--out", out],
            "demo": ["demo", "--steps", "1", "--out", out],
            "show": ["show", "window:3x5x5", "--grid", "4x8x8", "--out", out]}[command]
    code, _, err = run_cli(argv, capsys)
    assert code == 2
    one_error_line(err, "--out", "cannot write")


@pytest.mark.parametrize("name", ["x.txt", "x", "x.jpeg"])
def test_show_refuses_unknown_picture_types(name, tmp_path, capsys):
    code, _, err = run_cli(["show", "window:3x5x5", "--grid", "4x8x8", "--out", str(tmp_path / name)], capsys)
    assert code == 2
    one_error_line(err, "--out", ".png")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("suffix", [".png", ".svg"])
def test_show_writes_pictures(suffix, tmp_path, capsys):
    out = tmp_path / "sub" / f"layout{suffix}"
    code, stdout, _ = run_cli(["show", "window:3x5x5", "--grid", "4x8x8", "--no-progress", "--out", str(out)], capsys)
    assert code == 0 and out.stat().st_size > 0 and "wrote" in stdout


@pytest.mark.parametrize("argv, reason", [
    (["--method", "window:1x3x3", "--dense-steps", "5"], "dense_steps=5 >= the 2 denoising steps"),
    (["--method", "window:1x3x3", "--dense-steps", "1", "--dense-last-steps", "1"], "dense_last_steps=1"),
    (["--method", "radial:0.2", "--dense-layers", "4"], "dense_layers=4 covers all 4 transformer blocks"),
])
def test_a_schedule_that_makes_the_run_dense_is_warned_and_recorded(argv, reason, tmp_path, capsys):
    out = tmp_path / "x.mp4"
    code, stdout, _ = run_cli(["generate", *SMALL, *argv, "--out", str(out)], capsys)
    assert code == 0
    assert "warning" in stdout and "runs dense everywhere" in stdout and reason in stdout
    record = json.loads(out.with_suffix(".json").read_text())
    assert reason in record["method"]["all_dense"]
    assert record["effective_attended_fraction"] == 1.0


def test_a_dense_schedule_is_warned_in_compare_and_demo(tmp_path, capsys):
    code, stdout, _ = run_cli(["compare", *SMALL, "--no-warmup", "--methods", "window:1x3x3", "--dense-steps", "2",
                               "--out", str(tmp_path / "r")], capsys)
    assert code == 0 and "runs dense everywhere" in stdout
    row = json.loads((tmp_path / "r" / "compare.json").read_text())["methods"][0]
    assert "dense_steps=2" in row["all_dense"]
    code, stdout, _ = run_cli(["demo", "--steps", "2", "--no-progress", "--out", str(tmp_path / "d")], capsys)
    assert code == 0 and "runs dense everywhere" in stdout  # the demo's 2 dense steps cover a 2-step run
    assert "dense_steps=2" in json.loads((tmp_path / "d" / "demo.json").read_text())["all_dense"]


def test_a_failing_record_field_still_writes_the_outputs(tmp_path, capsys, monkeypatch):
    import diffattn.generate as generate

    def broken(*args, **kwargs):
        raise RuntimeError("record field failed")

    monkeypatch.setattr(generate, "layout_record", broken)
    out = tmp_path / "x.mp4"
    code, stdout, _ = run_cli(["generate", *SMALL, "--method", "window:1x3x3", "--out", str(out)], capsys)
    assert code == 0 and out.stat().st_size > 0
    assert "warning: could not record layout" in stdout
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["record_errors"] == {"layout": "RuntimeError: record field failed"}
    assert record["timings_s"]["generate"] > 0 and record["method"]["pattern"] == "window:1x3x3"


def test_demo_accepts_no_progress(tmp_path, capsys):
    code, _, err = run_cli(["demo", "--steps", "1", "--dense-steps", "0", "--no-progress", "--out",
                            str(tmp_path / "d")], capsys)
    assert code == 0, err
    assert "it/s" not in err  # no progress bar
