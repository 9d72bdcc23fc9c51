"""The README's Python examples that run on a CPU without a checkpoint are run as written.

Blocks that need a GPU (``cuda``), a hub checkpoint (``from_pretrained``), torchrun
(``init_distributed``) or names defined elsewhere (fragments that do not start with an import)
are skipped; ``>>>`` blocks run as doctests.
"""

from __future__ import annotations

import doctest
import re
import runpy
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
NEEDS_MORE = ("cuda", "from_pretrained", "init_distributed", "load_pipeline(")


def runnable(block: str) -> bool:
    first = block.lstrip().splitlines()[0]
    return first.startswith((">>>", "import ", "from ")) and not any(word in block for word in NEEDS_MORE)


CASES = [(i, block) for i, block in enumerate(BLOCKS) if runnable(block)]


def test_the_readme_has_runnable_examples():
    assert len(CASES) >= 4


@pytest.mark.parametrize("index, block", CASES, ids=[f"block{i}" for i, _ in CASES])
def test_readme_example_runs(index, block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    if block.lstrip().startswith(">>>"):
        test = doctest.DocTestParser().get_doctest(block, {}, f"README block {index}", str(README), 0)
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        runner.run(test)
        assert runner.summarize(verbose=False).failed == 0
        return
    script = tmp_path / f"readme_block_{index}.py"
    script.write_text(block)
    runpy.run_path(str(script), run_name="__main__")
