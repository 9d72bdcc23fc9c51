"""The launch commands work from the repository root (issue #12, item 6).

``python -m`` (and ``torchrun ... -m``, ``python -c``, a REPL) puts the current directory first on
``sys.path``; from the root, the top-level ``kernels/`` folder (installed as ``diffattn.kernels``)
then shadowed the PyPI ``kernels`` package that transformers imports (``cannot import name
'CUDAProperties' from 'kernels'``). Every command here is a subprocess whose working directory is
the repository root.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

import diffattn

ROOT = Path(__file__).resolve().parent.parent
# `python -m` from the root imports diffattn from the source tree there: its kernels and pipelines
# resolve only when that tree is the installed one (pip install -e .).
EDITABLE_HERE = Path(diffattn.__file__).resolve().parent.parent == ROOT
TINY = ["generate", "--size", "64x64", "--frames", "1", "--steps", "1", "--seed", "1", "--no-progress"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
BIN = Path(sys.executable).parent


def _kernels_installed() -> bool:
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


# The code path of the original ImportError: transformers' hub-kernels integration does
# `from kernels import CUDAProperties` when the `kernels` distribution is installed.
IMPORTS = """
import diffattn, diffusers, transformers, transformers.models.auto, transformers.modeling_utils
import kernels, diffattn.kernels
from transformers.integrations.hub_kernels import CUDAProperties
assert hasattr(diffattn.kernels, "block_sparse_attention")
print("kernels:", kernels.__file__)
"""


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}  # that would hide the problem
    env.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", PATH=os.pathsep.join([str(BIN), env.get("PATH", "")]))
    return env


def _run_together(commands: dict[str, list[str]], timeout: float = 300) -> dict[str, tuple[int, str]]:
    """Start every command at once (each is mostly interpreter start-up and imports), then wait."""
    procs = {name: subprocess.Popen(args, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True) for name, args in commands.items()}
    results = {}
    for name, proc in procs.items():
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out = proc.communicate()[0] + "\n[timed out]"
        results[name] = (proc.returncode, out)
    return results


def test_launch_commands_from_the_repository_root(tmp_path):
    """``python -m diffattn --help``; ``python -m diffattn.cli generate`` and the documented
    ``torchrun --no-python diffattn generate`` (a 1-step 64x64 image of the embedded pipeline);
    ``python -c`` importing transformers' hub-kernels path."""
    commands = {"python -m diffattn --help": [sys.executable, "-m", "diffattn", "--help"]}
    if _kernels_installed():
        commands["python -c (transformers' hub kernels)"] = [sys.executable, "-c", IMPORTS]
    outputs = {}
    if EDITABLE_HERE:  # else `python -m` from the root cannot find diffattn.pipelines: use the `diffattn` command
        # (`torchrun -m diffattn.cli` starts `python -u -m diffattn.cli` in the same directory: the
        # first command covers it; the second is the documented, directory-independent form)
        generate = {"python -m diffattn.cli generate": [sys.executable, "-m", "diffattn.cli"]}
        if shutil.which("diffattn", path=str(BIN)):
            generate["torchrun --no-python diffattn generate"] = [*TORCHRUN, "--no-python", "diffattn"]
        else:
            generate["torchrun -m diffattn generate"] = [*TORCHRUN, "-m", "diffattn"]
        for i, (name, prefix) in enumerate(generate.items()):
            outputs[name] = tmp_path / f"{i}.png"
            commands[name] = [*prefix, *TINY, "--out", str(outputs[name])]

    results = _run_together(commands)
    failures = [f"--- {name} (exit {code}):\n{out[-2500:]}" for name, (code, out) in results.items()
                if code != 0 or (name in outputs and not outputs[name].is_file())]
    assert not failures, "\n".join(failures)
    assert results["python -m diffattn --help"][1].startswith("usage: diffattn ")
    if "python -c (transformers' hub kernels)" in results:
        found = Path(results["python -c (transformers' hub kernels)"][1].split("kernels: ", 1)[1].split()[0])
        assert found.resolve() != (ROOT / "kernels" / "__init__.py"), "'kernels' is still diffattn's folder"


def test_our_kernels_never_run_as_the_top_level_kernels():
    """With no installed ``kernels`` to defer to (``-S``: no site-packages), importing the name from
    the root fails and says why, instead of running diffattn's kernels under another package's name."""
    proc = subprocess.run([sys.executable, "-S", "-c", "import kernels"], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr and "diffattn's kernels folder" in proc.stderr, proc.stderr[-2000:]
    assert "import it as 'diffattn.kernels'" in proc.stderr
