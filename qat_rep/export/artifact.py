"""The deploy checkpoint: ``model.safetensors`` + ``qat_rep.json``, loadable without Lightning and without pickle.

Layout of an artifact directory::

    model.safetensors   the converted (fused) model's state dict: fused weights and biases, every quantizer's
                        amax (per-channel weight amax, per-tensor activation amax)
    qat_rep.json        format name and version, the architecture (``model.qat_rep_spec``: the arguments of
                        qat_rep.create_model), the QuantConfig, bits and granularity, the SHA-256 of
                        model.safetensors, library versions

:func:`load_quantized` rebuilds the structure from the JSON alone — ``create_model`` → ``prepare`` → ``convert``
(structure only; no calibration data needed) — then loads the tensors with :func:`safetensors.torch.load`, which
parses a JSON header and raw buffers and never unpickles. The hash is checked before anything is parsed, so a
truncated or modified weights file is refused with a clear error, and a JSON written by a newer format version is
refused rather than misread. Both files are written into a temporary directory that is renamed into place.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import platform
from dataclasses import dataclass
from importlib import metadata as _metadata
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .atomic import atomic_directory

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "WEIGHTS_FILE",
    "META_FILE",
    "LayerInfo",
    "save_quantized",
    "load_quantized",
    "read_metadata",
    "artifact_layers",
]

FORMAT_NAME = "qat-rep-int8"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "qat_rep.json"


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("qat-rep", "torch", "pytorch-quantization", "safetensors", "onnx", "onnxruntime"):
        try:
            out[dist] = _metadata.version(dist)
        except _metadata.PackageNotFoundError:
            if dist == "qat-rep":
                from .. import __version__

                out[dist] = __version__
    return out


def _spec_of(model: nn.Module) -> dict[str, Any]:
    spec = getattr(model, "qat_rep_spec", None)
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(
            "model has no qat_rep_spec (the arguments that rebuild it); build it with qat_rep.create_model(...) "
            "or set model.qat_rep_spec = {'name': ..., 'num_classes': ..., 'small_input': ...}"
        )
    try:
        json.dumps(spec, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"model.qat_rep_spec must be JSON-safe to be stored in {META_FILE} ({e}); pass names, not classes "
            "(e.g. block='qarepvgg')"
        ) from None
    return dict(spec)


def _class_spec(model: nn.Module) -> dict[str, Any]:
    """The ``model`` entry of a model qat_rep cannot rebuild by name: no ``name``, the class for the reader."""
    return {"name": None, "class": f"{type(model).__module__}.{type(model).__qualname__}"}


def _quant_api():
    from ..quant import convert, get_config, quant_layers  # noqa: F401

    return convert, get_config, quant_layers


def save_quantized(model: nn.Module, directory: str | Path, input_shape: Sequence[int] | None = None, *,
                   allow_unregistered: bool = False) -> Path:
    """Write the deploy checkpoint of a calibrated (QAT or converted) model to ``directory``, atomically.

    The model is not modified: a copy is converted to the fused form. ``input_shape`` (e.g. ``(1, 3, 32, 32)``) is
    recorded for tools that export or benchmark the artifact later. An existing ``directory`` is replaced only if
    it is empty or a previous artifact. Returns the directory.

    ``allow_unregistered=True`` also saves a model without ``qat_rep_spec`` (any user network): same two files,
    with ``"model": {"name": null, "class": ...}``; :func:`load_quantized` cannot rebuild it and says how to load
    the weights into the user's own class instead.
    """
    from safetensors.torch import save as st_save

    from .onnx_export import _uncalibrated

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    registered = isinstance(getattr(model, "qat_rep_spec", None), dict)
    spec = _class_spec(model) if allow_unregistered and not registered else _spec_of(model)
    convert, get_config, quant_layers = _quant_api()
    if not quant_layers(model):
        raise ValueError("model has no quantized layers: run qat_rep.quant.prepare(model, config) and "
                         "qat_rep.quant.calibrate(model, batches) before save_quantized")
    config = get_config(model)
    missing = _uncalibrated(model)
    if missing:
        raise ValueError(
            f"cannot save before calibration: {len(missing)} quantizer(s) have no amax (e.g. {missing[0]}); run "
            "qat_rep.quant.calibrate(model, batches) first"
        )
    if input_shape is not None:
        input_shape = [int(s) for s in input_shape]
        if len(input_shape) != 4 or min(input_shape) < 1:
            raise ValueError(f"input_shape must be 4 positive integers (N, C, H, W), got {input_shape}")
    work = copy.deepcopy(model).cpu().eval()
    convert(work)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in work.state_dict().items()}
    data = st_save(state, metadata={"format": "pt", "qat_rep_format": FORMAT_NAME,
                                    "qat_rep_format_version": str(FORMAT_VERSION)})
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model": spec,
        "quant_config": config.to_dict(),
        "w_bits": config.w_bits,
        "a_bits": config.a_bits,
        "w_granularity": config.w_granularity,
        "form": "converted",
        "input_shape": input_shape,
        "weights_file": WEIGHTS_FILE,
        "sha256": hashlib.sha256(data).hexdigest(),
        "num_tensors": len(state),
        "quantized_layers": [n for n, _ in quant_layers(work)],
        "versions": _versions(),
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    text = json.dumps(meta, indent=2, sort_keys=False, allow_nan=False) + "\n"
    directory = Path(directory)
    with atomic_directory(directory, marker=META_FILE) as tmp:
        (tmp / WEIGHTS_FILE).write_bytes(data)
        (tmp / META_FILE).write_text(text, encoding="utf-8")
    return directory


def read_metadata(directory: str | Path) -> dict[str, Any]:
    """The validated ``qat_rep.json`` of an artifact (format name and version checked, required keys present)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"artifact directory {str(directory)!r} does not exist (write one with "
                                "qat_rep.save_quantized(model, directory))")
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{str(directory)!r} is not a qat-rep artifact: {META_FILE} is missing")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{str(meta_path)!r} is corrupted (not valid JSON: {e}); re-export the artifact") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{str(meta_path)!r} is not a {FORMAT_NAME} description (format="
                         f"{meta.get('format') if isinstance(meta, dict) else None!r})")
    version = meta.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{str(meta_path)!r} has an invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{str(meta_path)!r} has format_version {version}, newer than this qat-rep reads (<= {FORMAT_VERSION}); "
            "upgrade qat-rep (pip install -U qat-rep) to load it"
        )
    required = ("model", "quant_config", "sha256", "weights_file")
    missing = [k for k in required if k not in meta]
    if missing:
        raise ValueError(f"{str(meta_path)!r} lacks required key(s) {missing}; re-export the artifact")
    if not isinstance(meta["model"], dict) or "name" not in meta["model"]:
        raise ValueError(f"{str(meta_path)!r}: 'model' must be a mapping with a 'name'")
    if Path(meta["weights_file"]).name != meta["weights_file"]:
        raise ValueError(f"{str(meta_path)!r}: weights_file must be a bare file name, got {meta['weights_file']!r}")
    return meta


def load_quantized(directory: str | Path) -> nn.Module:
    """Rebuild the fused INT8 (fake-quant) model of an artifact as a plain ``nn.Module`` in eval mode.

    No Lightning and no unpickling: the structure comes from ``qat_rep.json`` (create_model → prepare → convert) and
    the tensors from safetensors. Raises ``ValueError`` for a newer format version, a hash mismatch (truncated or
    modified weights), an unreadable safetensors file or tensors that do not fit the architecture. The artifact's
    metadata is attached as ``model.qat_rep_artifact``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    from ..models import create_model
    from ..quant import QuantConfig, prepare

    directory = Path(directory)
    meta = read_metadata(directory)
    weights = directory / meta["weights_file"]
    if not weights.is_file():
        raise FileNotFoundError(f"artifact {str(directory)!r} lacks its weights file {meta['weights_file']!r}")
    data = weights.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != meta["sha256"]:
        raise ValueError(
            f"hash mismatch for {str(weights)!r}: the file's SHA-256 is {digest[:16]}…, {META_FILE} records "
            f"{str(meta['sha256'])[:16]}…; the weights are truncated, corrupted or were modified — re-export the "
            "artifact"
        )
    try:
        state = st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise ValueError(f"{str(weights)!r} is not a readable safetensors file ({e}); re-export the artifact") from None
    spec = dict(meta["model"])
    name = spec.pop("name")
    if name is None:
        raise ValueError(
            f"{str(directory)!r} holds the fused weights of {spec.get('class', 'a user model')!r}, which qat_rep "
            "cannot rebuild by name. Build that model, then qat_rep.quant.prepare(model, QuantConfig.from_dict("
            "read_metadata(directory)['quant_config'])), qat_rep.quant.convert(model), and load_state_dict("
            f"safetensors.torch.load_file(directory / {meta['weights_file']!r}))"
        )
    model = create_model(name, **spec)
    prepare(model, QuantConfig.from_dict(meta["quant_config"]))
    _quant_api()[0](model)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"the tensors in {str(weights)!r} do not fit {name!r} with the recorded QuantConfig "
            f"(missing: {result.missing_keys[:3]}, unexpected: {result.unexpected_keys[:3]}); the artifact is "
            "inconsistent — re-export it"
        )
    model.eval()
    model.qat_rep_artifact = meta
    return model


@dataclass(frozen=True)
class LayerInfo:
    """One quantized layer of a model or artifact, for ``qat-rep inspect``."""

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    w_bits: int
    a_bits: int
    granularity: str
    input_amax: float
    weight_amax_min: float
    weight_amax_max: float
    a_unsigned: bool = False  # the input uses [0, 2^a_bits - 1] (QuantConfig.unsigned_activations)

    @property
    def input_scale(self) -> float:
        return self.input_amax / ((1 << (self.a_bits - 1 + int(self.a_unsigned))) - 1)


def artifact_layers(model: nn.Module) -> list[LayerInfo]:
    """Per-layer quantization facts of a prepared/converted model (no data needed: read from the quantizers)."""
    _, _, quant_layers = _quant_api()
    rows = []
    for name, layer in quant_layers(model):
        iq, wq = layer._input_quantizer, layer._weight_quantizer
        weight = getattr(layer, "weight", None)
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else ()
        w_amax = wq._amax.detach().float()
        i_amax = iq._amax.detach().float()
        rows.append(LayerInfo(
            name=name,
            kind=type(layer).__name__,
            weight_shape=shape,
            w_bits=int(wq.num_bits),
            a_bits=int(iq.num_bits),
            granularity="per_channel" if wq.axis is not None else "per_tensor",
            input_amax=float(i_amax.max()) if i_amax.numel() else float("nan"),
            weight_amax_min=float(w_amax.min()) if w_amax.numel() else float("nan"),
            weight_amax_max=float(w_amax.max()) if w_amax.numel() else float("nan"),
            a_unsigned=bool(iq.unsigned),
        ))
    return rows
