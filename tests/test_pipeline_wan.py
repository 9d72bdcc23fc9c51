"""diffattn on a whole (tiny, trained) WanPipeline: schedules, repeatability, the demo."""

import json

import numpy as np
import pytest
import torch

import diffattn
from diffattn import SlidingWindow
from diffattn.pipelines import build_embedded_wan_pipeline

SETTINGS = dict(height=64, width=64, num_frames=9, num_inference_steps=4, guidance_scale=5.0,
                max_sequence_length=16, output_type="np")
PROMPT = "a red fox in the snow"
PATTERN = SlidingWindow((1, 3, 3))  # token grid (3, 4, 4): sparse


@pytest.fixture(scope="module")
def pipe():
    return build_embedded_wan_pipeline(seed=0)


def generate(pipe, seed=0):
    return pipe(PROMPT, generator=torch.Generator().manual_seed(seed), **SETTINGS).frames[0]


def test_dense_steps_schedule(pipe):
    dense = generate(pipe)
    diffattn.apply(pipe, PATTERN, dense_steps=4)
    all_dense_steps = generate(pipe)
    diffattn.apply(pipe, PATTERN)
    sparse = generate(pipe)
    diffattn.apply(pipe, PATTERN, dense_steps=2)
    mixed = generate(pipe)
    mixed_again = generate(pipe)  # state resets: identical calls give identical outputs
    diffattn.remove(pipe)
    after = generate(pipe)
    assert np.array_equal(all_dense_steps, dense)
    assert not np.allclose(sparse, dense, atol=1e-4)
    assert not np.allclose(mixed, dense, atol=1e-4) and not np.allclose(mixed, sparse, atol=1e-4)
    assert np.array_equal(mixed, mixed_again)
    assert np.array_equal(after, dense)


def test_step_index_follows_the_scheduler(pipe):
    handle = diffattn.apply(pipe, PATTERN, dense_steps=1)
    state = handle.states["transformer"]
    seen = []
    pipe(PROMPT, callback_on_step_end=lambda p, i, t, kw: seen.append((state.step, state.num_steps)) or {},
         generator=torch.Generator().manual_seed(0), **SETTINGS)
    assert state.layout is None  # the pipeline resets stateful hooks after each generation
    diffattn.remove(pipe)
    assert seen == [(0, 4), (1, 4), (2, 4), (3, 4)]


def test_dense_last_steps(pipe):
    dense = generate(pipe)
    diffattn.apply(pipe, PATTERN, dense_steps=2, dense_last_steps=2)
    out = generate(pipe)
    diffattn.remove(pipe)
    assert np.array_equal(out, dense)


def test_demo_writes_video_and_json(tmp_path):
    from diffattn.cli import main
    from diffattn.video import read_video

    assert main(["demo", "--out", str(tmp_path), "--steps", "3"]) == 0
    frames = read_video(tmp_path / "demo.mp4")
    assert frames.shape[0] == 17 and frames.shape[1:3] == (256, 256)
    record = json.loads((tmp_path / "demo.json").read_text())
    assert record["pattern"] == "piecewise:0.25" and record["token_grid"] == [5, 16, 16]
    assert record["prompt"] == "a red circle moving right" and record["random_weights"] is False
    assert "coloured shapes" in record["note"] and record["timings_s"]["generate"] > 0
    assert (tmp_path / "demo.gif").stat().st_size > 0 and (tmp_path / "demo-frames.png").stat().st_size > 0


@pytest.mark.parametrize("argv", [["demo", "--steps", "0"], ["demo", "--pattern", "blobs"], ["demo", "--dense-steps", "-1"]])
def test_demo_bad_arguments(argv, tmp_path, capsys):
    from diffattn.cli import main

    assert main(argv + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error" in err[0]
