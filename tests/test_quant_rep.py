"""Equivalent-kernel QAT: the QAT form is exactly dequantize(int conv) of the equivalent kernel, gradients reach
every branch as through the explicit formula with STE, convert() is exact, frozen blocks get no gradient."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_bn
from torch import nn

from qat_rep import QARepVGGBlock, QARepVGGBlockV2, RepVGGBlock, create_model
from qat_rep.quant import QuantConfig, RepQuant, calibrate, convert, prepare, quant_layers

pytestmark = pytest.mark.usefixtures("one_thread")


BLOCKS = [
    (RepVGGBlock, dict(in_channels=8, out_channels=8)),                      # with identity BN
    (RepVGGBlock, dict(in_channels=8, out_channels=12, stride=2)),           # no identity
    (QARepVGGBlock, dict(in_channels=8, out_channels=8)),                    # post-BN + identity
    (QARepVGGBlockV2, dict(in_channels=8, out_channels=8, groups=2)),        # avg-pool branch, grouped
]


def _block(cls, kw, seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(cls(**kw))
    randomize_bn(m, torch.Generator().manual_seed(seed))
    return m


def _calibrated(cls, kw, cfg, seed=0, device="cpu"):
    m = _block(cls, kw, seed)
    prepare(m, cfg)
    m.to(device)
    x = torch.randn(4, kw["in_channels"], 10, 10, generator=torch.Generator().manual_seed(seed + 1)).to(device)
    calibrate(m, [x])
    return m, x


def _int_quant(t: torch.Tensor, amax: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    qmax = 2 ** (bits - 1) - 1
    scale = amax / qmax
    return torch.clamp(torch.round(t / scale), -qmax - 1, qmax), scale


@pytest.mark.parametrize("cls,kw", BLOCKS)
@pytest.mark.parametrize("gran,bits", [("per_channel", 8), ("per_tensor", 8), ("per_channel", 4)])
def test_qat_block_equals_dequantized_integer_conv(cls, kw, gran, bits, device):
    cfg = QuantConfig(w_bits=bits, a_bits=bits, w_granularity=gran, first_last_8bit=False)
    m, x = _calibrated(cls, kw, cfg, device=device)
    block = m[0]
    block.eval()
    with torch.no_grad():
        got = block(x)
        # hand computation from the block's own branch parameters, through fuse math written out here
        k, b = block.equivalent_kernel_bias()
        t = None
        if getattr(block, "bn", None) is not None:
            bn = block.bn
            t = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            k = k * t.reshape(-1, 1, 1, 1)
            b = (b - bn.running_mean) * t + bn.bias
        w_amax = k.abs().amax(dim=(1, 2, 3)) if gran == "per_channel" else k.abs().amax().expand(k.shape[0])
        k_int, s_w = _int_quant(k, w_amax.reshape(-1, 1, 1, 1), bits)
        x_amax = block.rep_quant.input_quantizer.amax
        x_int, s_x = _int_quant(x, x_amax, bits)
        step = s_x.double() * s_w.double().flatten()  # the int32 accumulator's scale, per output channel
        b_int = torch.round(b.double() / step)  # the bias as the INT8 runtime adds it: int32 on that grid
        acc = F.conv2d(x_int.double(), k_int.double(), None, block.stride, 1, 1, block.groups)
        acc = acc + b_int.reshape(1, -1, 1, 1)
        assert torch.equal(acc, acc.round())  # integer arithmetic, exactly
        want = F.relu(acc * step.reshape(1, -1, 1, 1))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert x_int.abs().max() <= 2 ** (bits - 1) and not torch.equal(got, F.relu(block.branches(x)))


def _explicit_forward(block, x, x_amax, w_bits, a_bits, per_channel, train_post_bn):
    """RepVGG/QARep equivalent kernel written out from the parameters, with STE fake quant, as the reference."""
    def fold(w, bn):
        t = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        return w * t.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * t

    def ste(k, amax, bits=w_bits):
        s = amax / (2 ** (bits - 1) - 1)
        return k + (torch.clamp(torch.round(k / s), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * s - k).detach()

    xq = ste(x, x_amax, a_bits).detach()
    k3, b = fold(block.rbr_dense.conv.weight, block.rbr_dense.bn)
    if isinstance(block, QARepVGGBlock):
        k1 = block.rbr_1x1.weight
    else:
        k1, b1 = fold(block.rbr_1x1.conv.weight, block.rbr_1x1.bn)
        b = b + b1
    # the 1x1 and identity branches live on the centre tap: summed there first, then added to the 3x3 kernel.
    # (The same order as the implementation: rounding is discontinuous, so a one-ulp difference in K from another
    # summation order can move a quantized weight or bias by one step and the ReLU mask with it.)
    centre = k1
    if block.rbr_identity is not None:
        eye = torch.zeros_like(k1)
        for i in range(block.out_channels):
            eye[i, i % (block.in_channels // block.groups), 0, 0] = 1.0
        if isinstance(block, QARepVGGBlock):
            centre = centre + eye
        else:
            kid, bid = fold(eye, block.rbr_identity)
            centre, b = centre + kid, b + bid
    k = k3 + F.pad(centre, [1, 1, 1, 1])
    if isinstance(block, QARepVGGBlock) and per_channel:
        # Q(K·t) = t·Q(K) for per-channel amax: quantize K, then the real post-BN
        amax = k.detach().abs().amax(dim=(1, 2, 3), keepdim=True)
        y = F.conv2d(xq, ste(k, amax), b, block.stride, 1, 1, block.groups)
        bn = block.bn
        y = F.batch_norm(y, bn.running_mean.clone(), bn.running_var.clone(), bn.weight, bn.bias, train_post_bn,
                         0.0, bn.eps)
    elif isinstance(block, QARepVGGBlock):
        # per-tensor: the post-BN scale t is folded into the kernel before quantization and divided out after
        bn = block.bn
        t = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        kt = k * t.reshape(-1, 1, 1, 1)
        amax = kt.detach().abs().amax()
        y = F.conv2d(xq, ste(kt, amax), None, block.stride, 1, 1, block.groups) / t.reshape(1, -1, 1, 1)
        y = y + b.reshape(1, -1, 1, 1)
        y = F.batch_norm(y, bn.running_mean.clone(), bn.running_var.clone(), bn.weight, bn.bias, train_post_bn,
                         0.0, bn.eps)
    else:
        amax = k.detach().abs().amax(dim=(1, 2, 3), keepdim=True) if per_channel else k.detach().abs().amax()
        # the bias on the int32 grid s_x·s_w (what the INT8 runtime adds), straight-through
        step = (x_amax / (2 ** (a_bits - 1) - 1)) * (amax.flatten() / (2 ** (w_bits - 1) - 1))
        b = b + (torch.round(b / step) * step - b).detach()
        # in training the bias is added after the conv (as the implementation does): a ReLU mask at a tie
        # depends on that float order
        y = F.conv2d(xq, ste(k, amax), None, block.stride, 1, 1, block.groups) + b.reshape(1, -1, 1, 1)
    return F.relu(y)


@pytest.mark.parametrize("cls,kw", BLOCKS[:3])
@pytest.mark.parametrize("gran", ["per_channel", "per_tensor"])
def test_branch_gradients_equal_explicit_ste_formula(cls, kw, gran, device):
    cfg = QuantConfig(w_bits=4, a_bits=8, w_granularity=gran, first_last_8bit=False)
    m, x = _calibrated(cls, kw, cfg, seed=3, device=device)
    block = m[0]
    block.train()
    g = torch.randn(block(x).shape, generator=torch.Generator().manual_seed(7)).to(device)
    params = [p for n, p in block.named_parameters() if "rep_quant" not in n]
    assert len(params) >= 4
    ref_block = copy.deepcopy(block)  # before the forward: a train-mode forward updates the post-BN statistics
    loss = (block(x) * g).sum()
    got = torch.autograd.grad(loss, params)
    ref_params = [p for n, p in ref_block.named_parameters() if "rep_quant" not in n]
    ref = _explicit_forward(ref_block, x, block.rep_quant.input_quantizer.amax, 4, 8, gran == "per_channel", True)
    want = torch.autograd.grad((ref * g).sum(), ref_params)
    for (name, _), a, b in zip([(n, p) for n, p in block.named_parameters() if "rep_quant" not in n], got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda s, name=name: f"gradient of {name}: {s}")
        assert a.abs().sum() > 0, name


def test_branch_bn_running_stats_frozen_in_qat_post_bn_still_tracks():
    m, x = _calibrated(QARepVGGBlock, dict(in_channels=8, out_channels=8), QuantConfig())
    block = m[0]
    block.train()
    before_branch = block.rbr_dense.bn.running_mean.clone()
    before_post = block.bn.running_mean.clone()
    block(x)
    assert torch.equal(block.rbr_dense.bn.running_mean, before_branch)
    assert not torch.equal(block.bn.running_mean, before_post)


def test_frozen_phase_gives_no_branch_gradient_and_keeps_parameters():
    torch.manual_seed(0)
    m = nn.Sequential(RepVGGBlock(8, 8), nn.Conv2d(8, 4, 1))
    randomize_bn(m, torch.Generator().manual_seed(0))
    prepare(m, QuantConfig())
    x = torch.randn(4, 8, 10, 10)
    calibrate(m, [x])
    block = m[0]
    names_before = [n for n, _ in m.named_parameters()]
    block.rep_quant.phase = "frozen"
    m.train()
    y_frozen = m(x)
    y_frozen.sum().backward()
    assert all(p.grad is None for p in block.parameters())
    assert m[1].weight.grad is not None
    assert [n for n, _ in m.named_parameters()] == names_before
    block.rep_quant.phase = "qat"
    y_qat = m(x)
    torch.testing.assert_close(y_frozen, y_qat)
    y_qat.sum().backward()
    assert block.rbr_dense.conv.weight.grad is not None


def test_float_phase_is_the_float_multi_branch_block():
    ref = _block(QARepVGGBlockV2, dict(in_channels=8, out_channels=8), seed=5)
    m, x = _calibrated(QARepVGGBlockV2, dict(in_channels=8, out_channels=8), QuantConfig(), seed=5)
    m[0].rep_quant.phase = "float"
    m.eval(), ref.eval()
    torch.testing.assert_close(m(x), ref(x), rtol=0, atol=0)


@pytest.mark.parametrize("cls,kw", BLOCKS)
@pytest.mark.parametrize("gran", ["per_channel", "per_tensor"])
def test_convert_matches_qat_form_per_block(cls, kw, gran, device):
    m, x = _calibrated(cls, kw, QuantConfig(w_granularity=gran, w_bits=6, a_bits=6, first_last_8bit=False),
                       device=device)
    m.eval()
    with torch.no_grad():
        y_qat = m(x)
        convert(m)
        y_conv = m(x)
    block = m[0]
    assert block.fused and block.rep_quant is None and getattr(block, "bn", None) is None
    assert not any(n.startswith("rbr_dense") or n.startswith("rbr_1x1") for n, _ in block.named_parameters())
    torch.testing.assert_close(y_conv, y_qat, rtol=1e-5, atol=1e-5 * float(y_qat.abs().max()))


@pytest.mark.slow
def test_convert_model_state_dict_keys_rebuildable_and_outputs_agree():
    torch.manual_seed(0)
    m = create_model("qarepvgg_a0", num_classes=10, small_input=True)
    randomize_bn(m, torch.Generator().manual_seed(0))
    cfg = QuantConfig()
    prepare(m, cfg)
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    calibrate(m, [x])
    m.eval()
    with torch.no_grad():
        y_qat = m(x)
        convert(m)
        y_conv = m(x)
    # rounding flips from ~1e-7 float differences may move single values by one step; the bulk must agree
    close = torch.isclose(y_conv, y_qat, rtol=1e-4, atol=1e-4 * float(y_qat.abs().max()))
    assert close.float().mean() > 0.9
    assert torch.equal(y_conv.argmax(1), y_qat.argmax(1))
    # a fresh model rebuilt from architecture + config only (uncalibrated) loads the converted state dict strictly
    fresh = create_model("qarepvgg_a0", num_classes=10, small_input=True)
    prepare(fresh, cfg)
    convert(fresh)
    fresh.load_state_dict(m.state_dict(), strict=True)
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), y_conv)
    assert len(quant_layers(fresh)) == 23 and not any(isinstance(q, RepQuant) for _, q in quant_layers(fresh))


def test_prepared_state_dict_keys_depend_only_on_architecture_and_config():
    cfg = QuantConfig(w_bits=4, skip=("linear",))
    a = create_model("repvgg_a0", num_classes=10, small_input=True)
    b = create_model("repvgg_a0", num_classes=10, small_input=True)
    prepare(a, cfg)
    prepare(b, cfg)
    calibrate(a, [torch.randn(2, 3, 16, 16)])
    assert list(a.state_dict()) == list(b.state_dict())
    b.load_state_dict(a.state_dict(), strict=True)
    a.eval(), b.eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(a(x), b(x))
    assert "stage0.rep_quant._input_quantizer._amax" in a.state_dict()
    assert isinstance(a.linear, nn.Linear) and type(a.linear) is nn.Linear


@pytest.mark.slow
def test_plain_conv_bn_folded_at_convert_efficientrep():
    torch.manual_seed(0)
    m = create_model("efficientrep_n", small_input=True, block="qarepvgg")
    randomize_bn(m, torch.Generator().manual_seed(0))
    for mod in m.modules():  # keep activations alive through the random BNs
        if isinstance(mod, nn.BatchNorm2d):
            mod.weight.data.abs_().add_(0.5)
    prepare(m, QuantConfig())
    x = torch.randn(2, 3, 32, 32)
    calibrate(m, [x])
    m.eval()
    with torch.no_grad():
        ref = m(x)
        convert(m)
        got = m(x)
    assert isinstance(m.ERBlock_5[2].cv1.bn, nn.Identity)
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in m.modules())
    for a, b in zip(got, ref):
        rel = float((a - b).abs().max() / b.abs().max())
        assert rel < 0.05, rel


def test_rep_quant_phase_rejects_unknown():
    m, _ = _calibrated(RepVGGBlock, dict(in_channels=8, out_channels=8), QuantConfig())
    with pytest.raises(ValueError, match="phase must be one of float, qat, frozen, fused"):
        m[0].rep_quant.phase = "fuse"
