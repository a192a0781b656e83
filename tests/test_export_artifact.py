"""The pickle-free deploy checkpoint: round trip in a fresh process, no unpickling, clear errors, atomic writes."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qat_rep
from qat_rep.export import (
    FORMAT_VERSION,
    META_FILE,
    WEIGHTS_FILE,
    ArtifactWriteError,
    canonical_json,
    artifact_layers,
    load_quantized,
    read_metadata,
    save_quantized,
)
from qat_rep.quant import QuantConfig, calibrate, prepare
from test_export_onnx import SIZE, converted_copy, qat_digits

pytestmark = pytest.mark.slow  # every test starts from the QAT-trained digits model or its artifact

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def artifact(tmp_path) -> Path:
    return save_quantized(converted_copy(), tmp_path / "art", input_shape=(1, 3, SIZE, SIZE))


def _forge(directory: Path, meta: dict | None = None) -> None:
    """Write ``meta`` (default: the current one) with both hashes recomputed — a forger or a buggy writer: the
    checks after the hashes must still refuse what does not fit."""
    meta = json.loads((directory / META_FILE).read_text()) if meta is None else dict(meta)
    meta["sha256"] = hashlib.sha256((directory / WEIGHTS_FILE).read_bytes()).hexdigest()
    meta["artifact_sha256"] = hashlib.sha256(canonical_json(
        {k: v for k, v in meta.items() if k != "artifact_sha256"})).hexdigest()
    (directory / META_FILE).write_text(json.dumps(meta))



@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tensorrt", "onnxruntime"])
def test_round_trip_in_a_fresh_process(tmp_path, preset):
    model = converted_copy(preset)  # model → QAT (fixture) → convert → save
    x = qat_digits(preset)["val_x"][:64]
    with torch.no_grad():
        before = model(x)
    save_quantized(model, tmp_path / "art", input_shape=(1, 3, SIZE, SIZE))
    save_file({"x": x.contiguous()}, str(tmp_path / "x.safetensors"))
    script = (
        "import sys, torch\n"
        "from safetensors.torch import load_file, save_file\n"
        "from qat_rep.export import load_quantized\n"
        f"m = load_quantized({str(tmp_path / 'art')!r})\n"
        f"x = load_file({str(tmp_path / 'x.safetensors')!r})['x']\n"
        "with torch.no_grad(): y = m(x)\n"
        f"save_file({{'y': y.contiguous()}}, {str(tmp_path / 'y.safetensors')!r})\n"
        "bad = [k for k in sys.modules if k.split('.')[0] in ('lightning', 'pytorch_lightning')]\n"
        "assert not bad, bad\n"
        "assert not m.training\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    after = load_file(str(tmp_path / "y.safetensors"))["y"]
    assert after.shape == before.shape
    assert float((after - before).abs().max()) <= 1e-6
    # ... and the QAT-form model it came from predicts the same classes.
    with torch.no_grad():
        qat = qat_digits(preset)["model"](x)
    assert float((qat.argmax(1) == after.argmax(1)).float().mean()) >= 0.98


def test_save_accepts_qat_form_and_leaves_it_untouched(tmp_path):
    qat = qat_digits()["model"]
    keys = set(qat.state_dict())
    save_quantized(qat, tmp_path / "art")
    assert set(qat.state_dict()) == keys  # converted a copy, not the caller's model
    loaded = load_quantized(tmp_path / "art")
    x = qat_digits()["val_x"][:64]
    with torch.no_grad():
        assert torch.equal(loaded(x), converted_copy()(x))


def test_metadata_describes_the_artifact(artifact):
    meta = read_metadata(artifact)
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["model"] == {"name": "qarepvgg_a0", "num_classes": 10, "small_input": True}
    assert QuantConfig.from_dict(meta["quant_config"]) == QuantConfig()
    assert (meta["w_bits"], meta["a_bits"], meta["w_granularity"]) == (8, 8, "per_channel")
    assert meta["sha256"] == hashlib.sha256((artifact / WEIGHTS_FILE).read_bytes()).hexdigest()
    assert {"torch", "safetensors", "pytorch-quantization", "qat-rep", "python"} <= set(meta["versions"])
    assert meta["input_shape"] == [1, 3, SIZE, SIZE]
    tensors = load_file(str(artifact / WEIGHTS_FILE))
    assert len(tensors) == meta["num_tensors"]
    # fused weights, per-channel weight amax, per-tensor activation amax; no branch left
    assert tensors["stage1.0.rbr_reparam.weight"].shape == (48, 48, 3, 3)
    assert tensors["stage1.0.rbr_reparam._weight_quantizer._amax"].shape == (48, 1, 1, 1)
    assert tensors["stage1.0.rbr_reparam._input_quantizer._amax"].shape == ()
    assert not any("rbr_dense" in k or "rbr_1x1" in k or ".bn." in k for k in tensors)
    assert sorted(p.name for p in artifact.iterdir()) == [WEIGHTS_FILE, META_FILE]
    layers = artifact_layers(load_quantized(artifact))
    assert len(layers) == 23 and layers[0].name == "stage0.rbr_reparam" and layers[-1].name == "linear"
    assert all(r.w_bits == 8 and r.granularity == "per_channel" and r.input_amax > 0 for r in layers)


class _Boom:
    """Unpickling this object runs code: it creates the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_loader_never_unpickles(artifact, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"weights": _Boom(str(marker))})
    pickle.loads(payload)  # the payload works: unpickling it does create the marker ...
    assert marker.exists()
    marker.unlink()
    (artifact / WEIGHTS_FILE).write_bytes(payload)
    _forge(artifact)  # ... and the hash matches, so only the format itself stands between it and execution
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_quantized(artifact)
    assert not marker.exists()
    torch.save({"x": _Boom(str(marker))}, artifact / WEIGHTS_FILE)  # a torch pickle checkpoint in disguise
    _forge(artifact)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_quantized(artifact)
    assert not marker.exists()


def test_valid_load_calls_no_unpickler(tmp_path, monkeypatch):
    art = save_quantized(converted_copy(), tmp_path / "art")

    def forbidden(*a, **k):
        raise AssertionError("pickle was used")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    model = load_quantized(art)
    assert isinstance(model, torch.nn.Module)


def test_truncated_or_modified_weights_are_refused(artifact):
    data = (artifact / WEIGHTS_FILE).read_bytes()
    (artifact / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="hash mismatch"):
        load_quantized(artifact)
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF
    (artifact / WEIGHTS_FILE).write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="hash mismatch"):
        load_quantized(artifact)
    # a truncated file whose hash was (wrongly) updated is still refused, by the safetensors parser
    (artifact / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    _forge(artifact)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_quantized(artifact)


def test_tensors_that_do_not_fit_the_architecture(artifact):
    tensors = load_file(str(artifact / WEIGHTS_FILE))
    tensors.pop("linear.bias")
    save_file(tensors, str(artifact / WEIGHTS_FILE))
    _forge(artifact)
    with pytest.raises(ValueError, match="do not fit the model described in .*qat_rep.json.*missing: linear.bias"):
        load_quantized(artifact)


def test_metadata_errors(artifact, tmp_path):
    meta = json.loads((artifact / META_FILE).read_text())
    (artifact / META_FILE).write_text(json.dumps(dict(meta, format_version=FORMAT_VERSION + 1)))
    with pytest.raises(ValueError, match="newer than this qat-rep reads"):
        load_quantized(artifact)
    (artifact / META_FILE).write_text(json.dumps(dict(meta, format_version="1")))
    with pytest.raises(ValueError, match="invalid format_version"):
        load_quantized(artifact)
    (artifact / META_FILE).write_text(json.dumps(dict(meta, format="something-else")))
    with pytest.raises(ValueError, match="is not a qat-rep-int8 description"):
        load_quantized(artifact)
    _forge(artifact, {k: v for k, v in meta.items() if k != "layer_bits"})
    with pytest.raises(ValueError, match=r"lacks required key\(s\) \['layer_bits'\]"):
        load_quantized(artifact)
    _forge(artifact, dict(meta, weights_file="../elsewhere.safetensors"))
    with pytest.raises(ValueError, match="weights_file must be 'model.safetensors'"):
        load_quantized(artifact)
    (artifact / META_FILE).write_text('{"format": "qat-rep-int8", ')
    with pytest.raises(ValueError, match="not valid JSON"):
        load_quantized(artifact)
    (artifact / META_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="is not a qat-rep artifact"):
        load_quantized(artifact)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_quantized(tmp_path / "nowhere")


def test_save_errors(tmp_path):
    model = qat_rep.create_model("qarepvgg_a0", num_classes=10, small_input=True).eval()
    with pytest.raises(ValueError, match="no quantized layers"):
        save_quantized(model, tmp_path / "a")
    prepare(model, QuantConfig())
    with pytest.raises(ValueError, match="before calibration"):
        save_quantized(model, tmp_path / "a")
    calibrate(model, [torch.randn(2, 3, SIZE, SIZE)])
    with pytest.raises(ValueError, match="input_shape must be 4 positive integers"):
        save_quantized(model, tmp_path / "a", input_shape=(3, SIZE, SIZE))
    spec = model.qat_rep_spec
    model.qat_rep_spec = dict(spec, block=qat_rep.QARepVGGBlock)
    with pytest.raises(ValueError, match="JSON-safe"):
        save_quantized(model, tmp_path / "a")
    del model.qat_rep_spec
    with pytest.raises(ValueError, match="no qat_rep_spec"):
        save_quantized(model, tmp_path / "a")
    model.qat_rep_spec = spec
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ArtifactWriteError, match="cannot be created|not a directory"):
        save_quantized(model, blocker / "a")
    with pytest.raises(ArtifactWriteError, match="a file of that name exists"):
        save_quantized(model, blocker)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactWriteError, match="refusing to overwrite"):
        save_quantized(model, other)
    assert (other / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "other"]


def test_interrupted_save_leaves_nothing_and_keeps_the_old_artifact(tmp_path, monkeypatch):
    model = converted_copy()
    real_write_text = Path.write_text

    def crash(self, *a, **k):
        if self.name == META_FILE:
            raise KeyboardInterrupt  # after model.safetensors was written into the temporary directory
        return real_write_text(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", crash)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(model, tmp_path / "art")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(Path, "write_text", real_write_text)
    save_quantized(model, tmp_path / "art")
    old = (tmp_path / "art" / META_FILE).read_text()
    monkeypatch.setattr(Path, "write_text", crash)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(model, tmp_path / "art")
    monkeypatch.setattr(Path, "write_text", real_write_text)
    assert [p.name for p in tmp_path.iterdir()] == ["art"]
    assert (tmp_path / "art" / META_FILE).read_text() == old
    load_quantized(tmp_path / "art")
    save_quantized(model, tmp_path / "art")  # overwriting a previous artifact is allowed
    assert [p.name for p in tmp_path.iterdir()] == ["art"]
