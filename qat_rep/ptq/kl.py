"""The "improved KL" activation calibrator of CFWS and the input histograms it needs.

Both metrics expand each quantized chunk back over the *non-empty* bins of the float histogram ``P`` (TensorRT's
construction of ``Q``). They differ where ``Q`` is empty but ``P`` is not — the last bin of a candidate threshold
that falls in a gap of the histogram, which holds the clipped tail: TensorRT's calibrator (pytorch-quantization's
``compute_amax("entropy")``) declares the divergence infinite there and never clips into a gap, so a few isolated
outliers keep the range wide; CFWS's improved metric (FACTS.md §5) takes the KL only over the bins where both
histograms are non-zero, so such a threshold is judged by the body of the distribution and isolated outliers get
clipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import Tensor, nn

from .qmath import qbound

__all__ = ["Histogram", "HIST_METHODS", "improved_kl_amax", "amax_from_histogram", "collect_input_histograms"]


@dataclass
class Histogram:
    """A histogram of ``|x|``: ``counts[i]`` values fell in ``[edges[i], edges[i + 1])``."""

    counts: Tensor  # float64, [bins]
    edges: Tensor  # float64, [bins + 1]

    @property
    def amax(self) -> float:
        return float(self.edges[-1])


def improved_kl_amax(hist: Histogram, num_bits: int = 8, start_bin: int | None = None, stride: int = 1,
                     tensorrt: bool = False) -> float:
    """The clipping threshold (an upper bin edge) that minimizes the improved KL divergence; see the module doc.

    For each candidate ``i`` (``start_bin`` … ``bins``, default start: the number of quantization levels), the float
    histogram ``P`` is the first ``i`` bins with everything beyond folded into the last; ``Q`` is the first ``i``
    bins (without the folded tail, as in TensorRT) averaged over ``2^(b-1)`` equal chunks and spread back over each
    chunk's non-empty bins — the quantized, dequantized histogram. Returns ``edges[i*]``.

    ``tensorrt=True`` computes TensorRT's entropy calibration instead (a candidate whose ``P`` has mass where ``Q``
    has none is rejected) — the same algorithm as pytorch-quantization's ``entropy``, vectorized per candidate
    (the library's pure-Python loop takes about a minute per layer at 2048 bins).
    """
    counts = hist.counts.to(torch.float64).numpy().copy()
    if counts.size > 1:
        # as TensorRT/pytorch-quantization: the zero bin (ReLU's exact zeros, representable in any grid) must not
        # dominate the divergence — otherwise the smallest threshold (one bin per level) always wins
        counts[0] = counts[1]
    nbins = counts.size
    levels = qbound(num_bits) + 1
    start = levels if start_bin is None else start_bin
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if nbins < levels:
        raise ValueError(f"the histogram has {nbins} bins, fewer than the {levels} quantization levels of "
                         f"{num_bits} bits; collect it with more bins")
    if float(counts.sum()) <= 0:
        return hist.amax
    start = min(max(start, levels), nbins)
    best_i, best_kl = nbins, float("inf")
    total = counts.sum()
    tail = np.concatenate([np.cumsum(counts[::-1])[::-1], [0.0]])  # tail[i] = counts[i:].sum()
    for i in range(start, nbins + 1, stride):
        p = counts[:i].copy()
        p[i - 1] += tail[i]
        chunk = (np.arange(i) * levels) // i
        chunk_sum = np.bincount(chunk, weights=counts[:i], minlength=levels)
        nonempty = counts[:i] > 0
        chunk_len = np.bincount(chunk, weights=nonempty.astype(np.float64), minlength=levels)
        q = np.where(nonempty, chunk_sum[chunk] / np.maximum(chunk_len[chunk], 1), 0.0)
        qsum = q.sum()
        mask = (p > 0) & (q > 0)
        if qsum <= 0 or not mask.any() or (tensorrt and bool(((p > 0) & (q <= 0)).any())):
            continue
        pn, qn = p[mask] / total, q[mask] / qsum
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

    def hook(name: str):
        def fn(_module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().abs().float()
            if state["pass"] == 0:
                amax[name] = max(amax[name], float(x.max()))
            elif amax[name] > 0:
                counts[name] += torch.histc(x, bins=bins, min=0.0, max=amax[name]).to(torch.float64)
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for state["pass"] in (0, 1):
            for batch in batches:
                forward(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
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


HIST_METHODS = ("max", "percentile", "entropy", "mse", "improved_kl")


def amax_from_histogram(hist: Histogram, method: str, num_bits: int = 8, percentile: float = 99.99) -> float:
    """An activation amax from a ``|x|`` histogram by one of :data:`HIST_METHODS`.

    ``percentile`` is pytorch-quantization's algorithm (through the backend), ``entropy`` TensorRT's KL
    calibration (:func:`improved_kl_amax` with ``tensorrt=True``); ``mse`` is the core's CPU
    histogram search (:func:`qat_rep.quant.histogram_mse_amax`); ``improved_kl`` is :func:`improved_kl_amax`.
    """
    from ..quant import backend

    if method not in HIST_METHODS:
        raise ValueError(f"unknown calibration method {method!r}; valid: {', '.join(HIST_METHODS)}")
    if float(hist.counts.sum()) <= 0 or hist.amax <= 0:
        return max(hist.amax, 0.0)
    if method == "max":
        return hist.amax
    if method in ("improved_kl", "entropy"):
        return improved_kl_amax(_coarsen(hist, num_bits), num_bits, tensorrt=method == "entropy")
    counts, edges = hist.counts.numpy().copy(), hist.edges.numpy().copy()
    if method == "percentile":
        return float(backend.pq_compute_amax_percentile(counts, edges, percentile))
    from ..quant import histogram_mse_amax

    return float(histogram_mse_amax(counts, edges, num_bits, False, 1, min(128, len(counts) - 1)))
