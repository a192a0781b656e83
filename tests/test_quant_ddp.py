"""Calibration across 2 real processes (gloo): every rank ends with identical amax, the max over ranks, and
identical signed/unsigned decisions (``unsigned_activations``), the min of the input over ranks."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from qat_rep import QARepVGGBlock
from qat_rep.quant import QuantConfig, calibrate, prepare, quantizers

METHODS = ("max", "percentile")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(QARepVGGBlock(3, 8, stride=2), QARepVGGBlock(8, 8), nn.Flatten(), nn.Linear(8 * 8 * 8, 5))


def _batches(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(4, 3, 16, 16, generator=g) * (1 + 2 * rank) for _ in range(2)]


def _amax(model: nn.Module) -> dict[str, float]:
    return {n: float(q.amax) for n, q in quantizers(model, "input")}


def _unsigned_batches(rank: int) -> list[torch.Tensor]:
    # rank 0 sees only non-negative images, rank 1 signed ones: the first layer must end signed on both
    return [b.abs() if rank == 0 else b for b in _batches(rank)]


def _signs(model: nn.Module) -> dict[str, bool]:
    return {n: q.unsigned for n, q in quantizers(model, "input")}


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = {}
        for method in METHODS:
            model = _model()
            prepare(model, QuantConfig(calibrator=method, calib_batches=2))
            report = calibrate(model, _batches(rank))
            result[method] = (_amax(model), report.world_size)
        model = _model()
        prepare(model, QuantConfig(calib_batches=2, unsigned_activations=True))
        calibrate(model, _unsigned_batches(rank))
        result["unsigned"] = _signs(model)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_calibration_gives_identical_amax(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    for method in METHODS:
        (a0, w0), (a1, w1) = r0[method], r1[method]
        assert w0 == w1 == 2
        assert a0 == a1 and len(a0) == 3  # bit-identical on both ranks
        local = {}
        for rank in (0, 1):
            m = _model()
            prepare(m, QuantConfig(calibrator=method, calib_batches=2))
            calibrate(m, _batches(rank))
            local[rank] = _amax(m)
        assert a0 == {k: max(local[0][k], local[1][k]) for k in a0}
        assert local[0] != local[1]  # the ranks saw different data, so the reduction did something
    # max calibration over ranks equals one process seeing all the data
    m = _model()
    prepare(m, QuantConfig(calibrator="max", calib_batches=4))
    calibrate(m, _batches(0) + _batches(1))
    assert _amax(m) == r0["max"][0]
    # unsigned decisions: the same on both ranks, and what one process seeing all the data decides
    assert r0["unsigned"] == r1["unsigned"] == {"0.rep_quant._input_quantizer": False,
                                                 "1.rep_quant._input_quantizer": True, "3._input_quantizer": True}
    alone = _model()
    prepare(alone, QuantConfig(calib_batches=2, unsigned_activations=True))
    calibrate(alone, _unsigned_batches(0))
    assert _signs(alone)["0.rep_quant._input_quantizer"] is True  # rank 0 alone would have chosen UINT8
