"""AdaRound / BRECQ / MRECG reconstruction on a tiny re-parameterized network."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from helpers import BNRanges, calib_batches, tiny_rep_net
from qat_rep.blocks import QARepVGGBlock
from qat_rep.ptq import ReconConfig, Unit, block_units, mixed_units, quantize_ptq
from qat_rep.quant import QuantConfig

pytestmark = pytest.mark.usefixtures("one_thread")


tiny = functools.partial(tiny_rep_net, bn=BNRanges(bias=(-0.2, 0.2)))  # BN biases randomized too
data = functools.partial(calib_batches, size=8)  # 8×8 images
W4A4 = QuantConfig(w_bits=4, a_bits=4, first_last_8bit=False)


@pytest.mark.slow
def test_adaround_soft_rounding_ends_binary_and_beats_nearest() -> None:
    m, rep = quantize_ptq(tiny(), data(), W4A4, method="adaround", iters=300, batch_size=16, num_samples=64,
                          learn_act=False)
    assert [u.kind for u in rep.units] == ["layer"] * 5
    for u in rep.units:
        # every h(V) ends within 1e-3 of 0 or 1 (the hardening phase of the schedule, ReconConfig.harden): the
        # soft weight optimized at the end is the deployed one
        assert u.round_binary == 1.0 and u.round_gap <= 1e-3, u
    assert sum(u.loss_after for u in rep.units) < sum(u.loss_before for u in rep.units)


@pytest.mark.slow
def test_published_schedule_alone_leaves_soft_rounding_undecided_at_cpu_run_lengths() -> None:
    # the control for the test above: without the hardening phase the same run ends with h(V) far from {0, 1}
    _, rep = quantize_ptq(tiny(), data(), W4A4, method="adaround", iters=300, batch_size=16, num_samples=64,
                          learn_act=False, harden=0.0)
    assert max(u.round_gap for u in rep.units) > 1e-3


@pytest.mark.slow
def test_brecq_units_are_rep_blocks_plus_remaining_layers() -> None:
    m = tiny()
    m_q, rep = quantize_ptq(m, data(), W4A4, method="brecq", iters=30, batch_size=16, num_samples=64)
    assert [(u.name, u.kind) for u in rep.units] == [("0", "block"), ("1", "block"), ("2", "block"),
                                                      ("3", "block"), ("6", "layer")]
    assert all(u.loss_after <= u.loss_before for u in rep.units)  # never worse than nearest rounding
    assert sum(u.loss_after < 0.95 * u.loss_before for u in rep.units) >= 3


@pytest.mark.slow
def test_mrecg_with_k0_reproduces_brecq_exactly() -> None:
    opts = dict(iters=25, batch_size=16, num_samples=64, qdrop=0.5, seed=7)
    a, ra = quantize_ptq(tiny(QARepVGGBlock), data(), W4A4, method="brecq", **opts)
    b, rb = quantize_ptq(tiny(QARepVGGBlock), data(), W4A4, method="mrecg", k=0, **opts)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert [u.loss_after for u in ra.units] == [u.loss_after for u in rb.units]
    assert rb.pairs == []


@pytest.mark.parametrize("capacity", ["data_free", "data_dependent"])
def test_mrecg_reconstructs_pairs_jointly(capacity: str) -> None:
    _, rep = quantize_ptq(tiny(), data(), W4A4, method="mrecg", k=1, capacity=capacity, iters=10,
                          batch_size=16, num_samples=64)
    assert len(rep.pairs) == 1
    pair = [u for u in rep.units if u.kind == "pair"]
    assert len(pair) == 1 and len(rep.units) == 4
    a, b, _ = rep.pairs[0]
    assert pair[0].name == f"{a}+{b}"


def test_mixed_units_picks_largest_capacity_gaps_without_overlap() -> None:
    units = [Unit((str(i),), "block") for i in range(5)]
    caps = [1.0, 10.0, 11.0, 50.0, 49.0]
    out, pairs = mixed_units(units, caps, 2, lambda a, b: True)
    # gaps: 0-1: 9, 1-2: 1, 2-3: 39, 3-4: 1 → (2,3) first, then (0,1)
    assert [u.names for u in out] == [("0", "1"), ("2", "3"), ("4",)]
    assert [p[:2] for p in pairs] == [("0", "1"), ("2", "3")]
    # a pair that is not connected is never merged
    out, pairs = mixed_units(units, caps, 1, lambda a, b: (a, b) != ("2", "3"))
    assert [p[:2] for p in pairs] == [("0", "1")]
    with pytest.raises(ValueError, match="non-negative integer"):
        mixed_units(units, caps, -1, lambda a, b: True)


def test_blockwise_on_a_model_without_blocks_falls_back_to_layers_with_a_warning() -> None:
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()).eval()
    with pytest.warns(UserWarning, match="falls back to layer-wise"):
        _, rep = quantize_ptq(plain, data(), W4A4, method="brecq", iters=5, batch_size=16, num_samples=32)
    assert [u.kind for u in rep.units] == ["layer", "layer"]
    # naming the residual units explicitly makes them blocks
    def plain2() -> nn.Sequential:
        return nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()), nn.Conv2d(8, 4, 1)).eval()

    _, rep = quantize_ptq(plain2(), data(), W4A4, method="brecq", blocks=["0"], iters=5, batch_size=16,
                          num_samples=32)
    assert [(u.name, u.kind) for u in rep.units] == [("0", "block"), ("1", "layer")]
    with pytest.raises(ValueError, match="block 'nope' is not a submodule"):
        quantize_ptq(plain2(), data(), W4A4, method="brecq", blocks=["nope"], iters=5,
                     batch_size=16, num_samples=32)


def test_calibration_set_smaller_than_one_batch_is_refused() -> None:
    with pytest.raises(ValueError, match="fewer than one reconstruction batch"):
        quantize_ptq(tiny(), data(n=8, bs=8), W4A4, method="brecq", batch_size=32)


@pytest.mark.parametrize("kwargs, match", [
    (dict(iters=0), "iters must be a positive integer"),
    (dict(qdrop=0.0), r"qdrop must be in \(0, 1\]"),
    (dict(warmup=1.0), r"warmup must be in \[0, 1\)"),
    (dict(beta=(20.0, -1.0)), "beta must be a"),
    (dict(harden=0.9), "harden must be in"),
    (dict(round_weight_end=0.001), "round_weight_end must be a number >= round_weight"),
    (dict(lr=-1.0), "lr must be a non-negative number"),
])
def test_recon_config_validates(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ReconConfig(**kwargs)


def test_block_units_of_a_rep_model_follow_module_order() -> None:
    from qat_rep.ptq.layers import install_sim
    from qat_rep.reparam import reparameterize

    m = tiny()
    reparameterize(m)
    install_sim(m, 8, 8, True)
    assert [u.name for u in block_units(m)] == ["0", "1", "2", "3", "6"]
