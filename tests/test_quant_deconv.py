"""Quantized transposed convs (YOLOv6's upsampling): per-output-channel weights on axis 1, the int32 bias, eval ==
convert, Q/DQ on the ONNX ConvTranspose in both layouts and ONNX Runtime agreeing with the fake-quant model."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from qat_rep.export import export_onnx, quantized_node_names, shared_scale_violations, verify_onnx
from qat_rep.quant import (DegenerateCalibrationError, QuantConfig, calibrate, check_calibrated, convert, prepare,
                           quant_layers)
from qat_rep.quant.backend import QuantConvTranspose2d


class UpNet(nn.Module):
    def __init__(self, groups: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU())
        # in != out channels, so an axis mix-up changes shapes instead of passing silently
        self.up = nn.ConvTranspose2d(8, 6, 2, 2, bias=True, groups=groups)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.up(self.stem(x))))


def _prepared(per_channel: bool = True, seed: int = 0) -> UpNet:
    torch.manual_seed(seed)
    model = UpNet()
    with torch.no_grad():  # output channels of very different magnitude: per-tensor would crush the small ones
        model.up.weight.mul_(torch.tensor([1.0, 0.01, 3.0, 0.1, 1.0, 10.0]).view(1, 6, 1, 1))
        model.up.bias.uniform_(-0.3, 0.3)
    prepare(model, QuantConfig(w_granularity="per_channel" if per_channel else "per_tensor"))
    calibrate(model, [torch.randn(4, 3, 16, 16) for _ in range(2)])
    return model.eval()


def test_transposed_conv_is_quantized_per_output_channel():
    model = _prepared()
    assert isinstance(model.up, QuantConvTranspose2d)
    assert "up" in dict(quant_layers(model))
    wq = model.up._weight_quantizer
    assert wq.axis == 1 and tuple(wq.amax.shape) == (1, 6, 1, 1)
    w = model.up.weight.detach()
    amax = w.abs().amax(dim=(0, 2, 3), keepdim=True)
    expected = torch.round(w / (amax / 127)).clamp(-128, 127) * (amax / 127)
    assert torch.equal(wq(w), expected)
    # the bias lands on the int32 grid s_x * s_w of each output channel
    x = torch.randn(2, 3, 16, 16)
    y = model.up(model.stem(x))
    s = float(model.up._input_quantizer.amax) / 127 * (wq.amax.flatten() / 127)
    xq = model.up._input_quantizer(model.stem(x))
    b = torch.round(model.up.bias.detach() / s) * s
    ref = nn.functional.conv_transpose2d(xq, expected, b, 2)
    assert torch.equal(y, ref)


def test_eval_equals_convert_and_training_gradients_reach_the_weight():
    model = _prepared()
    x = torch.randn(3, 3, 16, 16)
    assert torch.equal(model(x), convert(copy.deepcopy(model))(x))
    model.train()
    model(x).square().mean().backward()
    assert model.up.weight.grad is not None and bool(model.up.weight.grad.abs().sum() > 0)


def test_grouped_transposed_conv_stays_float():
    model = UpNet(groups=2)
    report = prepare(model, QuantConfig())
    assert type(model.up) is nn.ConvTranspose2d and "up" not in report.plain


def test_degenerate_weight_channel_is_found_on_axis_1():
    model = _prepared()
    wq = model.up._weight_quantizer
    wq._dynamic = False  # a static weight amax, as after PTQ
    amax = wq.amax.detach().clone()
    amax[0, 2] = 0.0  # output channel 2 has non-zero weights
    wq.set_amax(amax)
    with pytest.raises(DegenerateCalibrationError, match=r"channel\(s\) \[2\]"):
        check_calibrated(model)
    with torch.no_grad():  # an all-zero output channel may keep amax 0 (its weights quantize to 0 anyway)
        model.up.weight[:, 2].zero_()
    assert check_calibrated(model) > 0


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
def test_onnx_convtranspose_has_qdq_and_ort_agrees(tmp_path, target):
    model = _prepared()
    rep = export_onnx(model, tmp_path / f"{target}.onnx", torch.randn(1, 3, 16, 16), target=target)
    proto = onnx.load(str(rep.path))
    nodes = {(n.name or n.output[0]): n for n in proto.graph.node}
    qdq = quantized_node_names(proto)
    deconv = [k for k, n in nodes.items() if n.op_type == "ConvTranspose"]
    assert len(deconv) == 1 and qdq[deconv[0]] == (True, True)
    assert all(v == (True, True) for v in qdq.values())
    producer = {o: n for n in proto.graph.node for o in n.output}
    dq_w = producer[nodes[deconv[0]].input[1]]
    assert [a.i for a in dq_w.attribute if a.name == "axis"] == [1]
    if target == "onnxruntime":  # bias stored as INT32 on the s_x * s_w grid, as the fake-quant model adds it
        dq_b = producer[nodes[deconv[0]].input[2]]
        inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
        assert dq_b.op_type == "DequantizeLinear" and inits[dq_b.input[0]].dtype == np.int32
    assert shared_scale_violations(proto) == []
    result = verify_onnx(rep.path, model, [torch.randn(4, 3, 16, 16) for _ in range(2)])
    assert result.ok, result.failures
