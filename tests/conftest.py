"""Shared fixtures and markers of the test suite.

- ``one_thread``: torch runs on one intra-op thread for the module that uses it.
- ``device``: ``"cpu"``, and ``"cuda"`` marked ``cuda``.
- markers (``pyproject.toml``): ``slow`` — subprocess, DDP, recipe, packaging and training runs;
  ``python -m pytest -q -m "not slow"`` is the fast inner loop. ``cuda`` — the GPU path, skipped with a reason
  where no GPU is present; ``python -m pytest -q -m cuda`` runs it on a GPU machine.

Helper functions (``randomize_bn``, ``tiny_rep_net``, ``calib_batches``, ``PicklePayload``) are in ``helpers.py``.
"""

from __future__ import annotations

import os
import sys
from typing import Iterator

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # helpers, reference_impl
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))  # the LightningModules of the callback tests

NO_CUDA = "no CUDA device: the GPU path runs with `python -m pytest -q -m cuda` on a machine with one"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without a GPU every test marked ``cuda`` is skipped, saying why."""
    if torch.cuda.is_available():
        return
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(pytest.mark.skip(reason=NO_CUDA))


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module's tests (``pytestmark = pytest.mark.usefixtures("one_thread")``): on two
    shared cores extra threads only oversubscribe them (up to 10× slower under load). Not for every module: a
    thread count changes float summation order, and some tests compare against numbers measured with the default."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request: pytest.FixtureRequest) -> Iterator[torch.device]:
    """Each test taking it runs on the CPU and, marked ``cuda``, on the GPU (skipped with a reason without one).

    On the GPU TF32 is off while the test runs: convolutions and matmuls in full float32, as on the CPU, so the
    tests' float32 tolerances hold on Ampere and newer GPUs too.
    """
    if request.param == "cpu":
        yield torch.device("cpu")
        return
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield torch.device("cuda")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
