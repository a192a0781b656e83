"""Networks built in ``configure_model`` (Lightning 2.x lazy init): surgery right after that hook.

Lightning runs ``setup`` → ``configure_model`` → checkpoint restore → optimizer and DDP setup. A network created in
``configure_model`` does not exist during ``setup``, and no callback hook runs between ``configure_model`` and the
restore, so :func:`run_after_configure_model` shadows the module's ``configure_model`` with an instance attribute
that calls the user's hook and then ``fn``: the quantizers exist before weights load and before the optimizer sees
the parameters. :func:`restore_configure_model` removes the shadow (the class method is untouched throughout).
"""

from __future__ import annotations

import functools
from typing import Callable

from torch import nn

__all__ = ["defines_configure_model", "run_after_configure_model", "restore_configure_model"]


def defines_configure_model(module: nn.Module) -> bool:
    """True when a user class in ``module``'s MRO (not Lightning's own) defines ``configure_model``."""
    return any("configure_model" in vars(c) for c in type(module).__mro__
               if not c.__module__.startswith(("lightning", "pytorch_lightning")))


def run_after_configure_model(module: nn.Module, fn: Callable[[], None]) -> None:
    """Make Lightning's next ``module.configure_model()`` call run ``fn()`` after the user's hook (once set)."""
    if "configure_model" in vars(module):
        return
    user_hook = module.configure_model

    @functools.wraps(user_hook)
    def configure_model() -> None:
        user_hook()
        fn()

    module.configure_model = configure_model  # an instance attribute (not a submodule): shadows the method


def restore_configure_model(module: nn.Module) -> None:
    vars(module).pop("configure_model", None)
