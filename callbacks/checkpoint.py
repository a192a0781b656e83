"""Load a QAT Lightning checkpoint into a fresh process: rebuild the quantizers, then load the weights.

``LightningModule.load_from_checkpoint`` builds the module from its saved hyper-parameters and loads the state dict
strictly; a QAT checkpoint's state dict has quantizer keys (``..._input_quantizer._amax``) that a freshly built
module does not, so it fails (the complaint that sank Lightning 1.x's QAT callback, #6457).
:func:`load_qat_checkpoint` reads the ``QuantConfig`` and schedule position that :class:`RepQATCallback` stored in
the checkpoint and inserts the same quantizers before the weights are loaded — through Lightning's own loader, so
hyper-parameters, ``configure_model`` and the module's ``on_load_checkpoint`` behave exactly as usual.

Checkpoints are read with ``torch.load(..., weights_only=True)`` — tensors and plain containers only, whatever
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says — so a crafted checkpoint cannot run code. :func:`weights_only_errors`
turns PyTorch's refusal into one ``ValueError`` naming the file and the object it held.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
from typing import IO, Any, Iterator, TypeVar

from torch import nn

from qat_rep.quant import QuantConfig, Schedule, apply_schedule, prepare

from .options import STATE_KEY, read_callback_state

__all__ = ["load_qat_checkpoint", "weights_only_errors"]

M = TypeVar("M", bound=nn.Module)


@contextlib.contextmanager
def weights_only_errors(path: Any) -> Iterator[None]:
    """Re-raise PyTorch's ``weights_only=True`` refusal (``pickle.UnpicklingError``) as one ``ValueError``.

    The message names the checkpoint and the object PyTorch refused, and says how to write a checkpoint that loads
    safely (plain hyper-parameters) — it never suggests turning the safe loading off.
    """
    try:
        yield
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"a {found.group(1)!r} object" if found else "an object that is not a tensor or plain container"
        raise ValueError(
            f"checkpoint {str(path)!r} holds {what}, and qat-rep loads checkpoints with weights_only=True "
            "(nothing in a checkpoint may run code); save plain hyper-parameters (numbers, strings, lists, dicts) "
            "in the LightningModule and write the checkpoint again"
        ) from None


def load_qat_checkpoint(module_class: type[M], checkpoint_path: str | os.PathLike[str] | IO[bytes],
                        map_location: Any = None, strict: bool | None = None, **kwargs: Any) -> M:
    """``module_class.load_from_checkpoint(checkpoint_path, ...)`` for a checkpoint written with RepQATCallback.

    Returns a ``module_class`` instance in QAT form (fake-quant, calibrated, rep-block phases as at the last save),
    in the mode ``load_from_checkpoint`` leaves it (call ``.eval()`` for inference). ``kwargs`` override saved hyper-parameters, as in Lightning.
    The file is read with ``weights_only=True`` (no unpickling of arbitrary objects). Raises ``ValueError`` when
    the checkpoint holds no RepQATCallback state or an object other than tensors and plain containers.
    """
    if not isinstance(module_class, type) or not callable(getattr(module_class, "load_from_checkpoint", None)):
        raise TypeError(f"module_class must be a LightningModule subclass, got {module_class!r}")
    found: dict[str, Any] = {}

    class _Loader(module_class):  # type: ignore[valid-type, misc]
        # Runs inside Lightning's loader after __init__/configure_model and before load_state_dict: the only point
        # where the saved config is known and the weights are not loaded yet.
        def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
            state = read_callback_state(checkpoint)
            if state is None or "config" not in state:
                raise ValueError(
                    f"checkpoint has no {STATE_KEY} state (keys of checkpoint['callbacks']: "
                    f"{sorted((checkpoint.get('callbacks') or {}).keys())}); it was not written by a fit with "
                    f"RepQATCallback — load it with {module_class.__name__}.load_from_checkpoint instead"
                )
            prepare(self, QuantConfig.from_dict(state["config"]))
            found.update(state)
            super().on_load_checkpoint(checkpoint)

    _Loader.__name__ = _Loader.__qualname__ = module_class.__name__
    _Loader.__module__ = module_class.__module__
    if "weights_only" in kwargs:
        raise TypeError("load_qat_checkpoint always loads with weights_only=True; remove the weights_only argument")
    with weights_only_errors(checkpoint_path):
        model = _Loader.load_from_checkpoint(checkpoint_path, map_location=map_location, strict=strict,
                                             weights_only=True, **kwargs)
    model.__class__ = module_class  # same layout: the loader subclass only existed for the hook above
    schedule = Schedule.from_dict(found["schedule"]) if found.get("schedule") is not None else Schedule.all_at_once()
    apply_schedule(model, schedule, int(found.get("epoch", 0)), int(found.get("global_step", 0)))
    return model
