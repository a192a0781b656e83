"""Watching layer activations during a forward pass: the one recorder behind KL calibration histograms, PTQ
reconstruction targets, the activation-range check of PTQ, the layer report and input-scale sharing.

:func:`observe` installs forward hooks on named modules and removes them on exit (also when the forward raises);
:func:`run_in_eval` feeds batches through a model in evaluation mode and restores its training mode. What each
caller does with an activation — accumulate a histogram, keep a copy, measure an error — is its ``fn``.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any, Callable, Iterable, Iterator, Mapping

from torch import nn

#: ``fn(name, module, args, output)``: ``args`` are the module's positional inputs; ``output`` is ``None`` for an
#: input observer (called before the module runs)
ObserveFn = Callable[[str, nn.Module, tuple, Any], None]


@contextlib.contextmanager
def observe(modules: Mapping[str, nn.Module], fn: ObserveFn, *, outputs: bool = True) -> Iterator[None]:
    """Call ``fn(name, module, args, output)`` after every call of each module in ``modules`` (``outputs=False``:
    ``fn(name, module, args, None)`` before it, so ``args`` are what the module receives), while the context is
    open. ``fn`` may raise to stop the forward pass; the hooks are removed either way."""
    handles = []

    def after(name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            fn(name, module, args, output)
        return hook

    def before(name: str):
        def hook(module: nn.Module, args: tuple) -> None:  # returns None: the module's inputs are left as they are
            fn(name, module, args, None)
        return hook

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(after(name)) if outputs
                           else module.register_forward_pre_hook(before(name)))
        yield
    finally:
        for h in handles:
            h.remove()


def run_in_eval(model: nn.Module, batches: Iterable[Any], forward: Callable[[nn.Module, Any], Any],
                max_batches: int | None = None) -> int:
    """``forward(model, batch)`` for each of (at most ``max_batches``) ``batches`` with ``model`` in evaluation mode,
    its training mode restored afterwards; returns the number of batches run."""
    was_training = model.training
    model.eval()
    n = 0
    try:
        for batch in itertools.islice(iter(batches), max_batches):
            forward(model, batch)
            n += 1
    finally:
        model.train(was_training)
    return n
