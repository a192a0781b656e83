"""The wheel ships ``qat_rep.callbacks`` (from the top-level ``callbacks/`` folder) and no top-level ``callbacks``."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # builds a wheel and starts interpreters

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_layout_and_import(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, timeout=600,
    )
    (wheel,) = tmp_path.glob("qat_rep-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "qat_rep/callbacks/__init__.py" in names
    assert not any(n.startswith("callbacks/") for n in names)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    code = "import qat_rep, qat_rep.callbacks; print(qat_rep.__file__); print(qat_rep.callbacks.__file__)"
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [str(target / "qat_rep" / "__init__.py"),
                                       str(target / "qat_rep" / "callbacks" / "__init__.py")]


def test_source_tree_import_from_repo_root():
    # `python` started in the repository root finds the source folder qat_rep/ first: callbacks must resolve too.
    code = "import qat_rep.callbacks, os; print(os.path.realpath(qat_rep.callbacks.__file__))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str((ROOT / "callbacks" / "__init__.py").resolve())


def test_import_leaves_log_lines_single_and_export_quiet(tmp_path):
    # pytorch-quantization puts absl's handler on the root logger at import: Lightning (which propagates to a
    # configured root logger) then printed every INFO line twice, the second in absl's format
    code = f"""
import logging
import torch
import qat_rep
import lightning.pytorch
from qat_rep.quant import QuantConfig, calibrate, prepare
logging.getLogger("lightning.pytorch.custom").info("lightning-info-line")
logging.getLogger("user").warning("user-warning-line")
print([type(h).__name__ for h in logging.root.handlers])
model = qat_rep.create_model("qarepvgg_a0", num_classes=10, small_input=True).eval()
prepare(model, QuantConfig())
calibrate(model, [torch.randn(2, 3, 16, 16)])
qat_rep.export_onnx(model, {str(tmp_path / "m.onnx")!r}, torch.randn(1, 3, 16, 16))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("lightning-info-line") == 1, out.stderr
    assert out.stderr.count("user-warning-line") == 1, out.stderr  # warnings still reach stderr
    assert "ABSLHandler" not in out.stdout and "Logging before flag parsing" not in out.stderr
    assert "experimental" not in out.stderr  # the library's notice about the ops every export uses
