"""The two Lightning flavors, found once.

``pytorch_lightning`` and ``lightning.pytorch`` ship the same code under two package names, with *distinct*
``Callback`` classes: a Trainer of one flavor only accepts callbacks that are instances of its own ``Callback``.
:class:`qat_rep.callbacks.RepQATCallback` derives from the ``Callback`` of every flavor that is installed, so the
same object works with either Trainer — no flavor-specific import for the user. At least one flavor must be present.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


def _try_import(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


#: flavor package name → its ``pytorch`` module (``pytorch_lightning`` or ``lightning.pytorch``), installed ones only
FLAVORS: dict[str, ModuleType] = {
    name: mod
    for name, mod in (("pytorch_lightning", _try_import("pytorch_lightning")),
                      ("lightning.pytorch", _try_import("lightning.pytorch")))
    if mod is not None
}

if not FLAVORS:  # pragma: no cover - the package depends on pytorch-lightning
    raise ImportError(
        "qat_rep.callbacks needs PyTorch Lightning: pip install pytorch-lightning (or lightning)"
    )

#: the ``Callback`` base class of every installed flavor, ``pytorch_lightning`` first
CALLBACK_BASES: tuple[type, ...] = tuple(mod.Callback for mod in FLAVORS.values())


def is_instance_of_any(obj: Any, attr_path: str) -> bool:
    """``isinstance(obj, <flavor>.<attr_path>)`` for any installed flavor, e.g. ``"callbacks.ModelPruning"``."""
    for mod in FLAVORS.values():
        target: Any = mod
        for part in attr_path.split("."):
            target = getattr(target, part, None)
            if target is None:
                break
        if isinstance(target, type) and isinstance(obj, target):
            return True
    return False

