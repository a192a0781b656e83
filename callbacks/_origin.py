"""Refuses a ``qat_rep.callbacks`` from another checkout than ``qat_rep`` (imported first by the package).

An editable install maps ``qat_rep.callbacks`` to the ``callbacks/`` folder of the checkout it was made in, while
``qat_rep`` itself may come from another checkout that is first on ``sys.path`` (``PYTHONPATH=<checkout>``). Mixed,
the two halves fail in ways that do not say why; this says why.
"""

from __future__ import annotations

from pathlib import Path

import qat_rep

HERE = Path(__file__).resolve().parent
CORE = Path(qat_rep.__file__).resolve().parent

# A wheel holds qat_rep/callbacks; a source checkout holds <root>/qat_rep and <root>/callbacks side by side.
if HERE.parent not in (CORE, CORE.parent):
    raise ImportError(f"qat_rep.callbacks was found in {HERE} but qat_rep in {CORE}: two different checkouts. Run "
                      f"`pip install -e .` in the checkout you use, or see tests/devpath/sitecustomize.py.")
