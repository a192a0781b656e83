"""The ``qat-rep`` console script: every sub-command, its ``--help`` and its error path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from qat_rep.cli import build_parser, main
from qat_rep.export import META_FILE, save_quantized
from test_export_onnx import SIZE, converted_copy

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    return save_quantized(converted_copy(), tmp_path_factory.mktemp("cli") / "art", input_shape=(1, 3, SIZE, SIZE))


@pytest.mark.parametrize("command", ["inspect", "export", "verify", "bench"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: qat-rep {command}" in out


def test_console_script_module_runs():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "qat_rep.cli", "--help"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0
    for command in ("inspect", "export", "verify", "bench"):
        assert command in proc.stdout


def test_inspect_table_and_json(artifact, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "240")  # rich wraps tables to the terminal width
    assert main(["inspect", str(artifact)]) == 0
    out = capsys.readouterr().out
    assert "23 quantized layers" in out and "stage3.13.rbr_reparam" in out and "linear" in out
    assert main(["inspect", str(artifact), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["metadata"]["model"]["name"] == "qarepvgg_a0"
    assert len(data["layers"]) == 23 and data["layers"][0]["w_bits"] == 8


def test_export_then_verify(artifact, tmp_path, capsys):
    onnx_path, fp32_path = tmp_path / "m.onnx", tmp_path / "m_fp32.onnx"
    assert main(["export", str(artifact), "--out", str(onnx_path), "--fp32", str(fp32_path)]) == 0
    ops = {n.op_type for n in onnx.load(str(onnx_path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert "QuantizeLinear" not in {n.op_type for n in onnx.load(str(fp32_path)).graph.node}
    capsys.readouterr()
    result_json = tmp_path / "verify.json"
    code = main(["verify", str(onnx_path), "--artifact", str(artifact), "--max-batches", "2", "--json",
                 str(result_json), "--min-agreement", "0.99"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "top-1 agreement" in out
    result = json.loads(result_json.read_text())
    assert result["samples"] == 128 and result["agreement"] >= 0.99
    # an impossible threshold turns into exit status 1
    assert main(["verify", str(onnx_path), "--artifact", str(artifact), "--max-batches", "1",
                 "--min-agreement", "1.01"]) == 1


def test_bench(artifact, tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    assert main(["bench", str(artifact), "--batch", "1", "2", "--threads", "1", "--repeats", "2", "--json",
                 str(out_json)]) == 0
    assert "INT8/FP32" in capsys.readouterr().out
    rows = json.loads(out_json.read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 2] and all(r["int8_ms"] > 0 and r["fp32_ms"] > 0 for r in rows)


def test_errors_are_one_line_and_exit_2(artifact, tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "qat-rep inspect: error:" in capsys.readouterr().out
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / META_FILE).write_text(json.dumps({"format": "qat-rep-int8", "format_version": 99}))
    assert main(["export", str(broken), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "newer than this qat-rep reads" in capsys.readouterr().out
    assert main(["export", str(artifact), "--out", str(tmp_path / "x.onnx"), "--input-shape", "3", "4"]) == 2
    assert "--input-shape takes C H W" in capsys.readouterr().out
    assert not (tmp_path / "x.onnx").exists()


def test_parser_requires_a_command():
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([])
    assert exc.value.code == 2
