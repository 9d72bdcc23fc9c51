"""Every method family from every CLI entry point that runs it: generate, compare and demo, with and
without the step cache, on the embedded pipeline at a small size (token grid 3x8x8 = 192 tokens,
so the 16-token blocks of the dynamic patterns give 12 blocks). Each run must exit 0, write its
files and a JSON whose numbers are finite; a combination that cannot run must be refused in one
line before any generation."""

import json
import math

import pytest

from diffattn.cli import main

SMALL = ["--size", "128x128", "--frames", "9", "--steps", "2", "--no-progress"]  # token grid 3x8x8

METHODS = {
    "dense": "dense",
    "window": "window:3x5x5",
    "tiled-window": "window:3x4x4,stride=1x4x4,tile=true",
    "radial": "radial:0.2",
    "topk-density": "topk:0.25,block=16",
    "topk-cdf": "topk:cdf=0.9,block=16",
    "piecewise-order0": "piecewise:0.25,block=16,order=0",
    "piecewise-pooled": "piecewise:0.25,block=16",
    "piecewise-shared": "piecewise:0.25,block=16,first_order=shared",
    "piecewise-exact": "piecewise:0.25,block=16,first_order=exact",
    "piecewise-lowrank": "piecewise:0.25,block=16,first_order=lowrank",
}
#: The step cache reuses the keys a pattern leaves out: dense has none, Piecewise approximates them all.
NO_CACHE = {"dense", "piecewise-order0", "piecewise-pooled", "piecewise-shared", "piecewise-exact",
            "piecewise-lowrank"}


def numbers(value, path="$"):
    """Every number in a JSON value, with its path."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from numbers(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from numbers(v, f"{path}[{i}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield path, value


def assert_finite_json(path):
    text = path.read_text()
    record = json.loads(text, parse_constant=lambda c: pytest.fail(f"{path}: {c} in the JSON"))
    bad = [(p, v) for p, v in numbers(record) if not math.isfinite(v)]
    assert not bad, bad
    return record


def run_cli(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("cache", [False, True], ids=["no-cache", "cache"])
@pytest.mark.parametrize("name", list(METHODS))
def test_generate(name, cache, tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    argv = ["generate", *SMALL, "--method", METHODS[name], "--out", str(out), str(out.with_suffix(".gif"))]
    if cache:
        argv += ["--cache", "refresh_every=2"]
    code, stdout, err = run_cli(argv, capsys)
    if cache and name in NO_CACHE:
        assert code == 2 and len(err.strip().splitlines()) == 1 and "cache" in err, err
        assert not list(tmp_path.iterdir())
        return
    assert code == 0, err
    assert out.stat().st_size > 0 and out.with_suffix(".gif").stat().st_size > 0
    record = assert_finite_json(out.with_suffix(".json"))
    assert record["token_grid"] == [3, 8, 8] and record["frames"] == 9
    assert record["timings_s"]["generate"] > 0 and "record_errors" not in record
    assert record["cache"]["enabled"] is cache
    assert record["method"]["all_dense"] is None
    if name.startswith(("topk", "piecewise")):
        assert record["attended_fraction"] is None  # chosen from the data at each call
    else:
        assert 0 < record["attended_fraction"] <= 1


@pytest.mark.parametrize("cache", [False, True], ids=["no-cache", "cache"])
def test_compare_every_method(cache, tmp_path, capsys):
    names = [n for n in METHODS if n != "dense" and not (cache and n in NO_CACHE)]
    argv = ["compare", *SMALL, "--no-warmup", "--out", str(tmp_path / "report"),
            "--methods", *(METHODS[n] for n in names)]
    if cache:
        argv += ["--cache", "refresh_every=2"]
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    record = assert_finite_json(tmp_path / "report" / "compare.json")
    assert [m["label"] for m in record["methods"]] == [METHODS[n] for n in names]
    for row in record["methods"]:
        assert row["time_s"] > 0 and 0 <= row["ssim"] <= 1 and "record_errors" not in row
        assert row["psnr_db"] is not None or row["frames_identical"]
        assert row["attention_error"]["rel_l1_mean"] is not None
        assert row["cache"]["enabled"] is cache
        for kind in ("mp4", "png"):
            assert any(str(v).endswith(f".{kind}") for v in row["files"].values()), row["files"]
    for name in ("report.md", "report.html", "speed_quality.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0


def test_compare_refuses_the_cache_for_piecewise(tmp_path, capsys):
    code, _, err = run_cli(["compare", *SMALL, "--out", str(tmp_path / "r"), "--cache",
                            "--methods", METHODS["window"], METHODS["piecewise-pooled"]], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Piecewise" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("name", list(METHODS))
def test_demo(name, tmp_path, capsys):
    out = tmp_path / "demo"
    code, _, err = run_cli(["demo", "--pattern", METHODS[name], "--steps", "2", "--dense-steps", "1",
                            "--no-progress", "--out", str(out)], capsys)
    assert code == 0, err
    for file in ("demo.mp4", "demo.gif", "demo-frames.png"):
        assert (out / file).stat().st_size > 0
    record = assert_finite_json(out / "demo.json")
    assert record["all_dense"] is None and "record_errors" not in record
