"""Let ``qat_rep.callbacks`` come from the same checkout as ``qat_rep`` when that checkout is not the installed one.

``pip install -e .`` maps ``qat_rep.callbacks`` to the top-level ``callbacks/`` folder of the checkout it was run in.
A second checkout used through ``PYTHONPATH=<checkout>`` gets its own ``qat_rep`` but the installed checkout's
``callbacks`` (which then refuses to import). ``tests/conftest.py`` installs :class:`CheckoutCallbacks` in the test
process and, for the interpreters tests start, puts this folder on ``PYTHONPATH`` so Python imports this file at
start-up (``sitecustomize``). By hand: ``PYTHONPATH=$PWD:$PWD/tests/devpath python recipes/qat_b0.py --help``.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class CheckoutCallbacks(importlib.abc.MetaPathFinder):
    """Finds ``qat_rep.callbacks`` in ``ROOT/callbacks`` when the imported ``qat_rep`` is ``ROOT/qat_rep``."""

    def find_spec(self, fullname: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "qat_rep.callbacks":
            return None
        package = sys.modules.get("qat_rep")
        if package is None or Path(package.__file__).resolve().parent != ROOT / "qat_rep":
            return None
        init = ROOT / "callbacks" / "__init__.py"
        return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[str(init.parent)])


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once)."""
    if not any(type(f).__name__ == CheckoutCallbacks.__name__ for f in sys.meta_path):
        sys.meta_path.insert(0, CheckoutCallbacks())


install()
