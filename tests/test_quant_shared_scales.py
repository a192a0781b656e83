"""Shared activation scales: which input quantizers a model's dataflow joins, and tying them into one object."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qat_rep import create_model
from qat_rep.quant import QuantConfig, calibrate, prepare, quantizers, share_input_scales, tie_quantizers


class _Residual(nn.Module):
    """stem → two residual blocks (Add) → a Concat of two branches → head; ``gain`` is a keyword-only input."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a1, self.a2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.b1, self.b2 = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)
        self.head = nn.Conv2d(8, 10, 1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor, *, gain: float = 1.0) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x))) * gain
        x = F.relu(x + self.a1(x))
        x = F.relu(x + self.a2(x))
        y = torch.cat([self.b1(x), self.b2(x)], 1)
        return self.head(F.relu(y)).mean((2, 3))


def _prepared(**cfg) -> nn.Module:
    torch.manual_seed(0)
    model = _Residual()
    prepare(model, QuantConfig(**cfg))
    return model


def test_groups_follow_adds_concats_and_shared_reads():
    model = _prepared()
    keys = list(model.state_dict())
    groups = share_input_scales(model, torch.randn(2, 3, 8, 8), gain=2.0)
    # a1, a2, b1, b2 read the residual stream (a1/a2 Adds join it; b1/b2 read one tensor); the head reads a Concat
    assert sorted(map(sorted, groups)) == [["a1._input_quantizer", "a2._input_quantizer", "b1._input_quantizer",
                                            "b2._input_quantizer"]]
    lead = model.a1._input_quantizer
    assert all(getattr(model, n)._input_quantizer is lead for n in ("a2", "b1", "b2"))
    assert model.stem._input_quantizer is not lead and model.head._input_quantizer is not lead
    assert list(model.state_dict()) == keys  # a tied quantizer keeps a key under each name
    assert share_input_scales(model, torch.randn(2, 3, 8, 8)) == groups  # a second call changes nothing


def test_trace_leaves_the_model_as_it_was():
    model = _prepared()
    model.train()
    model.bn.eval()  # a user's frozen BN stays frozen
    calls = []
    model.a1.register_forward_hook(lambda *a: calls.append(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    share_input_scales(model, torch.randn(2, 3, 8, 8))
    assert model.training and not model.bn.training and model.a1.training
    assert calls == []  # hooks are suspended during the trace, and restored after
    after = model.state_dict()
    assert all(torch.allclose(before[k], after[k], rtol=0, atol=0, equal_nan=True) for k in before)  # BN stats too
    model.eval()
    calibrate(model, [torch.randn(4, 3, 8, 8)], QuantConfig(calib_batches=1))
    assert calls == [1]


def test_calibration_picks_one_amax_over_the_group():
    model = _prepared()
    x = torch.randn(8, 3, 8, 8)
    untied = _prepared()
    calibrate(untied, [x], QuantConfig(calib_batches=1))
    share_input_scales(model, x)
    calibrate(model, [x], QuantConfig(calib_batches=1))
    members = [untied.get_submodule(n)._input_quantizer.amax for n in ("a1", "a2", "b1", "b2")]
    assert len({float(a) for a in members}) > 1  # without the tie, the reads of the stream differ
    assert float(model.a1._input_quantizer.amax) == max(float(a) for a in members)


def test_tie_quantizers_restores_groups_on_a_fresh_model_and_checks_names():
    model = _prepared()
    groups = share_input_scales(model, torch.randn(2, 3, 8, 8))
    fresh = _prepared()
    assert tie_quantizers(fresh, groups) == groups
    assert fresh.b2._input_quantizer is fresh.a1._input_quantizer
    with pytest.raises(ValueError, match="no quantizer named 'nope._input_quantizer'"):
        tie_quantizers(fresh, [("a1._input_quantizer", "nope._input_quantizer")])


def test_different_bit_widths_are_tied_per_width_with_a_warning():
    model = _prepared(a_bits=4)  # first_last_8bit: the head keeps 8 bits, the others 4
    model.b2._input_quantizer.num_bits = 8
    with pytest.warns(UserWarning, match=r"\[4, 8\] bits"):
        groups = share_input_scales(model, torch.randn(2, 3, 8, 8))
    assert sorted(map(sorted, groups)) == [["a1._input_quantizer", "a2._input_quantizer", "b1._input_quantizer"]]
    assert model.b2._input_quantizer is not model.a1._input_quantizer


def test_rep_networks_have_nothing_to_tie():
    model = create_model("qarepvgg_a0", num_classes=10, small_input=True)
    prepare(model, QuantConfig())
    assert share_input_scales(model, torch.randn(2, 3, 32, 32)) == []


def test_unprepared_model_is_refused():
    with pytest.raises(ValueError, match="not prepared"):
        share_input_scales(_Residual(), torch.randn(1, 3, 8, 8))
