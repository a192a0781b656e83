"""Everything the end of a QAT run writes, in one call: :func:`deploy`.

``deploy(model, out_dir, example_inputs, loader)`` writes into ``out_dir`` exactly these files and nothing else:

* ``model.safetensors`` + ``qat_rep.json`` — the deploy checkpoint (:func:`~qat_rep.export.save_quantized`). A
  model qat_rep cannot rebuild by name (no ``qat_rep_spec``: any user network) is saved in the same format with
  its class recorded instead of a registry name. The directory is replaced atomically, so an earlier run's ONNX file
  and check never sit beside new weights;
* ``model_int8.onnx`` — the QDQ ONNX file (W8A8 only; opset-13 QuantizeLinear carries 8-bit integers), traced with
  ``example_inputs`` (a tensor or a recorded :class:`~qat_rep.export.calls.ModelCall`: every tensor argument
  becomes a named graph input);
* ``onnx_verify.json`` — the file run in ONNX Runtime next to the PyTorch model on ``verify_batches`` items of
  ``loader`` (batches or recorded calls; ``example_inputs`` alone without a loader).

The checkpoint is written first and its errors raise; the ONNX export and the check run after it, and their
failures are returned as :attr:`DeployReport.problems` (and warned about): a finished training keeps its weights.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from torch import Tensor, nn

from ..quant import get_config
from .artifact import META_FILE, WEIGHTS_FILE, save_quantized
from .atomic import write_text_atomic
from .calls import ModelCall
from .onnx_export import TARGETS, export_onnx
from .verify import VerifyResult, verify_onnx

__all__ = ["deploy", "DeployReport", "ONNX_FILE", "VERIFY_FILE", "MIN_AGREEMENT"]

#: the QDQ ONNX file and its ONNX Runtime check, beside the deploy checkpoint
ONNX_FILE = "model_int8.onnx"
VERIFY_FILE = "onnx_verify.json"
#: below this top-1 agreement between ONNX Runtime and PyTorch the check fails (the file runs another network)
MIN_AGREEMENT = 0.995


@dataclass(frozen=True)
class DeployReport:
    """What :func:`deploy` wrote and measured."""

    out_dir: Path
    rebuildable: bool  # qat_rep.load_quantized can rebuild the model (it has a registry name)
    onnx_path: Path | None
    onnx_layout: str | None
    verify: VerifyResult | None
    problems: tuple[str, ...] = ()
    note: str | None = None  # why no ONNX file was written when that is expected (sub-8-bit config)

    def metrics(self) -> dict[str, float]:
        """The check as numbers for a logger: ``onnx_agreement`` (classifiers) and ``onnx_max_diff_steps``."""
        if self.verify is None:
            return {}
        out = {"onnx_max_diff_steps": self.verify.max_diff_steps}
        if self.verify.agreement is not None:
            out["onnx_agreement"] = self.verify.agreement
        return out

    def table(self, title: str = "INT8 artifacts") -> "Table":  # noqa: F821
        """The report as a two-column rich table."""
        from rich.table import Table

        table = Table(title=title, show_header=False)
        for name, value in self.rows():
            table.add_row(name, value)
        return table

    def rows(self) -> list[tuple[str, str]]:
        """``(item, value)`` rows for a report table."""
        rows = [("deploy checkpoint", f"{self.out_dir / WEIGHTS_FILE} + {META_FILE}"
                 + ("" if self.rebuildable else " (user class: load into your own model)")),
                ("QDQ ONNX", f"{self.onnx_path} ({self.onnx_layout} layout)" if self.onnx_path
                 else f"not written{f' ({self.note})' if self.note else ''}")]
        if self.verify is not None:
            rows += self.verify.rows()
        rows += [("problem", p) for p in self.problems]
        return rows


def _as_call(example_inputs: Tensor | ModelCall | tuple) -> Tensor | ModelCall:
    if isinstance(example_inputs, (Tensor, ModelCall)):
        return example_inputs
    if isinstance(example_inputs, tuple):
        return ModelCall(example_inputs)
    raise TypeError("example_inputs must be a tensor, a tuple of positional arguments or a qat_rep.export.calls."
                    f"ModelCall (args and kwargs), got {type(example_inputs).__name__}")


def _input_shape(example: Tensor | ModelCall) -> tuple[int, ...] | None:
    """The 4-D image shape (one sample) recorded in ``qat_rep.json`` when the model takes a single image."""
    first = example if isinstance(example, Tensor) else next((t for _, t in example.tensors()), None)
    if isinstance(example, ModelCall) and len(example.tensors()) != 1:
        return None
    return (1, *first.shape[1:]) if first is not None and first.dim() == 4 else None


def verify_failure(result: VerifyResult) -> str | None:
    """Why the ONNX Runtime check failed (agreement, ties on constant outputs, the logit bound), or ``None``."""
    if result.ok:
        return None
    return (f"the ONNX Runtime check on {result.samples} samples failed: {' '.join(result.failures)} The ONNX file "
            f"may not run the network that was trained; see {VERIFY_FILE}")


def deploy(model: nn.Module, out_dir: str | Path, example_inputs: Tensor | ModelCall | tuple,
           loader: Iterable[Any] | None = None, onnx: str | None = "onnxruntime", verify_batches: int = 8,
           source: str = "given") -> DeployReport:
    """Write the deploy checkpoint, the QDQ ONNX file and its ONNX Runtime check of ``model`` into ``out_dir``.

    ``model`` is a calibrated QAT (or converted) model; it is not modified. ``onnx``: the QDQ layout
    (``"onnxruntime"`` or ``"tensorrt"``) or ``None`` for no ONNX file; ``verify_batches=0`` skips the check.
    ``source`` names the data of ``loader`` in the check's JSON (e.g. ``"validation"``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if onnx is not None and onnx not in TARGETS:
        raise ValueError(f"onnx must be one of {', '.join(map(repr, TARGETS))} or None, got {onnx!r}")
    if isinstance(verify_batches, bool) or not isinstance(verify_batches, int) or verify_batches < 0:
        raise ValueError(f"verify_batches must be an integer >= 0 (0: no ONNX Runtime check), got {verify_batches!r}")
    example = _as_call(example_inputs)
    out_dir = Path(out_dir)
    rebuildable = isinstance(getattr(model, "qat_rep_spec", None), dict)
    save_quantized(model, out_dir, input_shape=_input_shape(example), allow_unregistered=True)
    problems: list[str] = []
    note = None
    config = get_config(model)
    if onnx is not None and (config.w_bits, config.a_bits) != (8, 8):
        note = (f"W{config.w_bits}A{config.a_bits}: QuantizeLinear (opset 13) carries 8-bit integers only; the "
                "deploy checkpoint keeps the simulated network")
        onnx = None
    onnx_path: Path | None = None
    result: VerifyResult | None = None
    if onnx is not None:
        try:
            export_onnx(model, out_dir / ONNX_FILE, example, target=onnx)
            onnx_path = out_dir / ONNX_FILE
        except Exception as e:  # noqa: BLE001 - reported: the checkpoint is written
            problems.append(f"no ONNX file: the export failed ({type(e).__name__}: {e}); pass onnx=None to skip it")
    if onnx_path is not None and verify_batches > 0:
        data = loader if loader is not None else [example]
        try:
            result = verify_onnx(onnx_path, model, data, max_batches=verify_batches, min_agreement=MIN_AGREEMENT)
        except Exception as e:  # noqa: BLE001
            problems.append(f"could not run {ONNX_FILE} in ONNX Runtime ({type(e).__name__}: {e}); pass "
                            "verify_batches=0 to skip the check")
    if result is not None:
        write_text_atomic(out_dir / VERIFY_FILE, json.dumps(
            {"onnx": ONNX_FILE, "layout": onnx, "data": source, "max_batches": verify_batches, **result.to_dict()},
            indent=2) + "\n")
        failure = verify_failure(result)
        if failure is not None:
            problems.append(failure)
    for p in problems:
        warnings.warn(f"deploy: {p}", UserWarning, stacklevel=2)
    return DeployReport(out_dir, rebuildable, onnx_path, onnx, result, tuple(problems), note)
