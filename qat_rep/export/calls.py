"""A recorded call of a module — its positional and keyword arguments — replayable in PyTorch and as ONNX inputs.

The export of a model whose ``forward`` takes more than one tensor (``forward(x, bias, *, scale)``, a dict of
images, ...) cannot be traced from a guessed ``batch[0]``. A :class:`ModelCall` holds one real call, as a forward
hook with ``with_kwargs=True`` sees it, so the export traces exactly that call and the ONNX Runtime check feeds the
same inputs: every tensor in the arguments becomes one named graph input (the parameter name from ``forward``'s
signature; dict entries and sequence items flattened as ``name.key`` / ``name.0``); everything else (``scale=1.0``)
is a constant of the traced graph.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import Tensor, nn

__all__ = ["ModelCall"]


def _flatten(value: Any, name: str) -> Iterator[tuple[str, Tensor]]:
    if isinstance(value, Tensor):
        yield name, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _flatten(v, f"{name}.{k}")
    elif isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            yield from _flatten(v, f"{name}.{i}")


def _rebuild(value: Any, tensors: Iterator[Tensor]) -> Any:
    """``value`` with its tensors replaced, in :func:`_flatten` order, by the next ones of ``tensors``."""
    if isinstance(value, Tensor):
        return next(tensors)
    if isinstance(value, dict):
        return {k: _rebuild(v, tensors) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        items = [_rebuild(v, tensors) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)  # namedtuples too
    return value


def _map_tensors(value: Any, fn: Any) -> Any:
    tensors = [fn(t) for _, t in _flatten(value, "")]
    return _rebuild(value, iter(tensors))


class _Replay(nn.Module):
    """``forward(*tensors)`` rebuilds the recorded call around new tensors and calls ``module`` with it."""

    def __init__(self, module: nn.Module, call: "ModelCall") -> None:
        super().__init__()
        self.module = module
        self._call = call

    def forward(self, *tensors: Tensor) -> Any:
        it = iter(tensors)
        args = _rebuild(self._call.args, it)
        kwargs = _rebuild(self._call.kwargs, it)
        return self.module(*args, **kwargs)


@dataclass(frozen=True)
class ModelCall:
    """One call of a module: ``module(*args, **kwargs)``; tensors anywhere inside tuples, lists and dicts."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def capture(cls, args: tuple[Any, ...], kwargs: dict[str, Any], batch_limit: int | None = None) -> "ModelCall":
        """A detached CPU copy of a call as a forward hook sees it (``batch_limit``: keep only that many rows of
        every tensor whose first axis is the batch axis)."""
        call = cls(tuple(args), dict(kwargs))
        batch = call.batch_size

        def copy(t: Tensor) -> Tensor:
            t = t.detach()
            if batch_limit is not None and batch is not None and t.dim() >= 1 and t.shape[0] == batch:
                t = t[:batch_limit]
            return t.to("cpu", copy=True)

        return cls(_map_tensors(call.args, copy), _map_tensors(call.kwargs, copy))

    @property
    def batch_size(self) -> int | None:
        """The first axis of the first floating-point tensor of rank >= 2 (the batch), ``None`` when there is none."""
        for _, t in self.tensors():
            if t.is_floating_point() and t.dim() >= 2:
                return int(t.shape[0])
        return None

    def tensors(self, module: nn.Module | None = None) -> list[tuple[str, Tensor]]:
        """Every tensor of the call in order, named after ``module.forward``'s parameters when they bind."""
        named: list[tuple[str, Any]] = []
        try:  # the class's forward: an instance-level wrapper (e.g. a strategy's redirection) must not rename inputs
            bound = inspect.signature(type(module).forward).bind(module, *self.args, **self.kwargs) \
                if module is not None else None
        except (TypeError, ValueError):
            bound = None
        if bound is not None:
            for pname, value in list(bound.arguments.items())[1:]:
                kind = bound.signature.parameters[pname].kind
                if kind is inspect.Parameter.VAR_POSITIONAL:
                    named += [(f"{pname}.{i}", v) for i, v in enumerate(value)]
                elif kind is inspect.Parameter.VAR_KEYWORD:
                    named += list(value.items())
                else:
                    named.append((pname, value))
        else:
            named = [(f"input{i}", v) for i, v in enumerate(self.args)] + list(self.kwargs.items())
        out: list[tuple[str, Tensor]] = []
        for name, value in named:
            out += list(_flatten(value, name))
        return out

    def dynamic_axes(self, module: nn.Module) -> dict[str, dict[int, str]]:
        """``{input name: {0: "batch"}}`` for every tensor whose first axis is the batch axis."""
        batch = self.batch_size
        return {n: {0: "batch"} for n, t in self.tensors(module) if batch is not None and t.dim() >= 1
                and t.shape[0] == batch}

    def to(self, device: torch.device | str) -> "ModelCall":
        return ModelCall(_map_tensors(self.args, lambda t: t.to(device)),
                         _map_tensors(self.kwargs, lambda t: t.to(device)))

    def run(self, module: nn.Module) -> Any:
        """``module(*args, **kwargs)`` with the tensors on the module's device."""
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        call = self.to(device)
        return module(*call.args, **call.kwargs)

    def replay_module(self, module: nn.Module) -> nn.Module:
        """A module whose ``forward(*tensors)`` takes this call's tensors flat (what the ONNX graph inputs are)."""
        return _Replay(module, self)
