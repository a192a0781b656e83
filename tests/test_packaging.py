"""The wheel ships ``qat_rep.callbacks`` (from the top-level ``callbacks/`` folder) and no top-level ``callbacks``;
an editable install of a fresh copy runs every script from any folder."""

import os
import shutil
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


SCRIPTS = sorted([*(ROOT / "recipes").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")])
SHARED = {"recipe_common", "recipe_ptq", "common"}  # the modules the scripts share, not scripts themselves


def test_fresh_checkout_editable_install_runs_everything_from_any_folder(tmp_path):
    # what the README's install does: `pip install -e .` in a fresh copy of the sources. Then qat_rep.callbacks is
    # the copy's top-level callbacks/ folder (setuptools' package-dir mapping, nothing in qat_rep extends its
    # __path__), and every recipe and benchmark finds its shared module beside it, started from any folder.
    clone = tmp_path / "clone"
    shutil.copytree(ROOT, clone, ignore=shutil.ignore_patterns(".git", "out", "__pycache__", "*.egg-info", "build",
                                                               ".cache", ".pytest_cache", ".hypothesis"))
    venv = tmp_path / "venv"  # sees this interpreter's packages (torch, Lightning, ...): no download
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                   timeout=300)
    python = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q", "-e", str(clone)],
                   check=True, capture_output=True, timeout=600, env=env)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import importlib.util, qat_rep, qat_rep.callbacks; print(qat_rep.__file__); "
            "print(qat_rep.callbacks.__file__); print(importlib.util.find_spec('qat_rep.qat_rep'))")
    out = subprocess.run([python, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [str(clone / "qat_rep" / "__init__.py"), str(clone / "callbacks" / "__init__.py"),
                                       "None"]
    for script in SCRIPTS:
        if script.stem in SHARED:
            continue
        run = subprocess.run([python, str(clone / script.relative_to(ROOT)), "--help"], cwd=elsewhere, env=env,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0 and "usage:" in run.stdout, (script.name, run.stderr[-2000:])


def test_callbacks_of_another_checkout_are_refused(tmp_path):
    # qat_rep from one checkout with the callbacks/ folder of another (an editable install of a second checkout)
    other = tmp_path / "other"
    shutil.copytree(ROOT / "callbacks", other / "callbacks", ignore=shutil.ignore_patterns("__pycache__"))
    code = f"""
import importlib.util, sys
import qat_rep
spec = importlib.util.spec_from_file_location("qat_rep.callbacks", {str(other / "callbacks" / "__init__.py")!r},
                                              submodule_search_locations=[{str(other / "callbacks")!r}])
module = importlib.util.module_from_spec(spec)
sys.modules["qat_rep.callbacks"] = module
try:
    spec.loader.exec_module(module)
except ImportError as e:
    print(e)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "two different checkouts" in out.stdout, out.stdout


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
