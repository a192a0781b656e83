"""ONNX Runtime CPU latency of several ONNX files, measured interleaved so that ratios come from one run.

On a shared machine the load drifts; timing file A for a minute and then file B for a minute turns that drift into
a fake speed difference. :func:`ort_latency` instead runs one inference of every file in turn, ``repeats`` times,
and reports the median per file. :func:`ort_op_counts` tells which kernels ONNX Runtime actually runs after graph
optimization (e.g. whether the QDQ convs became integer ``QLinearConv`` or stayed float ``Conv``).
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .verify import ort_session


@dataclass(frozen=True)
class LatencyResult:
    """Median / p10 / p90 latency of one file at one batch size (milliseconds)."""

    label: str
    batch: int
    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int
    threads: int

    def to_dict(self) -> dict:
        return asdict(self)


def ort_latency(files: Mapping[str, str | Path], input_shape: Sequence[int], batch_sizes: Sequence[int] = (1,),
                threads: int = 2, warmup: int = 3, repeats: int = 20, seed: int = 0,
                precise_int8: bool = True) -> list[LatencyResult]:
    """Time every file in ``files`` (label → path) on random inputs of shape ``(batch, *input_shape)``.

    ``input_shape`` is ``(C, H, W)``. Runs are interleaved across files (see the module docstring).
    ``precise_int8`` is passed to :func:`~qat_rep.export.verify.ort_session`.
    """
    if not files:
        raise ValueError("files is empty; pass a mapping label -> ONNX path")
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ValueError(f"input_shape must be (C, H, W) with positive sizes, got {tuple(input_shape)}")
    if threads < 1 or warmup < 0 or repeats < 1:
        raise ValueError(f"threads and repeats must be >= 1 and warmup >= 0 (got {threads}, {repeats}, {warmup})")
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"batch_sizes must be positive integers, got {tuple(batch_sizes)}")
    sessions = {label: ort_session(path, threads, precise_int8=precise_int8) for label, path in files.items()}
    rng = np.random.default_rng(seed)
    results = []
    for batch in batch_sizes:
        x = rng.standard_normal((batch, *input_shape), dtype=np.float32)
        feeds = {label: {s.get_inputs()[0].name: x} for label, s in sessions.items()}
        for _ in range(warmup):
            for label, s in sessions.items():
                s.run(None, feeds[label])
        times: dict[str, list[float]] = {label: [] for label in sessions}
        for _ in range(repeats):
            for label, s in sessions.items():
                t0 = time.perf_counter()
                s.run(None, feeds[label])
                times[label].append((time.perf_counter() - t0) * 1000.0)
        for label, ts in times.items():
            arr = np.asarray(ts)
            results.append(LatencyResult(label, batch, float(np.median(arr)), float(np.percentile(arr, 10)),
                                         float(np.percentile(arr, 90)), repeats, threads))
    return results


def ort_op_counts(path: str | Path, threads: int = 2, precise_int8: bool = True) -> dict[str, int]:
    """Op types (and counts) of the graph ONNX Runtime runs after its CPU graph optimizations."""
    import onnx

    with tempfile.TemporaryDirectory(prefix="qat_rep_ort_") as tmp:
        opt = Path(tmp) / "optimized.onnx"
        ort_session(path, threads, optimized_model_path=opt, precise_int8=precise_int8)
        graph = onnx.load(str(opt)).graph
        return dict(Counter(n.op_type for n in graph.node))
