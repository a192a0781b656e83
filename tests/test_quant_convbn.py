"""Conv+BN pairs outside rep blocks (YOLOv6's ConvBNReLU/ConvBNSiLU): the evaluation-mode QAT model computes the
conv that ``convert`` writes (BN folded, then quantized), bit for bit, so the model that is scored is the model that
is exported; training still runs conv then BN, and the state-dict keys do not change."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qat_rep.models import create_model
from qat_rep.models.efficientrep import ConvModule
from qat_rep.quant import QuantConfig, calibrate, convert, layer_report, prepare
from qat_rep.quant.backend import FoldedBatchNorm2d, QuantConv2d


def _with_statistics(model: nn.Module, shape: tuple[int, ...], steps: int = 3) -> nn.Module:
    """Non-trivial BN statistics and affine parameters (cumulative averages of a few batches)."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    for m in model.modules():  # YOLOv6's prediction convs start at zero: give the outputs something to carry
        if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.bias is not None:
            with torch.no_grad():
                m.weight.normal_(0, 0.05)
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.rand(*shape))
    return model


@pytest.mark.parametrize("gran", ["per_channel", "per_tensor"])
@pytest.mark.parametrize("block", ["repvgg", "qarepvggv2"])
def test_detector_eval_equals_convert(block, gran):
    model = _with_statistics(create_model("yolov6_n", num_classes=4, block=block), (4, 3, 64, 64))
    keys = set(model.state_dict())
    conv_bn = [m for m in model.modules() if isinstance(m, ConvModule)]  # ConvBNReLU/ConvBNSiLU of every part
    prepare(model, QuantConfig(w_granularity=gran))
    assert len(conv_bn) == 28 and all(isinstance(m.bn, FoldedBatchNorm2d) for m in conv_bn)
    assert {k for k in model.state_dict() if "quantizer" not in k and "rep_quant" not in k} == keys  # BN keys stay
    x = torch.rand(4, 3, 64, 64)
    calibrate(model, [x])
    model.train()  # one QAT step: BN statistics move, weights change
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    sum(o.square().mean() for o in model(x)).backward()
    opt.step()
    model.eval()
    model.export = True
    with torch.no_grad():
        ours = model(x)
        deployed = convert(copy.deepcopy(model))(x)
    assert all(torch.equal(a, b) for a, b in zip(ours, deployed))
    assert any(float(o.abs().max()) > 0 for o in ours)


def test_training_runs_conv_then_batch_statistics():
    conv_bn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 2, 1))
    _with_statistics(conv_bn, (4, 3, 8, 8))
    prepare(conv_bn, QuantConfig())
    assert isinstance(conv_bn[0], QuantConv2d) and isinstance(conv_bn[1], FoldedBatchNorm2d)
    x = torch.rand(4, 3, 8, 8)
    calibrate(conv_bn, [x])
    conv_bn.train()
    before = conv_bn[1].running_mean.clone()
    y = conv_bn[0](x)
    bn = conv_bn[1]
    assert torch.equal(bn(y), nn.functional.batch_norm(y, None, None, bn.weight, bn.bias, True, 0.0, bn.eps))
    assert not torch.equal(conv_bn[1].running_mean, before)  # training updates the statistics
    conv_bn.eval()
    assert torch.equal(conv_bn[1](y), y)  # folded into the conv in evaluation mode
    converted = convert(copy.deepcopy(conv_bn))
    assert isinstance(converted[1], nn.Identity) and "_eval_bn" not in vars(converted[0])  # folded once, for good
    with torch.no_grad():
        assert torch.equal(conv_bn(x), converted(x))
    report = layer_report(conv_bn, [x])
    assert report.rows[0].out_sqnr_db > 20  # measured against the folded float conv, not the unfolded one


def test_learned_weight_amax_is_not_paired():
    conv_bn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 2, 1))
    prepare(conv_bn, QuantConfig(learn_amax=True))
    assert type(conv_bn[1]) is nn.BatchNorm2d  # convert's fold of a learned amax is not the eval-mode fold
