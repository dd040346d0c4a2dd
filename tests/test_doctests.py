"""Every docstring example of the package runs and prints what it shows (doctests).

Each public module's examples run in a fresh namespace with ``ELLIPSIS`` and
``NORMALIZE_WHITESPACE``, on the CPU, one torch thread (as in the documentation).
"""

import doctest
import importlib
import pkgutil

import pytest
import torch

import skdattri

MODULES = sorted(
    info.name for info in pkgutil.walk_packages(skdattri.__path__, prefix="skdattri.")
    if info.name != "skdattri.__main__"
)


def _has_examples(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    return any(t.examples for t in finder.find(module, module=module))


@pytest.mark.parametrize("name", [m for m in MODULES if _has_examples(m)])
def test_docstring_examples(name):
    module = importlib.import_module(name)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS
                                 | doctest.NORMALIZE_WHITESPACE, report=True, verbose=False)
    finally:
        torch.set_num_threads(threads)
    assert result.attempted > 0
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"


def test_the_doctest_collection_is_not_empty():
    assert len([m for m in MODULES if _has_examples(m)]) >= 20
