"""Calibration: agreement with pytorch-quantization (max/percentile/entropy), CPU MSE vs brute force, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from qat_rep import QARepVGGBlock, create_model
from qat_rep.quant import (
    DegenerateCalibrationError,
    NotCalibratedError,
    QuantConfig,
    calibrate,
    check_calibrated,
    histogram_mse_amax,
    is_calibrated,
    prepare,
    quantizers,
)
from qat_rep.quant.backend import (  # pytorch-quantization's own functions: the references under test
    HistogramCalibrator,
    MaxCalibrator,
    fake_tensor_quant,
    pq_compute_amax_entropy,
    pq_compute_amax_mse,
)
from qat_rep.quant.calibrate import compute_amax, histogram_entropy_amax

pytestmark = pytest.mark.usefixtures("one_thread")


def _small_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(QARepVGGBlock(3, 8, stride=2), QARepVGGBlock(8, 8), nn.Flatten(), nn.Linear(8 * 8 * 8, 5))


def _batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 16, 16, generator=g) * (i + 1), torch.zeros(4)) for i in range(n)]


def _captured_inputs(model, batches):
    """Every quantizer's input on the float model, captured independently of qat_rep's calibration."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for _, q in quantizers(model):
        q.disable()  # the float model: weights unquantized too, as during calibration
    for name, q in quantizers(model, "input"):
        hooks.append(q.register_forward_pre_hook(lambda m, a, name=name: seen.setdefault(name, []).append(a[0])))
    model.eval()
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    for h in hooks:
        h.remove()
    for _, q in quantizers(model):
        q.enable()
    return seen


@pytest.mark.parametrize("method", ["max", "percentile"])
def test_calibrate_agrees_with_pytorch_quantization_calibrators(method):
    model = _small_model()
    prepare(model, QuantConfig(calibrator=method, percentile=99.9, calib_batches=3))
    batches = _batches()
    seen = _captured_inputs(model, batches)
    report = calibrate(model, batches)
    assert report.batches == 3 and len(report.amax) == 3
    for name, q in quantizers(model, "input"):
        if method == "max":
            ref = MaxCalibrator(8, None, False)
        else:
            ref = HistogramCalibrator(8, None, False)
        for x in seen[name]:
            ref.collect(x)
        want = ref.compute_amax() if method == "max" else ref.compute_amax("percentile", percentile=99.9)
        assert float(q.amax) == pytest.approx(float(want), rel=1e-6), name
    assert is_calibrated(model)


@pytest.mark.parametrize("seed,bits", [(0, 8), (1, 6), (2, 4)])
def test_entropy_equals_pytorch_quantization(seed, bits):
    g = torch.Generator().manual_seed(seed)
    cal = HistogramCalibrator(bits, None, False, num_bins=300)
    cal.collect(torch.relu(torch.randn(20000, generator=g)) ** 1.5)
    cal.collect(torch.relu(torch.randn(20000, generator=g)) * 3)  # grows the histogram
    hist, edges = cal._calib_hist.int().numpy(), cal._calib_bin_edges.numpy()
    want = pq_compute_amax_entropy(hist.copy(), edges, bits, False, 1, 128)
    got = histogram_entropy_amax(hist, edges, bits)
    assert float(got) == float(want)


def test_mse_equals_pytorch_quantization_search_with_cuda_patched(monkeypatch):
    g = torch.Generator().manual_seed(0)
    cal = HistogramCalibrator(8, None, False, num_bins=512)
    x = torch.cat([torch.randn(30000, generator=g).abs(), torch.rand(30, generator=g) * 25])
    cal.collect(x)
    hist, edges = cal._calib_hist.int().numpy(), cal._calib_bin_edges.numpy()
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)  # the library's only CUDA use
    want = pq_compute_amax_mse(hist, edges, 8, False)
    monkeypatch.undo()
    got = histogram_mse_amax(hist, edges, 8)
    assert float(got) == pytest.approx(float(want), rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [8, 4])
def test_mse_histogram_search_agrees_with_brute_force_on_raw_data(bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.distributions.Laplace(0.0, 1.0).sample((40000,)).abs()  # heavy tail: clipping pays off
    cal = HistogramCalibrator(bits, None, False)
    cal.collect(x)
    hist, edges = cal._calib_hist.int().numpy(), cal._calib_bin_edges.numpy()
    got = float(histogram_mse_amax(hist, edges, bits))

    def mse(a):
        return float(((fake_tensor_quant(x, torch.tensor(a), bits, False, False) - x) ** 2).mean())

    grid = np.linspace(float(x.max()) * 0.05, float(x.max()), 3000)
    errors = [mse(a) for a in grid]
    assert got < 0.9 * float(x.max())  # a real search: the optimum clips the tail
    assert mse(got) <= min(errors) * 1.02
    assert mse(float(x.max())) > min(errors) * 1.1  # and clipping mattered, so the check above can fail
    del g


@pytest.mark.slow
def test_mse_and_entropy_calibrate_end_to_end_on_cpu():
    for method in ("mse", "entropy"):
        model = _small_model()
        prepare(model, QuantConfig(calibrator=method))
        calibrate(model, _batches(2))
        amax = [float(q.amax) for _, q in quantizers(model, "input")]
        assert all(0 < a < float("inf") for a in amax)
        assert is_calibrated(model)


def test_compute_amax_returns_zero_for_all_zero_activations():
    """The statistic of all-zero inputs is amax 0 — which calibrate() then refuses, naming the layer."""
    model = nn.Sequential(nn.Linear(4, 2))
    prepare(model, QuantConfig(calibrator="percentile"))
    with pytest.raises(DegenerateCalibrationError, match="input of layer '0' calibrated to amax 0"):
        calibrate(model, [torch.zeros(3, 4)])
    assert float(model[0]._input_quantizer.amax) == 0.0


def test_calibration_restores_mode_flags_and_does_not_touch_bn_stats():
    model = _small_model()
    prepare(model, QuantConfig())
    model.train()
    before = model[0].rbr_dense.bn.running_mean.clone()
    calibrate(model, _batches(1))
    assert model.training
    assert torch.equal(model[0].rbr_dense.bn.running_mean, before)
    assert all(q._if_quant and not q._if_calib for _, q in quantizers(model))


def test_calibrate_reads_at_most_calib_batches_from_a_generator():
    model = _small_model()
    prepare(model, QuantConfig(calib_batches=2))
    consumed = []

    def gen():
        for i, b in enumerate(_batches(5)):
            consumed.append(i)
            yield b

    assert calibrate(model, gen()).batches == 2
    assert consumed == [0, 1]


def test_custom_forward_for_multi_input_models():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x, y):
            return self.a(x) + self.b(y)

    model = Two()
    prepare(model, QuantConfig())
    batch = {"x": torch.randn(2, 3), "y": torch.randn(2, 3) * 10}
    calibrate(model, [batch], forward=lambda m, b: m(b["x"], b["y"]))
    assert float(model.b._input_quantizer.amax) == pytest.approx(float(batch["y"].abs().max()))


# ------------------------------------------------------------------------------------------------ errors
def test_empty_calibration_iterable_is_a_clear_error_and_restores_state():
    model = _small_model()
    prepare(model, QuantConfig())
    with pytest.raises(ValueError, match="no batches: the iterable is empty"):
        calibrate(model, [])
    assert not is_calibrated(model)
    assert all(q._if_quant and not q._if_calib for _, q in quantizers(model))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_activation_names_the_layer(bad):
    model = _small_model()
    prepare(model, QuantConfig())
    with torch.no_grad():
        model[1].rbr_dense.conv.weight[0, 0, 0, 0] = bad  # poisons the input of the classifier
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"non-finite activation \(NaN or inf\) at the input of layer '3'"):
        calibrate(model, [x])


def test_non_finite_input_names_the_first_layer():
    model = _small_model()
    prepare(model, QuantConfig())
    x = torch.randn(2, 3, 16, 16)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="input of layer '0.rep_quant'"):
        calibrate(model, [x])


def test_uncalibrated_forward_raises_naming_the_quantizer():
    model = create_model("qarepvgg_a0", num_classes=10, small_input=True)
    prepare(model, QuantConfig())
    with pytest.raises(NotCalibratedError, match=r"quantizer stage0\.rep_quant\._input_quantizer .*never calibrated"):
        model(torch.randn(1, 3, 16, 16))


def test_calibrate_rejects_unprepared_model_and_bad_config():
    with pytest.raises(ValueError, match="not prepared"):
        calibrate(nn.Sequential(nn.Linear(2, 2)), [torch.randn(1, 2)])
    model = nn.Sequential(nn.Linear(2, 2))
    prepare(model, QuantConfig())
    with pytest.raises(TypeError, match="config must be a QuantConfig"):
        calibrate(model, [torch.randn(1, 2)], config={"w_bits": 8})


def test_histogram_helpers_reject_malformed_histograms():
    with pytest.raises(ValueError, match=r"len\(edges\) == len\(hist\) \+ 1"):
        histogram_mse_amax(np.ones(10), np.arange(10), 8)
    with pytest.raises(ValueError, match=r"len\(edges\) == len\(hist\) \+ 1"):
        histogram_entropy_amax(np.ones(10), np.arange(10), 8)


def test_compute_amax_rejects_unknown_method():
    model = nn.Sequential(nn.Linear(2, 2))
    prepare(model, QuantConfig(calibrator="percentile"))
    q = model[0]._input_quantizer
    q._calibrator.collect(torch.randn(10))
    with pytest.raises(ValueError, match="unknown calibration method 'kl'"):
        compute_amax(q, "kl")


# ------------------------------------------------------------------------------------------------ unsigned activations
def test_unsigned_activations_are_decided_by_the_data_and_quantize_to_0_255():
    model = _small_model()
    prepare(model, QuantConfig(unsigned_activations=True))
    x = torch.randn(8, 3, 16, 16)
    calibrate(model, [x])
    flags = {n: q.unsigned for n, q in quantizers(model, "input")}
    assert flags == {"0.rep_quant._input_quantizer": False,  # the signed image
                     "1.rep_quant._input_quantizer": True,  # ReLU outputs
                     "3._input_quantizer": True}
    q = model[1].rep_quant.input_quantizer
    amax = float(q.amax)
    y = torch.linspace(-0.5 * amax, 1.5 * amax, 1001)
    step = amax / 255  # the unsigned 8-bit grid: twice as fine as the signed one
    expected = torch.clamp(torch.round(y / step), 0, 255) * step
    assert torch.allclose(q(y), expected, rtol=0, atol=1e-6 * amax)
    # the same input calibrated without the option: the signed TensorRT range
    signed = _small_model()
    prepare(signed, QuantConfig())
    calibrate(signed, [x])
    assert not any(q.unsigned for _, q in quantizers(signed, "input"))
    assert [float(q.amax) for _, q in quantizers(signed, "input")] == \
        [float(q.amax) for _, q in quantizers(model, "input")]  # max calibration: the same amax either way


def test_nonnegative_image_is_unsigned_and_negative_data_turns_a_flag_back():
    model = _small_model()
    prepare(model, QuantConfig(unsigned_activations=True))
    calibrate(model, [torch.rand(8, 3, 16, 16)])  # images in [0, 1]
    assert all(q.unsigned for _, q in quantizers(model, "input"))
    calibrate(model, [torch.randn(8, 3, 16, 16)])  # recalibration on signed data
    assert not model[0].rep_quant.input_quantizer.unsigned


@pytest.mark.slow
def test_unsigned_flag_travels_with_the_state_dict_and_entropy_uses_it():
    model = _small_model()
    prepare(model, QuantConfig(unsigned_activations=True, calibrator="entropy"))
    torch.manual_seed(3)
    x = torch.randn(16, 3, 16, 16) ** 3  # heavy tails: the entropy threshold is not simply the max
    calibrate(model, [x])
    keys = [k for k in model.state_dict() if k.endswith("_unsigned_flag")]
    assert len(keys) == 3
    fresh = _small_model(seed=1)
    prepare(fresh, QuantConfig(unsigned_activations=True, calibrator="entropy"))
    fresh.load_state_dict(model.state_dict())
    assert [q.unsigned for _, q in quantizers(fresh, "input")] == [False, True, True]
    model.eval(), fresh.eval()
    assert torch.equal(model(x), fresh(x))
    # entropy calibration searched 256 unsigned levels for the ReLU outputs, not 128 signed ones
    q = model[1].rep_quant.input_quantizer
    assert q.unsigned and q.num_bits == 8
    signed = _small_model()
    prepare(signed, QuantConfig(calibrator="entropy"))
    calibrate(signed, [x])
    assert float(q.amax) == pytest.approx(14.2547, abs=1e-3)  # measured: 14.25 unsigned, 15.12 signed
    assert float(signed[1].rep_quant.input_quantizer.amax) == pytest.approx(15.1236, abs=1e-3)


def test_set_unsigned_needs_the_option():
    model = _small_model()
    prepare(model, QuantConfig())
    q = model[1].rep_quant.input_quantizer
    assert not q.auto_unsigned
    with pytest.raises(ValueError, match="unsigned_activations"):
        q.set_unsigned(True)
    assert not any(k.endswith("_unsigned_flag") for k in model.state_dict())  # keys unchanged by default


def test_quantize_pools_wraps_average_pools_and_calibrates_them():
    from qat_rep.quant.backend import QuantAvgPool

    model = create_model("repvgg_a0", num_classes=10, small_input=True)
    report = prepare(model, QuantConfig.for_onnxruntime(a_bits=4))
    assert isinstance(model.gap, QuantAvgPool) and report.pools == {"gap": 8}  # feeds the 8-bit classifier
    assert "gap: pool input A8" in str(report)
    calibrate(model, [torch.randn(4, 3, 32, 32)])
    q = model.gap._input_quantizer
    assert q.is_calibrated and q.unsigned
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        step = float(q.amax) / 255
        expected = (torch.clamp(torch.round(feats / step), 0, 255) * step).mean(dim=(2, 3), keepdim=True)
        assert torch.allclose(model.gap(feats), expected, atol=1e-6)  # pool of the UINT8-quantized features
        assert not torch.allclose(model.gap(feats), feats.mean(dim=(2, 3), keepdim=True), atol=1e-6)
    skipped = create_model("repvgg_a0", num_classes=10, small_input=True)
    report = prepare(skipped, QuantConfig(quantize_pools=True, skip=("gap",)))
    assert report.pools == {} and "gap" in report.skipped and type(skipped.gap) is nn.AdaptiveAvgPool2d


def test_all_zero_calibration_is_refused_naming_the_layer():
    """Zeros gave amax 0 at every input: save/export then wrote QuantizeLinear scale 0 and ORT output zeros."""
    model = _small_model()
    prepare(model, QuantConfig())
    with pytest.raises(DegenerateCalibrationError, match=r"input of layer '0.rep_quant' calibrated to amax 0 .*"
                                                         r"all zero or constant"):
        calibrate(model, [torch.zeros(2, 3, 16, 16)])


@pytest.mark.parametrize("calibrator", ["percentile", "entropy", "mse"])
def test_all_zero_calibration_is_refused_for_histogram_methods(calibrator):
    model = _small_model()
    prepare(model, QuantConfig(calibrator=calibrator))
    with pytest.raises(DegenerateCalibrationError, match="input of layer '0.rep_quant'"):
        calibrate(model, [torch.zeros(2, 3, 16, 16)])


def test_dict_batch_gets_a_clear_error():
    model = _small_model()
    prepare(model, QuantConfig())
    with pytest.raises(TypeError, match=r"got a dict batch with keys \['image', 'label'\]; pass forward=lambda"):
        calibrate(model, [{"image": torch.randn(2, 3, 16, 16), "label": torch.zeros(2)}])
    report = calibrate(model, [{"image": torch.randn(2, 3, 16, 16)}], forward=lambda m, b: m(b["image"]))
    assert report.batches == 1 and is_calibrated(model)


def _calibrated():
    model = _small_model()
    prepare(model, QuantConfig())
    calibrate(model, [torch.randn(4, 3, 16, 16)])
    return model


@pytest.mark.parametrize("value, match", [
    (0.0, r"input of layer '3' calibrated to amax 0"),
    (1e-12, r"input of layer '3' calibrated to amax 1e-12"),
    (-1.0, r"input quantizer of layer '3' holds a negative amax"),
    (float("inf"), r"input quantizer of layer '3' holds a non-finite amax"),
    (float("nan"), r"input quantizer of layer '3' was never calibrated"),
])
def test_check_calibrated_refuses_degenerate_amax(value, match):
    model = _calibrated()
    assert check_calibrated(model) == 6
    model[3]._input_quantizer.set_amax(value)
    with pytest.raises(DegenerateCalibrationError, match=match):
        check_calibrated(model)
    assert issubclass(DegenerateCalibrationError, ValueError)


def test_check_calibrated_weight_channels():
    """A weight channel may have amax 0 only where its weights are all zero (a pruned channel quantizes exactly)."""
    model = _calibrated()
    lin = model[3]
    with torch.no_grad():
        lin.weight[2].zero_()
        lin._weight_quantizer.set_amax(lin._weight_quantizer.reduce_amax(lin.weight))
    assert float(lin._weight_quantizer._amax.flatten()[2]) == 0.0
    check_calibrated(model)  # accepted
    with torch.no_grad():
        amax = lin._weight_quantizer._amax.clone().flatten()
        amax[1] = 0.0  # channel 1 has non-zero weights
        lin._weight_quantizer.set_amax(amax.reshape(lin._weight_quantizer._amax.shape))
    with pytest.raises(DegenerateCalibrationError, match=r"weight quantizer of layer '3' has amax below .* channel\(s\) "
                                                         r"\[1\] whose weights are not zero"):
        check_calibrated(model)
