"""RepQATCallback configured from a LightningCLI config file — the README's — : arguments parsed, QAT run,
artifacts written. LightningCLI needs ``jsonargparse[signatures]``, which the test extra installs (no skip: a
missing install must fail)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "lightning_cli.py"
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _readme_callbacks() -> list[dict]:
    (block,) = re.findall(r"```yaml\n(.*?)```", README, flags=re.S)
    return yaml.safe_load(block)["trainer"]["callbacks"]


@pytest.mark.slow
def test_callback_from_the_readme_lightning_cli_config(tmp_path):
    (callback,) = _readme_callbacks()
    assert callback["class_path"] == "qat_rep.callbacks.RepQATCallback"
    args = callback["init_args"]
    # a short run: write under tmp_path, check one validation batch, no progress bar
    args.update(export_dir=str(tmp_path / "deploy"), verify_batches=1, progress=False, calib_batches=1)
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1,
                    "logger": False, "enable_checkpointing": False, "enable_model_summary": False,
                    "default_root_dir": str(tmp_path), "callbacks": [callback]},
        "model": {"model_name": "qarepvgg_a0", "small_input": True},
        "data": {"image_size": 16, "batch_size": 16, "limit": 32, "val_limit": 16},
    }
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(config))
    out = subprocess.run([sys.executable, str(SCRIPT), "fit", "--config", str(cfg)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    meta = json.loads((tmp_path / "deploy" / "qat_rep.json").read_text())
    # the nested dicts reached the callback: the README's QuantConfig fields, not the defaults
    for key, value in args["config"].items():
        assert meta["quant_config"][key] == value
    verify = json.loads((tmp_path / "deploy" / "onnx_verify.json").read_text())
    assert verify["layout"] == args["onnx"] and verify["samples"] == 16 and verify["agreement"] >= 0.995
    # LightningCLI saves the resolved config in trainer.log_dir (default_root_dir without a logger)
    text = (tmp_path / "config.yaml").read_text()
    assert "qat_rep.callbacks.RepQATCallback" in text and "verify_batches: 1" in text
    saved = yaml.safe_load(text)["trainer"]["callbacks"][0]["init_args"]["schedule"]
    assert {k: saved[k] for k in args["schedule"]} == args["schedule"]  # resolved to a full Schedule
