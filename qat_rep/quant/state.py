"""Checks and switches on a prepared model's quantizer state: is this saved state ours, and the float view of it.

* :func:`config_mismatch` / :func:`check_same_config` — a saved ``QuantConfig`` dict against the current one;
* :func:`check_incoming_state` — a state dict about to be loaded into a prepared model: quantizer keys and shapes
  that differ mean another ``QuantConfig`` (or another form of the model), said plainly instead of a size mismatch;
* :func:`quantizers_disabled` — every quantizer off inside a ``with`` block (the FP32-equivalent network), always
  restored.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

from torch import Tensor, nn

from .config import QuantConfig
from .insert import quantizers

__all__ = ["config_mismatch", "check_same_config", "check_incoming_state", "is_quant_key", "quantizers_disabled"]


def config_mismatch(saved: Mapping[str, Any], current: QuantConfig) -> dict[str, tuple[Any, Any]]:
    """Fields where a saved ``QuantConfig`` dict differs from ``current``: name → (saved, current)."""
    now = current.to_dict()
    keys = sorted(set(saved) | set(now))
    return {k: (saved.get(k), now.get(k)) for k in keys if saved.get(k) != now.get(k)}


def check_same_config(saved: Mapping[str, Any], current: QuantConfig, where: str) -> None:
    """Raise ``ValueError`` naming every differing field when ``saved`` is not ``current``."""
    diff = config_mismatch(saved, current)
    if diff:
        shown = ", ".join(f"{k}: checkpoint {a!r} vs callback {b!r}" for k, (a, b) in diff.items())
        raise ValueError(
            f"{where} was saved with a different QuantConfig ({shown}). Build the callback with the checkpoint's "
            "config — RepQATCallback(config=QuantConfig.from_dict(checkpoint['callbacks']['RepQATCallback']"
            "['config'])) — or start a new QAT run without ckpt_path"
        )


def is_quant_key(key: str) -> bool:
    """A state-dict key that belongs to a quantizer (``..._quantizer.*`` or a rep block's ``rep_quant``)."""
    return "_quantizer." in key or ".rep_quant." in key or key.startswith("rep_quant.")


def check_incoming_state(module: nn.Module, state_dict: Mapping[str, Any], prefix: str = "") -> None:
    """Refuse a QAT state dict whose quantizer keys or shapes differ from ``module``'s (a float one passes).

    Usable as a ``load_state_dict`` pre-hook body: ``prefix`` is the module's prefix in ``state_dict``.
    """
    own = {k: v for k, v in module.state_dict().items() if is_quant_key(k)}
    theirs = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix) and is_quant_key(k)}
    if not theirs:
        return  # a float state dict (e.g. pretrained weights): not a QAT checkpoint
    missing = sorted(set(own) - set(theirs))
    extra = sorted(set(theirs) - set(own))
    shapes = sorted(k for k in set(own) & set(theirs)
                    if isinstance(theirs[k], Tensor) and tuple(theirs[k].shape) != tuple(own[k].shape))
    if missing or extra or shapes:
        detail = "; ".join(f"{what}: {keys[:3]}{' …' if len(keys) > 3 else ''}"
                           for what, keys in (("missing", missing), ("unexpected", extra),
                                              ("different shape", shapes)) if keys)
        raise ValueError(
            "the checkpoint was saved with a different QuantConfig: its quantizer state does not match this "
            f"model's ({detail}); or it holds another form of the model (e.g. converted for deployment). "
            "Build RepQATCallback with the checkpoint's config: QuantConfig.from_dict("
            "torch.load(path, weights_only=True)['callbacks']['RepQATCallback']['config'])"
        )


@contextlib.contextmanager
def quantizers_disabled(model: nn.Module) -> Iterator[None]:
    """Disable every qat_rep quantizer of ``model`` inside the block; their previous state is always restored."""
    qs = [q for _, q in quantizers(model)]
    previous = [q._disabled for q in qs]
    for q in qs:
        q.disable()
    try:
        yield
    finally:
        for q, was_disabled in zip(qs, previous):
            if not was_disabled:
                q.enable()
