"""``diffattn compare`` on the embedded tiny Wan pipeline, small sizes, CPU."""

import json
import math
import types

import numpy as np
import pytest

from diffattn.cli import main

SMALL = ["--size", "64x64", "--frames", "9", "--steps", "3", "--no-progress"]  # token grid 3x4x4, 4 layers


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compare")
    code = main(["compare", *SMALL, "--methods", "window:1x3x3", "dense", "radial:0.2", "--seed", "1",
                 "--out", str(folder)])
    assert code == 0
    return folder, json.loads((folder / "compare.json").read_text())


def test_report_files(report):
    folder, record = report
    for name in ("report.md", "report.html", "speed_quality.png", "compare.json", "frames-dense.png", "dense.mp4"):
        assert (folder / name).stat().st_size > 0, name
    with open(folder / "speed_quality.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    md = (folder / "report.md").read_text()
    html = (folder / "report.html").read_text()
    window = record["methods"][0]
    assert "PSNR" in md and "SSIM" in md and f"{window['psnr_db']:.2f}" in md and f"{window['ssim']:.4f}" in md
    assert "coloured shapes" in md and "speed_quality.png" in md
    assert "<table>" in html and "frames-dense.png" in html and window["files"]["frames_png"] in html
    for row in record["methods"]:
        for key in ("frames_png", "diff_png"):
            assert (folder / row["files"][key]).is_file()
    assert len({row["files"]["frames_png"] for row in record["methods"]} | {"frames-dense.png"}) == 4  # no clashes


def test_compare_json(report):
    _, record = report
    assert record["seed"] == 1 and record["token_grid"] == [3, 4, 4] and record["model"]["embedded"]
    assert [m["label"] for m in record["methods"]] == ["window:1x3x3", "dense", "radial:0.2"]
    assert record["dense"]["time_s"] > 0
    window = record["methods"][0]
    assert window["attended_fraction"] == pytest.approx(9 / 48)
    assert window["time_s"] > 0 and window["speedup"] == pytest.approx(record["dense"]["time_s"] / window["time_s"])
    assert math.isfinite(window["psnr_db"]) and window["psnr_db"] > 0 and 0 < window["ssim"] < 1
    attn = window["attention_error"]
    assert attn["step"] == 1 and len(attn["per_layer"]) == 4  # the middle step, every self-attention layer
    assert 0 < attn["rel_l1_mean"] < 2 and 0 < attn["cosine_mean"] < 1
    assert record["attention_probe"]["layers_measured"] == 4


def test_dense_against_dense_is_identical(report):
    _, record = report
    dense = record["methods"][1]
    assert dense["psnr_db"] is None and dense["frames_identical"] is True  # infinite PSNR, written as null
    assert dense["ssim"] == 1.0
    assert dense["attention_error"]["rel_l1_mean"] == 0.0 and dense["attention_error"]["cosine_mean"] == pytest.approx(1.0)


def test_metrics():
    from diffattn.metrics import psnr, relative_l1, ssim

    rng = np.random.default_rng(0)
    a = rng.random((3, 16, 16, 3))
    assert psnr(a, a) == math.inf and ssim(a, a) == 1.0
    b = np.clip(a + 0.01, 0, 1)
    assert 35 < psnr(b, a) < 45 and 0.9 < ssim(b, a) < 1
    assert psnr((a * 255).astype(np.uint8), (a * 255).astype(np.uint8)) == math.inf
    assert relative_l1(np.array([1.0, -1.0]), np.array([2.0, -2.0])) == pytest.approx(0.5)


def test_preset_as_method(tmp_path):
    pytest.importorskip("diffattn.presets")
    code = main(["compare", *SMALL, "--methods", "wan-radial", "--model", "embedded", "--no-warmup",
                 "--out", str(tmp_path)])
    assert code == 0
    row = json.loads((tmp_path / "compare.json").read_text())["methods"][0]
    assert row["label"] == "wan-radial" and row["pattern"] == "radial:0.2"
    assert row["schedule"]["dense_layers"] == 1  # the preset's schedule
    assert row["attention_error"]["per_layer"][0]["schedule_dense"] is True


@pytest.mark.parametrize("argv, words", [
    (["--methods", "blobs"], "unknown method 'blobs'"),
    (["--methods", "window:3x5x5"], "does not fit the token grid 3x4x4"),
    (["--steps", "0"], "--steps"),
    (["--attn-step", "3"], "--attn-step"),
    (["--repeats", "0"], "--repeats"),
    (["--preset", "no-such-preset"], "preset"),
    (["--cache", "refresh_every=0"], "refresh_every"),
    (["--methods", "dense", "--cache"], "--cache needs a sparse method"),
    (["--methods", "window:1x3x3", "piecewise:0.5", "--cache"], "Piecewise"),
])
def test_bad_arguments_fail_cleanly(argv, words, tmp_path, capsys):
    try:
        code = main(["compare", *SMALL, *argv, "--out", str(tmp_path / "report")])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "error" in err[0] and words in err[0], err
    assert not (tmp_path / "report").exists()


@pytest.fixture(scope="module")
def cached_report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compare-cache")
    code = main(["compare", *SMALL, "--methods", "window:1x3x3", "dense", "--seed", "1", "--no-warmup",
                 "--cache", "refresh_every=2", "--random-weights", "--out", str(folder)])
    assert code == 0
    return folder, json.loads((folder / "compare.json").read_text())


def test_compare_with_cache(cached_report, report):
    folder, record = cached_report
    cache = record["cache"]
    assert cache["enabled"] and cache["config"]["refresh_every"] == 2 and cache["memory_bytes"] > 0
    window, dense = record["methods"]
    assert window["cache"]["enabled"] and window["cache"]["memory_bytes"] == cache["memory_bytes"]
    assert dense["cache"] == {"enabled": False, "memory_bytes": 0}  # dense attention runs without the cache
    attn = window["attention_error"]
    assert attn["step"] == 1 and attn["cache_reference_step"] == 0 and record["attention_probe"]["cache_reference_step"] == 0
    assert all("rel_l1_cached" in layer for layer in attn["per_layer"]) and len(attn["per_layer"]) == 4
    assert 0 < attn["rel_l1_cached_mean"] < attn["rel_l1_mean"]  # the reused external part recovers most of it
    assert "rel_l1_cached_mean" not in dense["attention_error"] or dense["attention_error"]["rel_l1_cached_mean"] is None
    uncached = report[1]["methods"][0]
    assert window["psnr_db"] > uncached["psnr_db"]  # closer to dense than the plain window
    md = (folder / "report.md").read_text()
    assert "attn rel L1 with cache" in md and "refresh_every=2" in md
    assert "attn rel L1 with cache" not in (report[0] / "report.md").read_text()


def _probe_state(step, layout):
    return types.SimpleNamespace(step=step, num_steps=3, layout=layout)


@pytest.mark.parametrize("refresh_every", [1, 2])
def test_probe_cached_error_reuses_the_reference_step(refresh_every):
    """The cached error merges the internal partial of the probe step with the external partial
    of step ``probe - (refresh_every - 1)``: exact dense attention when that is the same step."""
    import torch

    import diffattn
    from diffattn import Dense, SlidingWindow, StepCache, TokenLayout
    from diffattn.compare import AttentionProbe
    from diffattn.generate import resolve_method
    from diffattn.metrics import attention_errors
    from diffattn.partials import attention_partials, merge_partials

    layout = TokenLayout((3, 4, 4))
    gen = torch.Generator().manual_seed(0)
    steps = [[torch.randn(1, layout.seq_len, 2, 16, generator=gen) for _ in range(3)] for _ in range(3)]
    probe = AttentionProbe([resolve_method("window:1x3x3")], step=2, impl="reference",
                           cache=StepCache(refresh_every=refresh_every))
    for step, (q, k, v) in enumerate(steps):
        for _ in range(2):  # the second call of a step (the other CFG branch) is not measured
            probe.measure("attn", 0, _probe_state(step, layout), q, k, v, None, False)
    assert probe.reference_step == 3 - refresh_every and not probe.externals  # consumed
    (entry,) = probe.layers
    cached = entry["errors_cached"]["window:1x3x3"]
    q, k, v = steps[2]
    dense = diffattn.attention(q, k, v, Dense(), layout=layout, impl="reference")
    if refresh_every == 1:
        assert cached["rel_l1"] < 1e-5 and cached["cosine"] == pytest.approx(1.0, abs=1e-6)
    else:
        window = SlidingWindow((1, 3, 3))
        o_in, l_in, _, _ = attention_partials(q, k, v, window, layout=layout, impl="reference")
        _, _, o_ex, l_ex = attention_partials(*steps[1], window, layout=layout, impl="reference")
        expected = attention_errors(merge_partials(o_in, l_in, o_ex, l_ex)[0].float(), dense.float())
        assert cached["rel_l1"] == pytest.approx(expected["rel_l1"], rel=1e-5) and cached["rel_l1"] > 1e-3
    summary = probe.summary(probe.methods[0])
    assert summary["rel_l1_cached_mean"] == pytest.approx(cached["rel_l1"])
