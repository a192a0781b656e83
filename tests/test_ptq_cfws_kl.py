"""CFWS split and module, improved-KL calibrator, ONNX export of a CFWS conv."""

from __future__ import annotations

import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from helpers import BNRanges, randomize_bn
from qat_rep.blocks import RepVGGBlock
from qat_rep.ptq.cfws import CFWSConv2d, cfws_split
from qat_rep.ptq.kl import Histogram, amax_from_histogram, histogram_quant_mse, improved_kl_amax
from qat_rep.quant.qmath import fake_quant, qbound
from qat_rep.quant import backend

pytestmark = pytest.mark.usefixtures("one_thread")


def _repvgg_kernel(seed: int = 0, cin: int = 16, cout: int = 16) -> torch.Tensor:
    """A fused RepVGG kernel with randomized BN statistics (large, channel-varying centre taps)."""
    torch.manual_seed(seed)
    # small variances → big fused identity/1x1 taps (the RepVGG failure)
    blk = randomize_bn(RepVGGBlock(cin, cout), ranges=BNRanges(mean=(-1, 1), var=(0.01, 0.2), weight=(0.5, 2.0)))
    return blk.eval().equivalent_kernel_bias()[0].detach()


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("bits", [8, 6, 4])
def test_cfws_split_sums_to_kernel_and_coarse_is_exact(per_channel: bool, bits: int) -> None:
    w = _repvgg_kernel()
    s = cfws_split(w, bits, per_channel)
    # the halves add back to the kernel up to one float rounding of the subtraction
    assert float((s.coarse_3x3() + s.fine - w).abs().max()) <= 2 * torch.finfo(w.dtype).eps * float(w.abs().max())
    # the outer taps live entirely in the fine part
    outer = torch.ones(3, 3, dtype=torch.bool)
    outer[1, 1] = False
    assert torch.equal(s.fine[:, :, outer], w[:, :, outer])
    # the coarse part round-trips through the quantizer exactly, in our simulation and in the backend's quantizer
    assert torch.equal(fake_quant(s.coarse, s.coarse_amax, bits), s.coarse)
    axis, shape = (0, (w.shape[0], 1, 1, 1)) if per_channel else (None, ())
    q = backend.make_quantizer(bits, axis, amax_shape=shape)
    q.set_amax(s.coarse_amax)
    assert torch.equal(q(s.coarse), s.coarse)
    # centre residual is at most half a coarse step
    step = s.coarse_amax / qbound(bits)
    assert bool((s.fine[:, :, 1:2, 1:2].abs() <= step / 2 + 1e-7).all())


def test_cfws_reduces_per_tensor_weight_error_on_repvgg_kernels() -> None:
    w = _repvgg_kernel(1)
    plain = fake_quant(w, w.abs().max(), 6)
    s = cfws_split(w, 6, per_channel=False)
    split = s.coarse_3x3() + fake_quant(s.fine, s.fine_amax, 6)
    err_plain = float((plain - w).pow(2).sum())
    err_split = float((split - w).pow(2).sum())
    assert err_split < 0.25 * err_plain


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cfws_fine_range_mse_clips_the_fine_part_and_lowers_its_error_at_6_bits(seed: int) -> None:
    # one scale per tensor for the fine part: the paper's max|W_fine| lets the largest outer tap set every channel's
    # step; the MSE range clips it and the split kernel is closer to the float one
    w = _repvgg_kernel(seed)
    by_max, by_mse = cfws_split(w, 6, False, "max"), cfws_split(w, 6, False, "mse")
    assert torch.equal(by_max.fine, by_mse.fine) and torch.equal(by_max.coarse, by_mse.coarse)
    assert float(by_max.fine_amax) == float(by_max.fine.abs().max())
    assert float(by_mse.fine_amax) < float(by_max.fine_amax)

    def err(s) -> float:
        return float((s.coarse_3x3() + fake_quant(s.fine, s.fine_amax, 6) - w).pow(2).sum())

    assert err(by_mse) < err(by_max)
    with pytest.raises(ValueError, match="fine_range"):
        cfws_split(w, 6, False, "percentile")


def test_cfws_split_rejects_non_3x3_kernels() -> None:
    with pytest.raises(ValueError, match="3x3"):
        cfws_split(torch.randn(4, 4, 1, 1))


def test_cfws_conv_rejects_unsupported_convs() -> None:
    with pytest.raises(ValueError, match="padding 1"):
        CFWSConv2d.from_conv(nn.Conv2d(4, 4, 3, padding=0))


def _cfws_conv(stride: int = 1) -> tuple[nn.Conv2d, CFWSConv2d]:
    torch.manual_seed(3)
    conv = nn.Conv2d(16, 16, 3, stride, 1)
    conv.weight.data.copy_(_repvgg_kernel(2))
    m = CFWSConv2d.from_conv(conv)
    m.load_split(conv.weight.detach(), conv.bias.detach(), input_amax=3.0)
    return conv, m.eval()


@pytest.mark.parametrize("stride", [1, 2])
def test_cfws_conv_matches_float_conv(stride: int) -> None:
    conv, m = _cfws_conv(stride)
    assert float((m.float_weight() - conv.weight).abs().max()) <= 1e-6 * float(conv.weight.abs().max())
    x = torch.randn(2, 16, 9, 9).clamp(-3, 3)
    with torch.no_grad():
        ref, got = conv(x), m(x)
    assert got.shape == ref.shape
    assert float((got - ref).pow(2).mean() / ref.pow(2).mean()) < 1e-3


def test_cfws_conv_exports_to_qdq_onnx_that_onnxruntime_runs() -> None:
    _, m = _cfws_conv()
    x = torch.randn(1, 16, 8, 8).clamp(-3, 3)
    buf = io.BytesIO()
    with backend.onnx_export_mode():
        torch.onnx.export(m, (x,), buf, opset_version=13, dynamo=False, input_names=["x"], output_names=["y"])
        with torch.no_grad():
            ref = m(x).numpy()
    model = onnx.load_from_string(buf.getvalue())
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Conv") == 2 and ops.count("Add") == 1
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    for conv in [n for n in model.graph.node if n.op_type == "Conv"]:
        # input and weight of both convs are dequantized INT8 (the exporter shares the one input QDQ)
        assert producer[conv.input[0]] == "DequantizeLinear" and producer[conv.input[1]] == "DequantizeLinear"
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x.numpy()})[0]
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max() + 1e-5


def _hist(counts: torch.Tensor) -> Histogram:
    return Histogram(counts.to(torch.float64), torch.linspace(0, counts.numel(), counts.numel() + 1,
                                                              dtype=torch.float64))


def test_improved_kl_picks_the_end_of_the_data() -> None:
    # uniform over the first 512 of 2048 bins, nothing above: any threshold >= 512 reproduces P (KL 0), a smaller
    # one clips the body into its last bin; the first minimum is the end of the data
    c = torch.zeros(2048)
    c[:512] = 100.0
    assert improved_kl_amax(_hist(c), num_bits=8) == 512.0


def test_improved_kl_keeps_a_dense_tail() -> None:
    # the same body plus a tail of 1 count per bin up to the end: clipping anywhere piles the tail into one bin,
    # while the full range (16 bins per level, aligned with the body) reproduces P exactly
    c = torch.zeros(2048)
    c[:512] = 100.0
    c[512:] = 1.0
    assert improved_kl_amax(_hist(c), num_bits=8) == 2048.0


def test_improved_kl_counts_clipped_outliers_that_land_in_an_empty_bin() -> None:
    # body [0, 512), a gap, 10 outlier counts at [1500, 1510). A threshold inside the gap folds the outliers into
    # a bin where the float histogram is empty. (This test used to expect 513, i.e. the outliers clipped: that was
    # the calibrator ignoring the clipped mass — KL over both-non-zero bins dropped the tail bin, and P and Q were
    # normalized over different supports, so the "divergence" could go negative. On real activations that clipped
    # ReLU outputs at ~40 % of their range and cost RepVGG 17 points at W8A8.) Now the tail bin is compared to its
    # level's mass: any clipping of the outliers has a positive divergence, keeping them has none.
    c = torch.zeros(2048)
    c[:512] = 100.0
    c[1500:1510] = 1.0
    assert improved_kl_amax(_hist(c), num_bits=8) == 1510.0
    assert _tensorrt_entropy(_hist(c)) >= 1510.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_improved_kl_keeps_the_tail_of_relu_activations(seed: int) -> None:
    # a ReLU'd Gaussian (half exact zeros, a thin sparse tail): the threshold must keep at least the 99.9th
    # percentile — the previous calibrator clipped at about the 99.4th (2.4-2.6 for a maximum of 4.1-4.8)
    g = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(100000, generator=g))
    counts = torch.histc(x, 2048, 0, float(x.max())).double()
    h = Histogram(counts, torch.linspace(0, float(x.max()), 2049, dtype=torch.float64))
    amax = improved_kl_amax(h, 8)
    assert float(x.quantile(0.999)) <= amax <= float(x.max())
    assert amax == pytest.approx(_tensorrt_entropy(h), rel=0.2)


def _tensorrt_entropy(h: Histogram) -> float:
    # TensorRT's entropy calibration: the one implementation, in the QAT calibrator
    from qat_rep.quant.calibrate import histogram_entropy_amax

    return float(histogram_entropy_amax(h.counts.numpy(), h.edges.numpy(), 8, start_bin=128))


def _abs_hist(x: torch.Tensor, bins: int = 2048) -> Histogram:
    return Histogram(torch.histc(x, bins, 0, float(x.max())).double(),
                     torch.linspace(0, float(x.max()), bins + 1, dtype=torch.float64))


def _quant_err(x: torch.Tensor, amax: float, bits: int = 8) -> float:
    return float((fake_quant(x, torch.tensor(amax), bits) - x).pow(2).mean())


@pytest.mark.parametrize("method", ["improved_kl", "entropy"])
@pytest.mark.parametrize("bins", [512, 2048])
def test_kl_calibrators_never_clip_a_discrete_input(method: str, bins: int) -> None:
    # 17 grey levels, normalized (a digits image): the values sit on isolated points, there is no density for KL
    # to compare. The KL search alone clips the strokes onto the background level (TensorRT's at any resolution,
    # the improved one at 512 bins, where every bin is occupied); the calibrators keep the full range
    g = torch.Generator().manual_seed(0)
    x = ((torch.randint(0, 17, (50000,), generator=g).float() / 16 - 0.3) / 0.4).abs()
    assert amax_from_histogram(_abs_hist(x, bins), method, 8) == pytest.approx(float(x.max()))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("method", ["improved_kl", "entropy"])
def test_kl_threshold_keeps_the_error_of_max_on_a_light_tailed_relu_output(seed: int, method: str) -> None:
    # a bounded, light-tailed ReLU output (sum of 4 uniforms minus 2; 2000 values, a small feature map): the full
    # range is right. The KL search alone (without the fallback to the maximum) clips it to 0.85-0.95 of its
    # maximum with 1.8-6.8x the quantization error of the maximum, for both calibrators and all three seeds
    # (sampling gaps in the thin tail look like structure to a divergence)
    g = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.rand(2000, 4, generator=g).sum(1) - 2.0)
    amax = amax_from_histogram(_abs_hist(x), method, 8)
    assert amax <= float(x.max())
    assert _quant_err(x, amax) <= 1.25 * _quant_err(x, float(x.max()))


def test_kl_threshold_is_kept_where_clipping_pays() -> None:
    # a heavy (Laplace) tail at 6 bits: clipping lowers the quantization error and the KL threshold stands
    g = torch.Generator().manual_seed(0)
    sign = torch.where(torch.rand(50000, generator=g) < 0.5, -1.0, 1.0)
    x = torch.relu(torch.empty(50000).exponential_(generator=g) * sign)
    h = _abs_hist(x)
    amax = amax_from_histogram(h, "improved_kl", 6)
    assert amax < 0.9 * float(x.max())
    assert histogram_quant_mse(h, amax, 6) < histogram_quant_mse(h, h.amax, 6)
    assert _quant_err(x, amax, 6) < _quant_err(x, float(x.max()), 6)


def test_the_entropy_calibration_matches_pytorch_quantization() -> None:
    torch.manual_seed(0)
    x = torch.relu(torch.randn(20000)) ** 1.5
    counts = torch.histc(x, 512, 0, float(x.max())).double()
    h = Histogram(counts, torch.linspace(0, float(x.max()), 513, dtype=torch.float64))
    ref = float(backend.pq_compute_amax_entropy(counts.numpy().copy(), h.edges.numpy().copy(), 8, False, 1, 128))
    assert _tensorrt_entropy(h) == pytest.approx(ref, rel=1e-6)


def test_improved_kl_needs_enough_bins() -> None:
    with pytest.raises(ValueError, match="fewer than the 128 quantization levels"):
        improved_kl_amax(_hist(torch.ones(64)), num_bits=8)


def test_unknown_histogram_method_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown calibration method 'kl'"):
        amax_from_histogram(_hist(torch.ones(256)), "kl")


def test_qbound_rejects_bits_out_of_range() -> None:
    with pytest.raises(ValueError, match=r"num_bits must be an integer in \[2, 16\]"):
        qbound(1)
