"""How the user's own steps call the model: forward hooks (with kwargs) that record real calls.

:class:`RepQATCallback <qat_rep.callbacks.RepQATCallback>` never guesses a model call from a batch. It watches the
LightningModule and every submodule that holds all of its quantized layers (a backbone called twice per step by a
siamese module, a network built in ``configure_model``); while a batch is being recorded, each call of a watched
module is kept as a :class:`~qat_rep.export.ModelCall` (a detached CPU copy of its positional and keyword
arguments). The fit-end export traces one of those calls and the ONNX Runtime check replays them.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from qat_rep.export import ModelCall
from qat_rep.quant import quant_layers

from .distill import find_submodule

__all__ = ["CallRecorder", "export_candidates", "is_redirected_call"]


def is_redirected_call(module: nn.Module) -> bool:
    """True inside the call Lightning's DDP makes to run ``training_step``/``validation_step`` through the module's
    ``__call__`` with ``forward`` temporarily replaced on the instance: it carries (batch, batch_idx), not a model
    call; the real call inside the step comes with the class's own ``forward`` again."""
    patched = module.__dict__.get("forward")
    return patched is not None and getattr(patched, "__func__", None) is not type(module).forward


def export_candidates(pl_module: nn.Module) -> list[tuple[str, nn.Module]]:
    """``pl_module`` and each submodule holding every quantized layer, outermost first."""
    layers = {id(m) for _, m in quant_layers(pl_module)}
    return [(n, m) for n, m in pl_module.named_modules()
            if not n or (layers and layers <= {id(x) for x in m.modules()})]


class CallRecorder:
    """Records the calls of watched modules during the batches between :meth:`start` and :meth:`stop`.

    ``calls[name]`` holds the recorded calls of module ``name`` (up to ``max_batches`` batches per recording);
    ``last[name]`` the raw ``(args, kwargs, output)`` of its latest call in the current batch (not copied).
    """

    def __init__(self) -> None:
        self.calls: dict[str, list[ModelCall]] = {}
        self.source = "training"  # which loop's batches ``calls`` come from
        self.last: dict[str, tuple[tuple, dict, Any]] = {}
        self._handles: list[Any] = []
        self._batches = 0
        self._max_batches = 0
        self._on = False
        self._redirected: dict[str, list[bool]] = {}

    def watch(self, modules: list[tuple[str, nn.Module]]) -> None:
        self.detach()
        for name, module in modules:
            self._handles.append(module.register_forward_pre_hook(self._pre_hook(name)))
            self._handles.append(module.register_forward_hook(self._hook(name), with_kwargs=True))

    def watch_model(self, pl_module: nn.Module, student: str, export_module: str) -> None:
        """Watch :func:`export_candidates`, the distillation ``student`` and an explicit ``export_module``."""
        watched = dict(export_candidates(pl_module))
        watched[student] = find_submodule(pl_module, student, "student module (DistillConfig.student)")
        if export_module != "auto":
            watched[export_module] = find_submodule(pl_module, export_module, "export_module")
        self.watch(list(watched.items()))

    def export_target(self, pl_module: nn.Module, export_module: str) -> tuple[nn.Module, list[ModelCall]]:
        """The module to export and its recorded calls: ``export_module`` unless ``"auto"``, else the called
        candidate built by ``qat_rep.create_model`` (it has a ``qat_rep_spec``), else the outermost called one."""
        if export_module != "auto":
            return pl_module.get_submodule(export_module), self.calls.get(export_module, [])
        called = [(n, m) for n, m in export_candidates(pl_module) if self.calls.get(n)]
        registered = [(n, m) for n, m in called if isinstance(getattr(m, "qat_rep_spec", None), dict)]
        name, module = (registered or called or [("", pl_module)])[0]
        return module, self.calls.get(name, [])

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def reset(self, max_batches: int, source: str) -> None:
        """Forget the recorded calls; keep those of the next ``max_batches`` batches of ``source``'s loop."""
        self.calls, self._batches, self._max_batches, self.source = {}, 0, max_batches, source

    def start(self) -> None:
        self._on = True
        self.last = {}
        self._redirected = {}  # a call that raised never popped its entry

    def stop(self) -> None:
        if self._on:
            self._batches += 1
        self._on = False
        self.last = {}

    def _pre_hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            self._redirected.setdefault(name, []).append(is_redirected_call(module))
        return hook

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            stack = self._redirected.get(name)
            if (stack.pop() if stack else False) or not self._on:
                return
            self.last[name] = (args, kwargs, output)
            if self._batches < self._max_batches:
                self.calls.setdefault(name, []).append(ModelCall.capture(args, kwargs))
        return hook
