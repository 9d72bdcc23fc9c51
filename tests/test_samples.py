"""The sample scripts compile, and the CPU one runs."""

import pathlib
import py_compile
import subprocess
import sys

import pytest

SAMPLES = sorted((pathlib.Path(__file__).parent.parent / "samples").glob("*.py"))


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_sample_compiles(path):
    py_compile.compile(str(path), doraise=True)


def test_attention_basics_runs(tmp_path):
    script = pathlib.Path(__file__).parent.parent / "samples" / "attention_basics.py"
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "rel. L1 vs dense" in result.stdout and (tmp_path / "window-layout.png").exists()
