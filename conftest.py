"""Fixtures for the package's docstring examples, which pytest collects from ``ncis_core/``
(``testpaths`` and ``--doctest-modules`` in pyproject.toml). The suite's own fixtures are in
``tests/conftest.py``. Not part of the package (only ``ncis_core*`` is)."""

import os
import sys

import pytest
from _pytest.doctest import DoctestItem


@pytest.fixture(autouse=True)
def _doctest_isolation(request):
    """Every docstring example on one intra-op thread (as ``tests/conftest.py``'s ``one_thread``:
    tiny tensors, and a first forward pass on two busy cores took 5 s with a thread team, 0.3 s
    without), and nothing it changes leaks into the next: torch's thread count (a stage may set
    it), the working directory (``ncis_core.notebook.start`` moves to the project folder) and open
    matplotlib figures are put back."""
    if not isinstance(request.node, DoctestItem):
        yield
        return
    import torch

    threads, cwd = torch.get_num_threads(), os.getcwd()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        os.chdir(cwd)
        if "matplotlib.pyplot" in sys.modules:
            sys.modules["matplotlib.pyplot"].close("all")
