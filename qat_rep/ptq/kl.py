"""The "improved KL" activation calibrator of CFWS and the input histograms it needs.

Both metrics compare the clipped float histogram ``P`` (the tail beyond a candidate threshold folded into its last
bin) with ``Q``, the unclipped body averaged per quantization level and spread back over the level's bins
(TensorRT's construction). TensorRT (pytorch-quantization's ``compute_amax("entropy")``) spreads over the non-empty
bins of the unclipped histogram and declares the divergence infinite where ``P`` has mass and ``Q`` none — so it
never puts a threshold in a gap of the histogram. CFWS's improved metric takes the KL only over the
bins where both are non-zero. Done literally on TensorRT's ``Q`` that drops exactly the bin holding the clipped
tail whenever it falls in a gap (and normalizing ``P`` over all bins but ``Q`` over its own made the sum negative),
so the clipped mass stopped counting and ReLU outputs were cut to ~40 % of their range. Here ``Q`` is spread over
``P``'s non-empty bins (the tail bin takes part whenever its level has mass; a candidate whose tail sits in an
empty level is skipped), and both are normalized over the common support, so the divergence is a true KL ≥ 0.

A divergence between shapes is blind to how far clipping moves values: on a discrete input (a network's first
layer), a sparse tail or a light-tailed output it can clip far more than the maximum would cost. Both KL
calibrators therefore keep their threshold only where it quantizes the calibration values with no larger error
than the maximum (:func:`histogram_quant_mse`); ``quantize_ptq`` then checks each layer's output error too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import Tensor, nn

from ..quant.config import did_you_mean
from ..quant.observe import observe, run_in_eval
from ..quant.qmath import fake_quant, qbound


@dataclass
class Histogram:
    """A histogram of ``|x|``: ``counts[i]`` values fell in ``[edges[i], edges[i + 1])``."""

    counts: Tensor  # float64, [bins]
    edges: Tensor  # float64, [bins + 1]

    @property
    def amax(self) -> float:
        return float(self.edges[-1])


def improved_kl_amax(hist: Histogram, num_bits: int = 8, start_bin: int | None = None, stride: int = 1) -> float:
    """The clipping threshold (an upper bin edge) that minimizes the improved KL divergence; see the module doc.

    For each candidate ``i`` (``start_bin`` … ``bins``; default start: ``bins / 16`` as TensorRT's 128 of 2048, and
    at least the number of quantization levels), ``P`` is the first ``i`` bins with everything beyond folded into
    the last (the clipped float histogram); ``Q`` is the first ``i`` bins without the folded tail (as in TensorRT),
    summed over ``2^(b-1)`` equal chunks (one per quantization level) and spread back over each chunk's bins where
    ``P`` is non-empty. The divergence is taken over the bins where both ``P`` and ``Q`` are non-zero, each
    normalized over exactly those bins. A candidate whose clipped tail falls in a level with no mass of its own
    (``P > 0 = Q`` there) is skipped: restricted to the common support its KL would ignore the clipped mass
    altogether. Ties go to the smallest threshold. Returns ``edges[i*]``.

    TensorRT's entropy calibration itself is :func:`qat_rep.quant.calibrate.histogram_entropy_amax` (the one
    implementation, shared with QAT calibration).
    """
    counts = hist.counts.to(torch.float64).numpy().copy()
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    nbins = counts.size
    levels = qbound(num_bits) + 1
    if nbins < levels:
        raise ValueError(f"the histogram has {nbins} bins, fewer than the {levels} quantization levels of "
                         f"{num_bits} bits; collect it with more bins")
    if nbins > 1 and counts[0] > counts[1]:
        # as TensorRT/pytorch-quantization: the zero bin (ReLU's exact zeros, representable in any grid) must not
        # dominate the divergence — otherwise the smallest threshold (one bin per level) always wins. TensorRT
        # does this unconditionally; the improved metric only flattens an actual spike (an input without exact
        # zeros keeps its first bin as it is)
        counts[0] = counts[1]
    if float(counts.sum()) <= 0:
        return hist.amax
    if start_bin is None:
        start = max(levels, nbins // 16)
    else:
        start = start_bin
    start = min(max(start, levels), nbins)
    best_i, best_kl = nbins, float("inf")
    tail = np.concatenate([np.cumsum(counts[::-1])[::-1], [0.0]])  # tail[i] = counts[i:].sum()
    for i in range(start, nbins + 1, stride):
        p = counts[:i].copy()
        p[i - 1] += tail[i]
        chunk = (np.arange(i) * levels) // i
        chunk_sum = np.bincount(chunk, weights=counts[:i], minlength=levels)
        # TensorRT spreads over the unclipped histogram's non-empty bins; the improved metric over P's, so that the
        # bin holding the clipped tail takes part whenever its level has any mass
        nonempty = p > 0
        chunk_len = np.bincount(chunk, weights=nonempty.astype(np.float64), minlength=levels)
        q = np.where(nonempty, chunk_sum[chunk] / np.maximum(chunk_len[chunk], 1), 0.0)
        if bool(((p > 0) & (q <= 0)).any()):
            continue  # the clipped mass would drop out of the comparison
        mask = (p > 0) & (q > 0)
        if not mask.any():
            continue
        pn, qn = p[mask] / p[mask].sum(), q[mask] / q[mask].sum()  # both distributions on the same support
        kl = float(np.sum(pn * np.log(pn / qn)))
        if kl < best_kl - 1e-12:
            best_kl, best_i = kl, i
    return float(hist.edges[best_i])


@torch.no_grad()
def collect_input_histograms(
    model: nn.Module,
    layers: dict[str, nn.Module],
    batches: Iterable[Any],
    forward: Callable[[nn.Module, Any], Any],
    bins: int = 2048,
) -> dict[str, Histogram]:
    """Histograms of ``|input|`` of each module in ``layers`` over ``batches`` (two passes: range, then counts).

    The model runs in eval mode as it is (call this on the float model). ``batches`` is iterated twice, so it must
    be re-iterable (a DataLoader or a list).
    """
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    amax: dict[str, float] = {name: 0.0 for name in layers}
    counts: dict[str, Tensor] = {name: torch.zeros(bins, dtype=torch.float64) for name in layers}
    state = {"pass": 0}

    def record(name: str, _module: nn.Module, args: tuple[Any, ...], _output: Any) -> None:
        x = args[0].detach().abs().float()
        if state["pass"] == 0:
            amax[name] = max(amax[name], float(x.max()))
        elif amax[name] > 0:
            counts[name] += torch.histc(x, bins=bins, min=0.0, max=amax[name]).to("cpu", torch.float64)

    with observe(layers, record, outputs=False):
        for state["pass"] in (0, 1):
            run_in_eval(model, batches, forward)
    return {n: Histogram(counts[n], torch.linspace(0.0, max(amax[n], 1e-12), bins + 1, dtype=torch.float64))
            for n in layers}


def _coarsen(hist: Histogram, num_bits: int, min_mean_count: float = 16.0) -> Histogram:
    """Merge adjacent bins (by powers of two, keeping at least 4 bins per quantization level) until the mean count
    per bin is ``min_mean_count``: a KL search on a sparse histogram (few calibration values, e.g. a classifier's
    input) otherwise mistakes sampling gaps for structure and clips far too much."""
    counts, edges = hist.counts, hist.edges
    min_bins = 4 * (qbound(num_bits) + 1)
    total = float(counts.sum())
    while counts.numel() % 2 == 0 and counts.numel() // 2 >= min_bins and total / counts.numel() < min_mean_count:
        counts = counts.reshape(-1, 2).sum(1)
        edges = edges[::2]
    return Histogram(counts, edges)


def histogram_quant_mse(hist: Histogram, amax: float, num_bits: int) -> float:
    """Mean squared quantization error of the histogram's values (bin centres, count-weighted) with threshold
    ``amax``: the clipping error of the tail plus the rounding error of the body, in the values' own units."""
    centres = (hist.edges[1:] + hist.edges[:-1]) / 2
    err = (fake_quant(centres, torch.tensor(float(amax), dtype=torch.float64), num_bits) - centres).pow(2)
    total = float(hist.counts.sum())
    return float((err * hist.counts).sum()) / total if total > 0 else 0.0


def _no_worse_than_max(hist: Histogram, amax: float, num_bits: int) -> float:
    """``amax`` unless it quantizes the histogram's values with a larger error than the full range does; then
    the full range.

    Why: a KL divergence compares shapes of distributions, not errors. It does not see how far the clipped values
    are moved, and it reads sampling gaps and the spikes of a discrete input as structure. Measured on A0 models
    trained with SGD at 32×32 on digits: the network input (a few hundred distinct grey values) has its KL
    threshold at 0.44 of its maximum, with 570× the layer output error of the maximum; how many of the 512 / 2048
    / 8192 bins are occupied decided whether an occupancy test noticed; with a sparse tail (few calibration values)
    improved KL clipped a ReLU output at 0.76 of its maximum, 7× the error. Where clipping pays (a heavy tail), the
    KL threshold has the smaller error and is kept."""
    if amax >= hist.amax:
        return hist.amax
    return amax if histogram_quant_mse(hist, amax, num_bits) <= histogram_quant_mse(hist, hist.amax, num_bits) \
        else hist.amax


HIST_METHODS = ("max", "percentile", "entropy", "mse", "improved_kl")


def amax_from_histogram(hist: Histogram, method: str, num_bits: int = 8, percentile: float = 99.99) -> float:
    """An activation amax from a ``|x|`` histogram by one of :data:`HIST_METHODS`.

    ``percentile`` is pytorch-quantization's algorithm (through the backend), ``entropy`` TensorRT's KL
    calibration (:func:`qat_rep.quant.calibrate.histogram_entropy_amax`, from the first level-count bin); ``mse`` is
    the core's CPU
    histogram search (:func:`qat_rep.quant.calibrate.histogram_mse_amax`); ``improved_kl`` is :func:`improved_kl_amax`.
    Both KL thresholds fall back to the maximum where they would quantize the histogram's values with a larger
    error than the maximum does (:func:`histogram_quant_mse`).
    """
    from ..quant import backend

    if method not in HIST_METHODS:
        raise ValueError(f"unknown calibration method {method!r}{did_you_mean(method, HIST_METHODS)}; valid: "
                         f"{', '.join(HIST_METHODS)}")
    if float(hist.counts.sum()) <= 0 or hist.amax <= 0:
        return max(hist.amax, 0.0)
    if method == "max":
        return hist.amax
    from ..quant.calibrate import histogram_entropy_amax, histogram_mse_amax

    if method == "improved_kl":
        return _no_worse_than_max(hist, improved_kl_amax(_coarsen(hist, num_bits), num_bits), num_bits)
    if method == "entropy":
        coarse = _coarsen(hist, num_bits)
        kl = float(histogram_entropy_amax(coarse.counts.numpy(), coarse.edges.numpy(), num_bits,
                                          start_bin=min(qbound(num_bits) + 1, coarse.counts.numel())))
        return _no_worse_than_max(hist, kl, num_bits)
    counts, edges = hist.counts.numpy().copy(), hist.edges.numpy().copy()
    if method == "percentile":
        return float(backend.pq_compute_amax_percentile(counts, edges, percentile))
    return float(histogram_mse_amax(counts, edges, num_bits, False, 1, min(128, len(counts) - 1)))
