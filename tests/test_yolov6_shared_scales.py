"""Shared activation scales: quantizers joined by a Concat/Add (or reading one tensor) share one amax, so the
TensorRT-layout ONNX file needs no re-quantization (``shared_scale_violations == []``) without post-hoc surgery."""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

from qat_rep.detection.loss import DetectionLoss
from qat_rep.export import export_onnx
from qat_rep.export.onnx_export import quantized_node_names, shared_scale_violations
from qat_rep.models import create_model
from qat_rep.quant import QuantConfig, calibrate, prepare, share_input_scales


class _ConcatNet(nn.Module):
    """``a`` feeds a concat (read by ``c``) and ``d`` directly: c's and d's input quantizers must agree."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.c = nn.Conv2d(8, 4, 1)
        self.d = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        a = torch.relu(self.a(x))
        b = torch.relu(self.b(x)) * 3.0  # a different range: the two quantizers calibrate differently
        return self.c(torch.cat([a, b], 1)) + self.d(a)


def _export(model, path, x):
    return export_onnx(model, path, x, target="tensorrt")


def test_untied_concat_is_a_violation_and_sharing_removes_it(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    untied = _ConcatNet().eval()
    prepare(untied, QuantConfig())
    keys = set(untied.state_dict())
    calibrate(untied, [x])
    rep = _export(untied, tmp_path / "untied.onnx", x)
    assert rep.shared_scale_violations and shared_scale_violations(rep.path)

    tied = _ConcatNet().eval()
    tied.load_state_dict({k: v for k, v in untied.state_dict().items() if "quantizer" not in k}, strict=False)
    prepare(tied, QuantConfig())
    groups = share_input_scales(tied, x)
    # a and b read the same image; c (through the concat) and d read a
    assert groups == [("a._input_quantizer", "b._input_quantizer"), ("c._input_quantizer", "d._input_quantizer")]
    assert tied.c._input_quantizer is tied.d._input_quantizer
    assert set(tied.state_dict()) == keys  # tying changes no key
    assert share_input_scales(tied, x) == groups  # a second call finds the same groups and changes nothing
    assert tied.c._input_quantizer is tied.d._input_quantizer
    calibrate(tied, [x])
    amax = tied.c._input_quantizer.amax
    assert float(amax) == max(float(untied.c._input_quantizer.amax), float(untied.d._input_quantizer.amax))
    rep = _export(tied, tmp_path / "tied.onnx", x)
    assert rep.shared_scale_violations == () and shared_scale_violations(rep.path) == []


def test_share_input_scales_refuses_unprepared_models():
    with pytest.raises(ValueError, match="not prepared"):
        share_input_scales(_ConcatNet(), torch.randn(1, 3, 8, 8))


@pytest.mark.slow
def test_qat_detector_keeps_shared_scales_in_tensorrt_layout(tmp_path):
    torch.manual_seed(0)
    x = torch.rand(4, 3, 32, 32)
    targets = torch.tensor([[0, 1, 4, 4, 20, 20], [1, 0, 8, 2, 30, 16], [2, 2, 0, 0, 12, 30], [3, 1, 10, 10, 28, 28.]])
    model = create_model("yolov6_n", num_classes=3, block="qarepvggv2")
    prepare(model, QuantConfig())
    groups = share_input_scales(model, x)
    # the feature map a backbone stage hands to the next stage and to the neck is quantized once
    assert ("backbone.ERBlock_5.0.rep_quant._input_quantizer",
            "neck.Bifusion0.cv1.block.conv._input_quantizer") in groups
    calibrate(model, [x])
    model.train()
    loss_fn = DetectionLoss(3, model.strides)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    loss, _ = loss_fn(model(x), targets)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert model.backbone.ERBlock_5[0].rep_quant._input_quantizer is model.neck.Bifusion0.cv1.block.conv._input_quantizer
    model.eval()
    model.export = True
    rep = export_onnx(model, tmp_path / "det_trt.onnx", x[:1], target="tensorrt")
    assert rep.shared_scale_violations == ()
    ops = {(n.name or n.output[0]): n.op_type for n in onnx.load(str(rep.path)).graph.node}
    qdq = quantized_node_names(rep.path)
    # every conv, the two BiFusion upsampling ConvTranspose included, reads a dequantized input and weight
    assert [ops[k] for k in qdq].count("Conv") == 69 and [ops[k] for k in qdq].count("ConvTranspose") == 2
    assert all(v == (True, True) for v in qdq.values())
