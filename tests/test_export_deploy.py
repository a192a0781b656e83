"""qat_rep.export.deploy: one call writes exactly the artifact files; a recorded call with positional and keyword
tensors becomes named ONNX inputs and is verified in ONNX Runtime; a user model is kept in the one format."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from qat_rep.export import ModelCall, deploy, load_quantized, read_metadata
from qat_rep.quant import QuantConfig, calibrate, prepare


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, 10)

    def forward(self, x, extra, *, scale=1.0):
        return self.fc(self.features(x) * scale + extra["shift"])


def _model_and_calls():
    torch.manual_seed(0)
    model = TwoInputs()
    prepare(model, QuantConfig())
    calls = [ModelCall((torch.randn(4, 3, 16, 16), {"shift": torch.randn(4, 8)}), {"scale": 0.5}) for _ in range(3)]
    calibrate(model, calls, forward=lambda m, c: c.run(m))
    return model.eval(), calls


def test_deploy_writes_the_artifact_files_and_verifies_a_recorded_call(tmp_path):
    import onnx

    model, calls = _model_and_calls()
    report = deploy(model, tmp_path / "out", calls[0], calls, source="recorded")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "model.safetensors", "model_int8.onnx", "onnx_verify.json", "qat_rep.json"]
    graph = onnx.load(str(report.onnx_path)).graph
    assert [i.name for i in graph.input] == ["x", "extra.shift"]  # scale=0.5 is a constant of the trace
    assert report.verify.samples == 12 and report.verify.agreement == 1.0 and report.problems == ()
    saved = json.loads((tmp_path / "out" / "onnx_verify.json").read_text())
    assert saved["data"] == "recorded" and saved["agreement"] == 1.0
    assert report.metrics()["onnx_agreement"] == 1.0
    # a user class: the same two files, its class recorded, and a loader error that says what to do instead
    assert read_metadata(tmp_path / "out")["model"] == {"name": None, "class": f"{__name__}.TwoInputs"}
    assert not report.rebuildable
    with pytest.raises(ValueError, match="cannot rebuild by name. Build that model"):
        load_quantized(tmp_path / "out")


def test_deploy_skips_onnx_below_8_bits_and_refuses_bad_arguments(tmp_path):
    torch.manual_seed(0)
    model = TwoInputs()
    prepare(model, QuantConfig(w_bits=4, a_bits=4, first_last_8bit=False))
    call = ModelCall((torch.randn(2, 3, 16, 16), {"shift": torch.zeros(2, 8)}))
    calibrate(model, [call], forward=lambda m, c: c.run(m))
    report = deploy(model, tmp_path / "w4", call)
    assert report.onnx_path is None and "W4A4" in report.note
    assert sorted(p.name for p in (tmp_path / "w4").iterdir()) == ["model.safetensors", "qat_rep.json"]
    with pytest.raises(ValueError, match="verify_batches must be an integer >= 0"):
        deploy(model, tmp_path / "x", call, verify_batches=-1)
    with pytest.raises(TypeError, match="example_inputs must be a tensor, a tuple"):
        deploy(model, tmp_path / "x", [call])
