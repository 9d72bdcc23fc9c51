"""The examples in the library's docstrings run and print what they say."""

import doctest
import importlib

import pytest

MODULES = [
    "diffattn",
    "diffattn.tokens",
    "diffattn.attention",
    "diffattn.reference",
    "diffattn.patterns.base",
    "diffattn.patterns.dense",
    "diffattn.patterns.window",
    "diffattn.patterns.spec",
    "diffattn.patterns.radial",
    "diffattn.block_layout",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(module, name) if t.examples]
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples in {name} failed"
