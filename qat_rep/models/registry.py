"""A name → constructor registry for model families, in the style of timm's ``@register_model``."""

from __future__ import annotations

import difflib
from typing import Any, Callable

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn`` under its function name. Names are unique."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is registered twice")
    _MODELS[name] = fn
    return fn


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, sorted; ``pattern`` is an ``fnmatch`` glob (e.g. ``"qarepvgg_*"``)."""
    import fnmatch

    names = sorted(_MODELS)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    """The constructor registered under ``name``; a clear error lists valid names otherwise."""
    try:
        return _MODELS[name]
    except KeyError:
        close = difflib.get_close_matches(name, _MODELS, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Valid names: {', '.join(list_models())}") from None


def create_model(name: str, num_classes: int = 1000, small_input: bool = False, **kwargs: Any) -> nn.Module:
    """Build a registered model: ``create_model("qarepvgg_a0", num_classes=10, small_input=True)``.

    ``small_input=True`` makes the first layer stride 1 (for 32×32 images). Extra keyword arguments go to the
    family's constructor (e.g. ``deploy=True``, ``use_se=True``, or ``block=`` for EfficientRep). The returned model
    remembers how it was built in ``model.qat_rep_spec`` so artifacts can rebuild it.
    """
    fn = model_entrypoint(name)
    model = fn(num_classes=num_classes, small_input=small_input, **kwargs)
    model.qat_rep_spec = {"name": name, "num_classes": num_classes, "small_input": small_input, **kwargs}
    return model
