"""benchmarks/step_cache_bench.py on a tiny shape under TRITON_INTERPRET=1 (its logic, not its timings)."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from diffattn import Radial, SlidingWindow, TokenLayout

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the kernels on CPU")


def load_bench():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "step_cache_bench.py"
    spec = importlib.util.spec_from_file_location("step_cache_bench", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_bench_case_records_and_checks():
    bench = load_bench()
    case = bench.Case("tiny", TokenLayout((2, 4, 8), text_len=5, text_first=False), 1,
                      {"window": SlidingWindow((1, 3, 3)), "radial": Radial(0.5, block=32)}, head_dim=16)
    calls = []

    def timer(fn):  # runs each measured function once; the "time" is just the call's index
        fn()
        calls.append(1)
        return float(len(calls))

    rows = bench.run_case(case, ["window", "radial"], timer, device="cpu", dtype=torch.float32, log=lambda *_: None)
    assert [r["name"] for r in rows] == ["window", "radial"]
    for row in rows:
        assert set(row["ms"]) == {"sparse", "reuse", "merge", "merge_torch", "partials_one_pass", "partials_two_passes",
                                  "refresh_one_pass", "refresh_two_passes", "dense_sdpa"}
        assert row["check"]["merged_one_pass_vs_sdpa_rel_l2"] < 1e-5
        assert row["seq_len"] == 69 and 0 < row["attended_fraction"] <= row["computed_fraction"] <= 1


def test_bench_needs_cuda(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert load_bench().main(["--out", str(tmp_path / "x.json")]) == 2
    assert "CUDA" in capsys.readouterr().err and not (tmp_path / "x.json").exists()
