"""The loaders a Trainer holds, and reading them without disturbing training's random stream."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Mapping, Sequence
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor

__all__ = ["first_loader", "isolated_rng"]


def first_loader(loaders: Any) -> Any:
    """The first loader of what Lightning holds (one loader, a list or a dict of them); ``None`` for none."""
    if isinstance(loaders, Mapping):
        return next(iter(loaders.values()), None)
    if isinstance(loaders, (list, tuple)) and not loaders:
        return None
    if isinstance(loaders, Sequence) and not isinstance(loaders[0], Tensor) and \
            all(hasattr(x, "__iter__") for x in loaders):
        return loaders[0]
    return loaders


@contextlib.contextmanager
def isolated_rng() -> Iterator[None]:
    """Restore the torch (CPU and CUDA), Python and NumPy RNG states on exit: reading extra batches must not shift
    the random stream of training (a resumed run, which skips that reading, must see the same stream)."""
    torch_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        random.setstate(py_state)
        np.random.set_state(np_state)
