"""Shared fixtures and markers of the test suite.

- ``one_thread``: torch runs on one intra-op thread for the module that uses it.
- ``device``: ``"cpu"``, and ``"cuda"`` marked ``cuda``.
- markers (``pyproject.toml``): ``slow`` — subprocess, DDP, recipe, packaging and training runs;
  ``python -m pytest -q -m "not slow"`` is the fast inner loop. ``cuda`` — the GPU path, skipped with a reason
  where no GPU is present; ``python -m pytest -q -m cuda`` runs it on a GPU machine.

Helper functions (``randomize_bn``, ``tiny_rep_net``, ``calib_batches``, ``PicklePayload``) are in ``helpers.py``.
``recipes/`` and ``benchmarks/`` are on ``sys.path`` for the tests that import a script's module, as they are for the
scripts themselves; ``qat_rep.callbacks`` comes from this checkout even beside an install of another one.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))  # helpers, reference_impl
sys.path.insert(0, str(TESTS / "scripts"))  # the LightningModules of the callback tests
sys.path.insert(0, str(ROOT / "recipes"))  # recipe_common, recipe_ptq and the recipes, as a recipe script sees them
sys.path.insert(0, str(ROOT / "benchmarks"))  # common and the benchmarks, likewise


def _callbacks_from_this_checkout() -> None:
    """``qat_rep.callbacks`` from this checkout even when another checkout is the installed one (``tests/devpath``):
    here through a finder, in the interpreters tests start through ``PYTHONPATH``. A no-op where this checkout is
    the installed one."""
    import qat_rep

    spec = importlib.util.find_spec("qat_rep.callbacks")
    if Path(qat_rep.__file__).resolve().parent != ROOT / "qat_rep" or (
        spec is not None and Path(spec.origin).resolve() == ROOT / "callbacks" / "__init__.py"
    ):
        return
    devpath = TESTS / "devpath"
    loader_spec = importlib.util.spec_from_file_location("qat_rep_devpath", devpath / "sitecustomize.py")
    module = importlib.util.module_from_spec(loader_spec)
    loader_spec.loader.exec_module(module)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(devpath), os.environ.get("PYTHONPATH")) if p)


_callbacks_from_this_checkout()

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
