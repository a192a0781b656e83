"""Shared activation scales for the callback: tied at the first real model call of the fit, kept across resumes.

:func:`qat_rep.quant.share_input_scales` needs one real call of the model, and the callback never guesses a call
from a batch: :class:`SharedScales` arms a one-shot forward pre-hook (with keywords) on the modules that hold the
quantized layers, and the user's own first training step (or the first ``calib_forward`` call) supplies it. The
tie happens before any quantizer observes data, so calibration chooses one ``amax`` per group; the groups (names
relative to the LightningModule) go into the callback's checkpoint state and are tied again on resume.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from torch import nn

from qat_rep.quant import share_input_scales, tie_quantizers

from .loaders import isolated_rng
from .recording import is_redirected_call

__all__ = ["SharedScales"]


class _Traced(Exception):
    """Stops a call once its dataflow was traced (the call only served the trace)."""


class SharedScales:
    """The tied groups (``None`` until traced) and the one-shot hooks that trace them."""

    def __init__(self) -> None:
        self.groups: list[list[str]] | None = None
        self._handles: list[Any] = []

    def arm(self, modules: list[tuple[str, nn.Module]], then: Callable[[], None] | None = None) -> None:
        """Trace and tie at the first real call of any of ``modules`` (named within the LightningModule), then run
        ``then()`` — still before the call itself runs."""
        self.disarm()
        for name, module in modules:
            self._handles.append(module.register_forward_pre_hook(
                functools.partial(self._first_call, name, then), with_kwargs=True))

    def tie_by_calling(self, modules: list[tuple[str, nn.Module]], call: Callable[[], Any]) -> None:
        """Trace and tie from the first model call that ``call()`` makes; the rest of ``call()`` does not run."""
        def stop() -> None:
            raise _Traced
        if not modules:
            return
        self.arm(modules, stop)
        try:
            call()
        except _Traced:
            pass
        finally:
            self.disarm()

    def restore(self, pl_module: nn.Module) -> None:
        """Tie the groups of a checkpoint (or of an earlier fit) again; a no-op when already tied or none."""
        if self.groups:
            tie_quantizers(pl_module, self.groups)

    def disarm(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _first_call(self, name: str, then: Callable[[], None] | None, module: nn.Module, args: tuple,
                    kwargs: dict) -> None:
        if is_redirected_call(module):
            return
        self.disarm()
        prefix = f"{name}." if name else ""
        with isolated_rng():
            self.groups = [[prefix + n for n in g] for g in share_input_scales(module, *args, **kwargs)]
        if then is not None:
            then()
