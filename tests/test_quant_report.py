"""Per-layer report: numbers that follow from the definitions, both renderings, errors."""

from __future__ import annotations

import math

import pytest
import torch
from rich.console import Console
from torch import nn

from qat_rep import QARepVGGBlock
from qat_rep.quant import NotCalibratedError, QuantConfig, calibrate, convert, layer_report, prepare


def _model(bits=8):
    torch.manual_seed(0)
    m = nn.Sequential(QARepVGGBlock(3, 8, stride=2), QARepVGGBlock(8, 8), nn.Flatten(), nn.Linear(8 * 8 * 8, 5))
    prepare(m, QuantConfig(w_bits=bits, a_bits=bits, first_last_8bit=False))
    return m


def _data():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 3, 16, 16, generator=g), torch.zeros(4)) for _ in range(2)]


def test_layer_report_rows_follow_the_definitions():
    m = _model()
    calibrate(m, _data())
    rep = layer_report(m, _data())
    assert [r.name for r in rep.rows] == ["0.rep_quant", "1.rep_quant", "3"] and rep.batches == 2
    lin = rep.rows[2]
    w = m[3].weight.detach()
    assert lin.w_amax_max == pytest.approx(float(w.abs().max()))
    assert lin.a_amax == pytest.approx(float(m[3]._input_quantizer.amax))
    wq = m[3]._weight_quantizer(w)
    assert lin.w_sqnr_db == pytest.approx(10 * math.log10(float((w ** 2).sum() / ((w - wq) ** 2).sum())), rel=1e-6)
    assert 30 < lin.w_sqnr_db < 60 and 0 < lin.out_rel_err < 0.1
    assert rep.rows[0].kind == "rep/qat" and rep.rows[0].w_bits == 8


@pytest.mark.slow
def test_lower_bits_give_lower_sqnr_and_larger_error():
    hi, lo = _model(8), _model(4)
    calibrate(hi, _data())
    calibrate(lo, _data())
    r_hi, r_lo = layer_report(hi, _data()), layer_report(lo, _data())
    for a, b in zip(r_hi.rows, r_lo.rows):
        assert a.w_sqnr_db > b.w_sqnr_db + 15 and a.out_rel_err < b.out_rel_err


def test_float_phase_block_reports_no_output_error_and_renderings():
    m = _model()
    calibrate(m, _data())
    m[1].rep_quant.phase = "float"
    rep = layer_report(m, _data())
    assert rep.rows[1].out_rel_err == 0.0 and rep.rows[1].kind == "rep/float"
    md = rep.to_markdown()
    assert md.splitlines()[0].startswith("| layer | kind | W/A bits") and "| 1.rep_quant | rep/float | 8/8 |" in md
    console = Console(record=True, width=200)
    console.print(rep.to_rich_table())
    assert "0.rep_quant" in console.export_text()


def test_converted_model_report():
    m = _model()
    calibrate(m, _data())
    convert(m)
    rep = layer_report(m, _data())
    assert [r.name for r in rep.rows] == ["0.rbr_reparam", "1.rbr_reparam", "3"]
    assert all(r.kind in ("conv", "linear") for r in rep.rows)


def test_layer_report_errors():
    m = _model()
    with pytest.raises(NotCalibratedError, match="never calibrated"):
        layer_report(m, _data())
    calibrate(m, _data())
    with pytest.raises(ValueError, match="layer_report got no batches"):
        layer_report(m, [])
    with pytest.raises(ValueError, match="model has no quantized layer"):
        layer_report(nn.Sequential(nn.Linear(2, 2)), [torch.randn(1, 2)])
