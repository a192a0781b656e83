"""Activation quantizers that must share one scale, found from the model's own dataflow and tied into one object.

An INT8 runtime such as TensorRT keeps a tensor quantized across a ``Concat`` or an ``Add`` only when every input
and the output use one scale; where they differ it inserts a re-quantization, and the engine no longer computes what
the fake-quant model trained. The same holds for two convs reading one feature map. :func:`share_input_scales`
traces one real call of the model, groups the input quantizers whose tensors are joined that way, and ties each
group to a single quantizer object, so calibration picks one ``amax`` over all of its inputs and QAT keeps it one
value. :func:`tie_quantizers` re-applies known groups (a resumed fit, a rebuilt model).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn

from .backend import TensorQuantizer
from .insert import is_prepared, quantizers
from .observe import observe

# Ops whose inputs and output must keep one scale: concatenation and addition (a runtime moves the consumer's
# quantize above a Concat and wants both operands of an Add on one grid), and ops that commute with a per-tensor
# quantizer (ReLU, max-pool, copies). Names as ``__torch_function__`` sees them (functions and Tensor methods).
_SCALE_LINKS = frozenset({
    "cat", "concat", "concatenate", "add", "add_", "__add__", "__radd__", "__iadd__",
    "relu", "relu_", "max_pool2d", "_max_pool2d", "max_pool2d_with_indices", "contiguous", "clone",
})

_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")


class _Dataflow(torch.overrides.TorchFunctionMode):
    """Union-find over the ids of tensors that a scale-linking op joins (joined tensors are kept alive, so an id
    is never reused while the trace runs)."""

    def __init__(self) -> None:
        super().__init__()
        self.parent: dict[int, int] = {}
        self.keep: list[torch.Tensor] = []

    def find(self, i: int) -> int:
        while self.parent.setdefault(i, i) != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.keep += [a, b]
        self.parent[self.find(id(a))] = self.find(id(b))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", "") in _SCALE_LINKS and isinstance(out, torch.Tensor):
            for arg in args:
                for t in (arg if isinstance(arg, (list, tuple)) else (arg,)):
                    if isinstance(t, torch.Tensor) and t.is_floating_point():
                        self.union(t, out)
        return out


@contextlib.contextmanager
def _traced_call(model: nn.Module) -> Iterator[None]:
    """Quantizers bypassed, every module hook suspended (a recorder or distiller must not see the trace), eval mode
    and no autograd; each module's training flag, each quantizer's state and every hook are restored after."""
    modules = list(model.modules())
    hooks = [{k: getattr(m, k) for k in _HOOK_DICTS if hasattr(m, k)} for m in modules]
    modes = [m.training for m in modules]
    qs = [q for _, q in quantizers(model)]
    disabled = [q._disabled for q in qs]
    try:
        for m, saved in zip(modules, hooks):
            for k, v in saved.items():
                setattr(m, k, type(v)())
        for q in qs:
            q.disable()
        model.eval()
        with torch.no_grad():
            yield
    finally:
        for m, saved, mode in zip(modules, hooks, modes):
            for k, v in saved.items():
                setattr(m, k, v)
            m.training = mode
        for q, off in zip(qs, disabled):
            q.disable() if off else q.enable()


def _named_quantizers(model: nn.Module, role: str | None = None) -> list[tuple[str, TensorQuantizer]]:
    """Like :func:`~qat_rep.quant.insert.quantizers`, but a tied quantizer is listed under each of its names."""
    return [(n, m) for n, m in model.named_modules(remove_duplicate=False)
            if isinstance(m, TensorQuantizer) and (role is None or getattr(m, "qat_rep_role", None) == role)]


def _owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(quantizer) → every (parent, attribute) slot that holds it."""
    out: dict[int, list[tuple[nn.Module, str]]] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        for attr, child in m._modules.items():
            if isinstance(child, TensorQuantizer):
                out.setdefault(id(child), []).append((m, attr))
    return out


def share_input_scales(model: nn.Module, *args: Any, **kwargs: Any) -> list[tuple[str, ...]]:
    """Tie the activation quantizers that must agree; returns the tied groups as tuples of quantizer names.

    Two input quantizers must share a scale when they quantize one tensor (a feature map read by several convs) or
    tensors joined by a ``Concat``/``Add`` (through ReLUs, max-pools and copies). The dataflow comes from one call
    ``model(*args, **kwargs)`` — the model's real call, keywords included — run without autograd, in eval mode,
    with quantizers bypassed and module hooks suspended; afterwards the model is as it was (training flags, hooks,
    quantizer state). Then :func:`tie_quantizers` ties the groups. State-dict keys do not change (a tied quantizer
    appears under each of its names), so checkpoints still load into an untied model. Call after ``prepare`` and
    before calibration; a second call returns the same groups and changes nothing.
    """
    if not is_prepared(model):
        raise ValueError("model is not prepared for quantization; call qat_rep.quant.prepare(model, config) first")
    inputs = _named_quantizers(model, "input")
    seen: list[tuple[str, int]] = []
    flow = _Dataflow()

    def record(name: str, _module: nn.Module, hook_args: tuple, _output: None) -> None:
        flow.keep.append(hook_args[0])
        seen.append((name, id(hook_args[0])))

    with _traced_call(model), observe(dict(inputs), record, outputs=False), flow:
        model(*args, **kwargs)
    groups: dict[int, list[str]] = {}
    for name, tid in seen:
        members = groups.setdefault(flow.find(tid), [])
        if name not in members:
            members.append(name)
    return tie_quantizers(model, [g for g in groups.values() if len(g) > 1])


def tie_quantizers(model: nn.Module, groups: Iterable[Sequence[str]]) -> list[tuple[str, ...]]:
    """Make every quantizer of each group (names from :func:`share_input_scales`) the group's first one.

    Quantizers of different bit widths cannot share a scale: such a group is tied per bit width, with a warning
    naming it (the runtime re-quantizes there). Returns the groups as tied. ``ValueError`` for a name that is not a
    quantizer of ``model``.
    """
    by_name = dict(_named_quantizers(model))
    owners = _owners(model)
    tied = []
    for group in groups:
        missing = [n for n in group if n not in by_name]
        if missing:
            raise ValueError(f"no quantizer named {missing[0]!r} in {type(model).__name__}: the shared-scale groups "
                             "belong to another architecture or QuantConfig")
        by_bits: dict[int, list[str]] = {}
        for n in group:
            by_bits.setdefault(int(by_name[n].num_bits), []).append(n)
        if len(by_bits) > 1:
            warnings.warn(f"activation quantizers {', '.join(group)} should share one scale but use "
                          f"{sorted(by_bits)} bits; each bit width gets its own scale (a runtime re-quantizes "
                          "there). Give them one a_bits (QuantConfig.first_last_8bit or skip) to avoid it",
                          UserWarning, stacklevel=2)
        for names in by_bits.values():
            lead = by_name[names[0]]
            for n in names[1:]:
                for parent, attr in owners.get(id(by_name[n]), []):
                    setattr(parent, attr, lead)
            if len(names) > 1:
                tied.append(tuple(names))
    return tied
