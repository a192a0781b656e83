"""The deploy checkpoint: ``model.safetensors`` + ``qat_rep.json``, loadable without Lightning and without pickle.

Layout of an artifact directory::

    model.safetensors   the converted (fused) model's state dict: fused weights and biases, every quantizer's
                        amax (per-channel weight amax, per-tensor activation amax)
    qat_rep.json        format name and version, the architecture (``model.qat_rep_spec``: the arguments of
                        qat_rep.create_model), the QuantConfig, bits and granularity, each layer's bits, the input
                        shape, the SHA-256 of model.safetensors, library versions, and ``artifact_sha256``: the
                        SHA-256 of this whole description in canonical JSON (sorted keys, no whitespace) — which
                        includes the weights' hash, so one digest covers architecture, QuantConfig, input shape
                        and weights
    model_int8.onnx, onnx_verify.json   optional: the QDQ ONNX file and its ONNX Runtime check (a fit end)

Trust model. :func:`load_quantized` checks both hashes before it builds anything, so an edited description (a bit
width, the granularity, ``num_classes``) or a modified weights file is refused, not loaded as a different network.
It then rebuilds the structure from the JSON alone — ``create_model`` → ``prepare`` → ``convert`` on PyTorch's
``meta`` device, so a description of an absurd model allocates nothing — compares every tensor's name, shape and
dtype with the file, loads the tensors with :func:`safetensors.torch.load` (a JSON header and raw buffers; nothing is
unpickled), checks every stored ``amax`` (:func:`qat_rep.quant.check_calibrated`) and each layer's bits against the
config. Every refusal is a ``ValueError`` naming the file and the fix. :func:`save_quantized` writes into a temporary
directory that replaces the target in one atomic exchange, and replaces only an artifact this project wrote that
holds nothing but :data:`ARTIFACT_FILES` (see :mod:`.atomic`).
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
    "ARTIFACT_FILES",
    "canonical_json",
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
FORMAT_VERSION = 2  # 2: artifact_sha256 covers the whole description; layer_bits
WEIGHTS_FILE = "model.safetensors"
META_FILE = "qat_rep.json"
#: every file this project writes into an artifact directory; a save replaces a directory that holds only these
ARTIFACT_FILES = (WEIGHTS_FILE, META_FILE, "model_int8.onnx", "onnx_verify.json")
_DIGEST_KEY = "artifact_sha256"
_MAX_META_BYTES = 16 << 20  # a description is a few kB; anything near this is not one
_MAX_INPUT_SIDE = 1 << 16


def canonical_json(obj: Any) -> bytes:
    """The bytes that are hashed: sorted keys, no whitespace, ASCII, no NaN/inf."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def _digest(meta: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json({k: v for k, v in meta.items() if k != _DIGEST_KEY})).hexdigest()


def _is_artifact_dir(directory: Path) -> bool:
    """True when ``directory`` holds a ``qat_rep.json`` of this format (any version): an artifact we wrote."""
    path = directory / META_FILE
    try:
        if path.is_symlink() or path.stat().st_size > _MAX_META_BYTES:
            return False
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT_NAME and isinstance(meta.get("format_version"), int)


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


def _layer_bits(model: nn.Module) -> dict[str, list[int]]:
    """``{layer: [weight bits, input bits]}`` as the model's quantizers hold them."""
    _, _, quant_layers = _quant_api()
    return {name: [int(layer._weight_quantizer.num_bits), int(layer._input_quantizer.num_bits)]
            for name, layer in quant_layers(model)}


def save_quantized(model: nn.Module, directory: str | Path, input_shape: Sequence[int] | None = None, *,
                   allow_unregistered: bool = False) -> Path:
    """Write the deploy checkpoint of a calibrated (QAT or converted) model to ``directory``, atomically.

    The model is not modified: a copy is converted to the fused form. ``input_shape`` (e.g. ``(1, 3, 32, 32)``) is
    recorded for tools that export or benchmark the artifact later. An existing ``directory`` is replaced only if
    it is empty or an artifact written by qat-rep that holds nothing but :data:`ARTIFACT_FILES`; otherwise
    :class:`~.atomic.ArtifactWriteError` names the foreign files and nothing is touched. Raises
    :class:`~qat_rep.quant.DegenerateCalibrationError` for an amax that would quantize a layer to zero. Returns the
    directory.

    ``allow_unregistered=True`` also saves a model without ``qat_rep_spec`` (any user network): same two files,
    with ``"model": {"name": null, "class": ...}``; :func:`load_quantized` cannot rebuild it and says how to load
    the weights into the user's own class instead.
    """
    from safetensors.torch import save as st_save

    from ..quant import check_calibrated
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
    check_calibrated(model)
    if input_shape is not None:
        input_shape = [int(s) for s in input_shape]
        if len(input_shape) != 4 or min(input_shape) < 1:
            raise ValueError(f"input_shape must be 4 positive integers (N, C, H, W), got {input_shape}")
    work = copy.deepcopy(model).cpu().eval()
    convert(work)
    check_calibrated(work)
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
        "layer_bits": _layer_bits(work),
        "versions": _versions(),
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    meta[_DIGEST_KEY] = _digest(meta)
    text = json.dumps(meta, indent=2, sort_keys=False, allow_nan=False) + "\n"
    directory = Path(directory)
    with atomic_directory(directory, marker=META_FILE, allowed=ARTIFACT_FILES, recognise=_is_artifact_dir) as tmp:
        (tmp / WEIGHTS_FILE).write_bytes(data)
        (tmp / META_FILE).write_text(text, encoding="utf-8")
    return directory


def read_metadata(directory: str | Path) -> dict[str, Any]:
    """The verified ``qat_rep.json`` of an artifact.

    Checks the format name and version, that ``artifact_sha256`` matches the canonical JSON (nothing was edited),
    the required keys and their types, that the header bits and granularity equal the QuantConfig's, and the input
    shape. Raises ``ValueError`` (``FileNotFoundError``/``NotADirectoryError`` for a wrong path) naming the file and
    the fix.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{str(directory)!r} is a file, not an artifact directory; pass the directory that "
                                 f"holds {META_FILE} and {WEIGHTS_FILE} (written by qat_rep.save_quantized)")
    if not directory.is_dir():
        raise FileNotFoundError(f"artifact directory {str(directory)!r} does not exist (write one with "
                                "qat_rep.save_quantized(model, directory))")
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{str(directory)!r} is not a qat-rep artifact: {META_FILE} is missing")
    where = repr(str(meta_path))
    if meta_path.stat().st_size > _MAX_META_BYTES:
        raise ValueError(f"{where} is {meta_path.stat().st_size} bytes, too large to be an artifact description; "
                         "re-export the artifact")
    try:
        meta = json.loads(meta_path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{where} is corrupted (not UTF-8 text); re-export the artifact") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} is corrupted (not valid JSON: {e}); re-export the artifact") from None
    except RecursionError:
        raise ValueError(f"{where} is not an artifact description (JSON nested too deeply); re-export the "
                         "artifact") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{where} is not a {FORMAT_NAME} description (format="
                         f"{meta.get('format') if isinstance(meta, dict) else None!r})")
    version = meta.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{where} has an invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{where} has format_version {version}, newer than this qat-rep reads (<= {FORMAT_VERSION}); "
            "upgrade qat-rep (pip install -U qat-rep) to load it"
        )
    if version < FORMAT_VERSION:
        raise ValueError(f"{where} has format_version {version}, whose hash covers only the weights, not the "
                         "description; re-export the artifact with this qat-rep (qat_rep.save_quantized)")
    recorded = meta.get(_DIGEST_KEY)
    try:
        actual = _digest(meta)
    except ValueError:  # NaN/inf in the JSON: canonical JSON refuses them
        actual = None
    if not isinstance(recorded, str) or actual != recorded:
        raise ValueError(
            f"{where} was modified after it was written: its canonical SHA-256 does not match the recorded "
            f"{_DIGEST_KEY} (architecture, QuantConfig, bits, input shape and the weights' hash are all covered); "
            "re-export the artifact instead of editing it"
        )
    _check_description(meta, where)
    return meta


def _check_description(meta: dict[str, Any], where: str) -> None:
    """Types and consistency of a description whose digest matched (a writer with a bug, or a forged digest)."""
    from ..quant import QuantConfig

    required = ("model", "quant_config", "sha256", "weights_file", "input_shape", "w_bits", "a_bits",
                "w_granularity", "layer_bits")
    missing = [k for k in required if k not in meta]
    if missing:
        raise ValueError(f"{where} lacks required key(s) {missing}; re-export the artifact")
    model = meta["model"]
    user_model = isinstance(model, dict) and model.get("name") is None and isinstance(model.get("class"), str)
    if not isinstance(model, dict) or not (isinstance(model.get("name"), str) or user_model):
        raise ValueError(f"{where}: 'model' must be a mapping with a 'name' (or a null name and the user model's "
                         "'class'); re-export the artifact")
    if meta["weights_file"] != WEIGHTS_FILE:
        raise ValueError(f"{where}: weights_file must be {WEIGHTS_FILE!r}, got {meta['weights_file']!r}")
    sha = meta["sha256"]
    if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ValueError(f"{where}: sha256 must be 64 lowercase hex digits; re-export the artifact")
    try:
        config = QuantConfig.from_dict(meta["quant_config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: invalid quant_config ({e}); re-export the artifact") from None
    for key, value in (("w_bits", config.w_bits), ("a_bits", config.a_bits), ("w_granularity", config.w_granularity)):
        if meta[key] != value or type(meta[key]) is not type(value):
            raise ValueError(f"{where}: the header says {key}={meta[key]!r} but quant_config says {value!r}; the "
                             "description is inconsistent — re-export the artifact")
    shape = meta["input_shape"]
    if shape is not None and not (
            isinstance(shape, list) and len(shape) == 4
            and all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= _MAX_INPUT_SIDE for d in shape)):
        raise ValueError(f"{where}: input_shape must be null or 4 integers N, C, H, W in 1..{_MAX_INPUT_SIDE}, got "
                         f"{shape!r}; re-export the artifact")
    bits = meta["layer_bits"]
    if not isinstance(bits, dict) or not all(
            isinstance(v, list) and len(v) == 2 and all(isinstance(b, int) and not isinstance(b, bool) for b in v)
            for v in bits.values()):
        raise ValueError(f"{where}: layer_bits must map layer names to [weight bits, input bits]; re-export the "
                         "artifact")


_BUILD_ERRORS = (TypeError, ValueError, KeyError, IndexError, AttributeError, RuntimeError, NotImplementedError,
                 OverflowError, MemoryError, RecursionError, ZeroDivisionError)


def _structure(meta: dict[str, Any], where: str) -> nn.Module:
    """The converted model the description names, built on the ``meta`` device (no memory for its tensors)."""
    from ..models import create_model
    from ..quant import QuantConfig, prepare

    spec = dict(meta["model"])
    name = spec.pop("name")
    try:
        with torch.device("meta"):
            model = create_model(name, **spec)
            prepare(model, QuantConfig.from_dict(meta["quant_config"]))
            _quant_api()[0](model)
    except _BUILD_ERRORS as e:
        raise ValueError(f"{where} describes a model that cannot be built ({type(e).__name__}: {e}); re-export "
                         "the artifact") from None
    return model


def _match_tensors(model: nn.Module, state: dict[str, torch.Tensor], weights: Path) -> None:
    """Every tensor of the described structure is in the file with the same shape and dtype, and nothing else."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state)
                   if tuple(own[k].shape) != tuple(state[k].shape) or own[k].dtype != state[k].dtype)
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{what}: {', '.join(keys[:3])}{' …' if len(keys) > 3 else ''}"
            for what, keys in (("missing", missing), ("unexpected", unexpected),
                               ("different shape or dtype", [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                                                             for k in wrong])) if keys)
        raise ValueError(f"the tensors in {str(weights)!r} do not fit the model described in "
                         f"{str(weights.with_name(META_FILE))!r} ({detail}); the artifact is inconsistent — re-export it")


def load_quantized(directory: str | Path) -> nn.Module:
    """Rebuild the fused INT8 (fake-quant) model of an artifact as a plain ``nn.Module`` in eval mode.

    No Lightning and no unpickling: the structure comes from ``qat_rep.json`` (create_model → prepare → convert) and
    the tensors from safetensors. Raises ``ValueError`` (or a subclass) for a newer or older format version, an
    edited description or weights file (hash mismatch), an unreadable safetensors file, tensors that do not fit
    the architecture, a stored amax that is not finite and positive, or per-layer bits that differ from the
    config. The artifact's metadata is attached as ``model.qat_rep_artifact``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    from ..quant import DegenerateCalibrationError, check_calibrated

    directory = Path(directory)
    meta = read_metadata(directory)
    where = repr(str(directory / META_FILE))
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"artifact {str(directory)!r} lacks its weights file {WEIGHTS_FILE!r}")
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
    except (SafetensorError, ValueError, RuntimeError, TypeError, OverflowError, MemoryError) as e:
        raise ValueError(f"{str(weights)!r} is not a readable safetensors file ({e}); re-export the artifact") from None
    if meta["model"]["name"] is None:
        raise ValueError(
            f"{str(directory)!r} holds the fused weights of {meta['model']['class']!r}, which qat_rep cannot rebuild "
            "by name. Build that model, then qat_rep.quant.prepare(model, QuantConfig.from_dict(read_metadata("
            "directory)['quant_config'])), qat_rep.quant.convert(model), and load_state_dict("
            f"safetensors.torch.load_file(directory / {WEIGHTS_FILE!r}))")
    model = _structure(meta, where)
    _match_tensors(model, state, weights)
    model.to_empty(device="cpu")
    model.load_state_dict(state, strict=True)
    layer_bits = _layer_bits(model)
    if layer_bits != meta["layer_bits"]:
        diff = sorted(n for n in set(layer_bits) | set(meta["layer_bits"])
                      if layer_bits.get(n) != meta["layer_bits"].get(n))
        raise ValueError(f"{where}: layer_bits disagree with the QuantConfig for {diff[:3]} (the file says "
                         f"{[meta['layer_bits'].get(n) for n in diff[:3]]}, the config builds "
                         f"{[layer_bits.get(n) for n in diff[:3]]}); re-export the artifact")
    try:
        check_calibrated(model)
    except DegenerateCalibrationError as e:
        raise DegenerateCalibrationError(f"artifact {str(weights)!r}: {e}") from None
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
