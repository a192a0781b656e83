"""verify_onnx's verdict on tiny float files: ties on constant outputs are disagreement, the max-difference bound in
output steps, ``ok``/``failures``, and one clear error for an unreadable file or a wrong input shape."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from qat_rep.export import VerifyResult, verify_onnx


def _net(zero: bool = False) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5)).eval()
    if zero:  # what a model whose scales collapsed to 0 computes: the same output for every class
        with torch.no_grad():
            m[1].weight.zero_()
            m[1].bias.zero_()
    return m


def _export(model: nn.Module, path: Path) -> Path:
    torch.onnx.export(model, (torch.zeros(1, 3, 4, 4),), str(path), opset_version=13, dynamo=False,
                      input_names=["x"], dynamic_axes={"x": {0: "n"}})
    return path


def _data() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 3, 4, 4, generator=g) for _ in range(2)]


def test_matching_file_passes(tmp_path):
    model = _net()
    result = verify_onnx(_export(model, tmp_path / "m.onnx"), model, _data())
    assert result.ok and result.failures == () and result.agreement == 1.0 and result.max_diff_steps < 0.01


def test_constant_outputs_tie_and_fail(tmp_path):
    """Both runtimes output zeros: argmax picks class 0 in both, which used to count as 100 % agreement."""
    model = _net(zero=True)
    result = verify_onnx(_export(model, tmp_path / "m.onnx"), model, _data())
    assert result.agreement == 0.0
    assert not result.ok
    assert any("constant" in f for f in result.failures) and any("agreement 0.00%" in f for f in result.failures)


def test_max_difference_bound_in_output_steps(tmp_path):
    model = _net()
    shifted = copy.deepcopy(model)
    with torch.no_grad():
        shifted[1].bias.add_(0.05)  # the same ranking, logits 0.05 apart: several output steps
    path = _export(shifted, tmp_path / "m.onnx")
    result = verify_onnx(path, model, _data())
    assert result.agreement == 1.0 and result.max_diff_steps > 4
    assert not result.ok and result.failures == (
        f"the max logit difference is {result.max_diff_steps:.2f} output steps, above the bound of 4",)
    assert verify_onnx(path, model, _data(), max_steps=result.max_diff_steps + 1).ok
    assert "FAILED" in str(result) and result.to_dict()["failures"] == list(result.failures)


def test_result_keeps_its_old_constructor():
    r = VerifyResult(4, 1.0, 0.0, 1.0, 0.0, None, None)
    assert r.ok and r.failures == ()


@pytest.mark.parametrize("content", [b"", b"not a model", b"\x08\x07\xff\xfe" * 10])
def test_unreadable_file_is_one_value_error(tmp_path, content):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match=r"bad.onnx' is not a readable ONNX model .*re-export it"):
        verify_onnx(bad, _net(), _data())


def test_wrong_input_shape_is_named(tmp_path):
    path = _export(_net(), tmp_path / "m.onnx")
    with pytest.raises(ValueError, match=r"takes inputs of shape Nx3x4x4, the data gives 8x3x5x5"):
        verify_onnx(path, _net(), [torch.randn(8, 3, 5, 5)])
    with pytest.raises(ValueError, match="min_agreement must be a fraction"):
        verify_onnx(path, _net(), _data(), min_agreement=-0.5)
