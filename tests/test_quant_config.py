"""QuantConfig validation and round trip; backend quantizer behaviour and errors; prepare() errors and policy."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from qat_rep import create_model
from qat_rep.quant import NotCalibratedError, QuantConfig, convert, get_config, onnx_export_mode, prepare
from qat_rep.quant.backend import (
    PQTensorQuantizer,
    QuantConv2d,
    QuantDescriptor,
    TensorQuantizer,
    fake_tensor_quant,
    make_quantizer,
)


def test_config_round_trips_through_json():
    cfg = QuantConfig(w_bits=4, a_bits=6, w_granularity="per_tensor", calibrator="entropy", percentile=99.9,
                      calib_batches=2, skip=("linear", "stage4.*"), learn_amax=True, first_last_8bit=False,
                      unsigned_activations=True, quantize_pools=True)
    back = QuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and isinstance(back.skip, tuple)
    # an artifact written before the two ONNX Runtime options existed loads with them off
    old = {k: v for k, v in QuantConfig().to_dict().items() if k not in ("unsigned_activations", "quantize_pools")}
    assert QuantConfig.from_dict(old) == QuantConfig()


def test_onnxruntime_preset():
    cfg = QuantConfig.for_onnxruntime(w_bits=4)
    assert cfg.unsigned_activations and cfg.quantize_pools and cfg.w_bits == 4
    assert not QuantConfig().unsigned_activations and not QuantConfig().quantize_pools  # TensorRT-style default
    assert QuantConfig.for_onnxruntime(quantize_pools=False).quantize_pools is False


@pytest.mark.parametrize("kw,match", [
    (dict(w_bits=9), "w_bits must be an integer between 2 and 8, got 9"),
    (dict(a_bits=1), "a_bits must be an integer between 2 and 8, got 1"),
    (dict(w_bits=8.0), "w_bits must be an integer"),
    (dict(w_bits=True), "w_bits must be an integer"),
    (dict(w_granularity="per_row"), "w_granularity must be one of per_channel, per_tensor"),
    (dict(calibrator="kl"), "calibrator must be one of max, percentile, entropy, mse"),
    (dict(percentile=0), r"percentile must be a number in \(0, 100\]"),
    (dict(percentile=101), r"percentile must be a number in \(0, 100\]"),
    (dict(calib_batches=0), "calib_batches must be a positive integer"),
])
def test_config_rejects_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig(**kw)


def test_config_type_errors_and_unknown_keys():
    with pytest.raises(TypeError, match="skip must be a sequence of non-empty layer names"):
        QuantConfig(skip=("linear", 3))
    with pytest.raises(TypeError, match="learn_amax must be a bool"):
        QuantConfig(learn_amax="yes")
    with pytest.raises(TypeError, match="unsigned_activations must be a bool"):
        QuantConfig(unsigned_activations=1)
    with pytest.raises(ValueError, match=r"unknown QuantConfig key\(s\) \['bits'\]"):
        QuantConfig.from_dict({"bits": 8})
    with pytest.raises(TypeError, match="expects a mapping"):
        QuantConfig.from_dict([("w_bits", 8)])
    assert QuantConfig(skip="linear").skip == ("linear",)


# ------------------------------------------------------------------------------------------------ backend
@pytest.mark.parametrize("qmin,qmax", [(-127, 127), (-128, 127), (0, 255), (-8, 7)])
def test_per_tensor_fake_quant_is_bit_exact_with_torch_forward_and_backward(qmin, qmax):
    from qat_rep.quant.qmath import ClippedSTE

    g = torch.Generator().manual_seed(qmax)
    for _ in range(20):
        amax = float(torch.rand((), generator=g)) * 10 + 1e-3
        s = torch.tensor(amax / qmax, dtype=torch.float32)
        k = torch.randint(qmin - 12, qmax + 12, (500,), generator=g).float()
        # random values plus the rounding ties and clipping edges, where an implementation can differ
        x = torch.cat([torch.randn(4000, generator=g) * amax, (k + 0.5) * s, k * s]).requires_grad_()
        ref = torch.fake_quantize_per_tensor_affine(x, s, torch.zeros((), dtype=torch.int32), qmin, qmax)
        out = ClippedSTE.apply(x, s, qmin, qmax)
        grad = torch.randn(x.shape, generator=g)
        assert torch.equal(out, ref)
        assert torch.equal(torch.autograd.grad(out, x, grad)[0], torch.autograd.grad(ref, x, grad)[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["activation", "learned", "weight"])
def test_half_precision_inputs_are_quantized_on_the_float32_grid(dtype, kind):
    # under AMP (precision="bf16-mixed"/"16-mixed") activations arrive in 16 bits; x / s computed there put 14 % of
    # bf16 rounding decisions off the INT8 grid. The integers must be those float32 picks for the same values.
    g = torch.Generator().manual_seed(0)
    if kind == "weight":
        q = make_quantizer(8, axis=0, amax_shape=(16, 1, 1, 1), dynamic=True)
        x = torch.randn(16, 8, 3, 3, generator=g)
    else:
        q = make_quantizer(8, learn_amax=kind == "learned")
        q.set_amax(6.0)
        x = torch.rand(20000, generator=g) * 7.0 - 0.5  # some clipped
    x = x.to(dtype).requires_grad_()
    x32 = x.detach().float().requires_grad_()
    out, ref = q(x), q(x32)
    assert out.dtype == dtype
    assert torch.equal(out, ref.to(dtype))
    grad = torch.randn(x.shape, generator=g)
    assert torch.equal(torch.autograd.grad(out, x, grad.to(dtype))[0],
                       torch.autograd.grad(ref, x32, grad.to(dtype).float())[0].to(dtype))


def test_quantizer_matches_pytorch_quantization_fake_quant():
    x = torch.randn(1000) * 3
    for bits in (8, 5, 2):
        q = make_quantizer(bits)
        q.set_amax(2.5)
        want = fake_tensor_quant(x, torch.tensor(2.5), bits, False, False)
        torch.testing.assert_close(q(x), want, rtol=0, atol=1e-6)
    w = torch.randn(6, 3, 3, 3)
    qw = make_quantizer(4, axis=0, amax_shape=(6, 1, 1, 1), dynamic=True)
    want = fake_tensor_quant(w, w.abs().amax(dim=(1, 2, 3), keepdim=True), 4, False, False)
    torch.testing.assert_close(qw(w), want, rtol=0, atol=1e-6)
    assert torch.equal(qw.amax.flatten(), w.abs().amax(dim=(1, 2, 3)))


def test_state_dict_keys_fixed_before_and_after_calibration_and_load_on_cpu():
    a, b = make_quantizer(8), make_quantizer(8)
    assert list(a.state_dict()) == ["_amax"] and not a.is_calibrated
    a.set_amax(3.0)
    b.load_state_dict(a.state_dict())
    assert b.is_calibrated and float(b.amax) == 3.0 and b.amax.device.type == "cpu"


def test_learned_amax_gets_a_gradient_and_is_a_parameter():
    q = make_quantizer(4, learn_amax=True)
    q.set_amax(1.0)
    x = torch.randn(200, generator=torch.Generator().manual_seed(0), requires_grad=True)
    (q(x) ** 2).sum().backward()
    assert isinstance(q._amax, nn.Parameter) and q._amax.grad is not None and q._amax.grad.abs() > 0
    x.grad = None
    q(x).sum().backward()
    # 4 bits, amax 1: the grid spans [-8/7, 1]; outside it the input gets no gradient, inside it passes straight
    outside = (x > 1.0) | (x < -8 / 7)
    assert outside.any() and (x.grad[outside] == 0).all() and (x.grad[~outside] != 0).all()


def test_onnx_export_mode_restores_the_class_flag_even_on_error():
    assert PQTensorQuantizer.use_fb_fake_quant is False
    with pytest.raises(RuntimeError, match="boom"):
        with onnx_export_mode():
            assert PQTensorQuantizer.use_fb_fake_quant is True
            raise RuntimeError("boom")
    assert PQTensorQuantizer.use_fb_fake_quant is False


def test_uncalibrated_quantizer_refuses_to_quantize_or_export():
    q = make_quantizer(8, name="stem._input_quantizer")
    with pytest.raises(NotCalibratedError, match="quantizer stem._input_quantizer has no amax"):
        q(torch.randn(3))
    w = make_quantizer(8, axis=0, amax_shape=(2, 1), dynamic=True, name="fc._weight_quantizer")
    with onnx_export_mode():  # export reads the stored amax: a weight never seen is refused too
        with pytest.raises(NotCalibratedError, match="fc._weight_quantizer .*never calibrated"):
            w(torch.randn(2, 3))


@pytest.mark.parametrize("kw,match", [
    (dict(num_bits=9), "num_bits must be an integer in 2..8, got 9"),
    (dict(num_bits=8, calibrator="kl"), "unknown calibrator 'kl'"),
    (dict(num_bits=8, axis=0, calibrator="entropy", amax_shape=(2,)), "per-channel .* use calibrator='max'"),
    (dict(num_bits=8, axis=0), "a per-channel quantizer needs amax_shape"),
    (dict(num_bits=8, amax_shape=(3,)), r"a per-tensor quantizer needs amax_shape=\(\)"),
])
def test_make_quantizer_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        make_quantizer(**kw)


def test_quantizer_constructor_and_set_amax_errors():
    with pytest.raises(ValueError, match="per-channel quantizer \\(axis=0\\) needs amax_shape"):
        TensorQuantizer(QuantDescriptor(num_bits=8, axis=0))
    with pytest.raises(ValueError, match="pass learn_amax=True to qat_rep's TensorQuantizer"):
        TensorQuantizer(QuantDescriptor(num_bits=8, learn_amax=True))
    q = make_quantizer(8, axis=0, amax_shape=(4, 1, 1, 1), name="x")
    with pytest.raises(ValueError, match=r"amax for x must have 4 element\(s\)"):
        q.set_amax(torch.ones(3))
    with pytest.raises(ValueError, match="string padding 'same' is not supported"):
        QuantConv2d.from_float(nn.Conv2d(2, 2, 3, padding="same"), make_quantizer(8), make_quantizer(8))


# ------------------------------------------------------------------------------------------------ prepare policy
@pytest.mark.slow
def test_first_and_last_layer_keep_8_bits_by_default():
    m = create_model("repvgg_a0", num_classes=10, small_input=True)
    rep = prepare(m, QuantConfig(w_bits=4, a_bits=4))
    assert rep.rep_blocks["stage0"] == (8, 8) and rep.plain["linear"] == (8, 8)
    assert rep.rep_blocks["stage1.0"] == (4, 4) and len(rep) == 23
    assert m.stage1[0].rep_quant.weight_quantizer.num_bits == 4
    m2 = create_model("repvgg_a0", num_classes=10, small_input=True)
    rep2 = prepare(m2, QuantConfig(w_bits=4, a_bits=4, first_last_8bit=False, skip=("linear",)))
    assert rep2.rep_blocks["stage0"] == (4, 4) and rep2.skipped == ["linear"] and type(m2.linear) is nn.Linear
    assert get_config(m2).first_last_8bit is False


def test_skip_glob_and_unmatched_pattern_warns():
    m = create_model("qarepvgg_a0", num_classes=10, small_input=True)
    with pytest.warns(UserWarning, match="skip pattern 'stage9.\\*' matches no quantizable layer"):
        rep = prepare(m, QuantConfig(skip=("stage4.*", "stage9.*")))
    assert rep.skipped == ["stage4.0"] and m.stage4[0].rep_quant is None
    assert rep.unmatched_skip == ["stage9.*"]


def test_prepare_errors():
    with pytest.raises(ValueError, match="has no nn.Conv2d, nn.Linear or rep block to quantize"):
        prepare(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3)), QuantConfig())
    m = nn.Sequential(nn.Conv2d(3, 4, 3))
    prepare(m, QuantConfig())
    with pytest.raises(ValueError, match="already prepared"):
        prepare(m, QuantConfig())
    with pytest.raises(TypeError, match="config must be a qat_rep.quant.QuantConfig"):
        prepare(nn.Sequential(nn.Conv2d(3, 4, 3)), {"w_bits": 8})
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        prepare("resnet", QuantConfig())
    with pytest.raises(ValueError, match="skip leaves no layer to quantize"):
        prepare(nn.Sequential(nn.Conv2d(3, 4, 3)), QuantConfig(skip=("*",)))
    with pytest.raises(ValueError, match="not prepared for quantization"):
        convert(nn.Sequential(nn.Conv2d(3, 4, 3)))
    with pytest.raises(ValueError, match="was not prepared by qat_rep.quant.prepare"):
        get_config(nn.Sequential(nn.Conv2d(3, 4, 3)))


@pytest.mark.slow
def test_prepare_keeps_parameters_and_forward():
    m = create_model("qarepvgg_a0", num_classes=10, small_input=True)
    params = {id(p) for p in m.parameters()}
    fwd = type(m).forward
    prepare(m, QuantConfig())
    assert {id(p) for n, p in m.named_parameters()} == params  # same Parameter objects: optimizers stay valid
    assert type(m).forward is fwd and "forward" not in vars(m)


@pytest.mark.parametrize("skip", [None, 3, {"linear"}])
def test_skip_of_the_wrong_type_names_the_field(skip):
    """QuantConfig(skip=None) used to fail with "'NoneType' object is not iterable"."""
    with pytest.raises(TypeError, match=r"skip must be a list or tuple of layer names or globs .*\[\] for none"):
        QuantConfig(skip=skip)
