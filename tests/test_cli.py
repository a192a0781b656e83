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


@pytest.mark.slow
def test_console_script_module_runs():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "qat_rep.cli", "--help"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0
    for command in ("inspect", "export", "verify", "bench"):
        assert command in proc.stdout


@pytest.mark.slow
def test_inspect_table_and_json(artifact, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "240")  # rich wraps tables to the terminal width
    assert main(["inspect", str(artifact)]) == 0
    out = capsys.readouterr().out
    assert "23 quantized layers" in out and "stage3.13.rbr_reparam" in out and "linear" in out
    assert main(["inspect", str(artifact), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["metadata"]["model"]["name"] == "qarepvgg_a0"
    assert len(data["layers"]) == 23 and data["layers"][0]["w_bits"] == 8


@pytest.mark.slow
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


@pytest.mark.slow
def test_bench(artifact, tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    assert main(["bench", str(artifact), "--batch", "1", "2", "--threads", "1", "--repeats", "2", "--json",
                 str(out_json)]) == 0
    assert "INT8/FP32" in capsys.readouterr().out
    rows = json.loads(out_json.read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 2] and all(r["int8_ms"] > 0 and r["fp32_ms"] > 0 for r in rows)


@pytest.mark.slow
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


@pytest.fixture(scope="module")
def onnx_file(artifact, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli_onnx") / "m.onnx"
    assert main(["export", str(artifact), "--out", str(path)]) == 0
    return path


def _copy(artifact: Path, tmp_path: Path) -> Path:
    out = tmp_path / "art"
    out.mkdir()
    for f in artifact.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out


def _forge(directory: Path, edit) -> None:
    import hashlib

    from qat_rep.export import canonical_json

    meta = json.loads((directory / META_FILE).read_text())
    edit(meta)
    meta["artifact_sha256"] = hashlib.sha256(canonical_json(
        {k: v for k, v in meta.items() if k != "artifact_sha256"})).hexdigest()
    (directory / META_FILE).write_text(json.dumps(meta))


def _edit(directory: Path, edit) -> None:
    meta = json.loads((directory / META_FILE).read_text())
    edit(meta)
    (directory / META_FILE).write_text(json.dumps(meta))


def _onnx_case(kind: str, onnx_file: Path, tmp_path: Path) -> Path:
    bad = tmp_path / f"{kind}.onnx"
    data = onnx_file.read_bytes()
    if kind == "truncated":
        bad.write_bytes(data[: len(data) // 3])
    elif kind == "empty":
        bad.write_bytes(b"")
    elif kind == "text":
        bad.write_text("this is not a model\n")
    else:  # flipped bytes all over the protobuf
        flipped = bytearray(data)
        for i in range(0, len(flipped), 97):
            flipped[i] ^= 0xA5
        bad.write_bytes(bytes(flipped))
    return bad


@pytest.mark.slow
@pytest.mark.parametrize("case, expect", [
    ("onnx:truncated", "is not a readable ONNX model"),
    ("onnx:empty", "is not a readable ONNX model"),
    ("onnx:text", "is not a readable ONNX model"),
    ("onnx:flipped", "is not a readable ONNX model"),
    ("image-size", r"takes inputs of shape Nx3x8x8, the data gives 64x3x24x24; pass the image size"),
    ("edited-architecture", "was modified after it was written"),
    ("edited-granularity", "was modified after it was written"),
    ("forged-input-shape", "input_shape must be null or 4 integers"),
    ("forged-num-classes", "do not fit the model described"),
    ("nested-json", "nested too deeply"),
    ("file-as-artifact", "is a file, not an artifact directory"),
    ("crafted-cifar", "is not a CIFAR-10 python batch"),
])
def test_every_bad_input_is_one_line_and_exit_2(case, expect, artifact, onnx_file, tmp_path, capsys):
    """Each case printed a traceback with exit status 1, or a misleading text, before."""
    art, onnx_path, extra = _copy(artifact, tmp_path), onnx_file, []
    named = None  # the file the message must name
    if case.startswith("onnx:"):
        onnx_path = named = _onnx_case(case[5:], onnx_file, tmp_path)
    elif case == "image-size":
        extra, named = ["--image-size", "24"], onnx_file
    elif case == "edited-architecture":
        _edit(art, lambda m: m["model"].update(num_classes=12))
    elif case == "edited-granularity":
        _edit(art, lambda m: (m["quant_config"].update(w_granularity="per_tensor"), m.update(w_granularity="per_tensor")))
    elif case == "forged-input-shape":
        _forge(art, lambda m: m.update(input_shape=[1, 3, "16", 16]))
    elif case == "forged-num-classes":
        _forge(art, lambda m: m["model"].update(num_classes=10 ** 12))
    elif case == "nested-json":
        (art / META_FILE).write_text("[" * 100000 + "]" * 100000)
    elif case == "file-as-artifact":
        art = named = art / META_FILE
    elif case == "crafted-cifar":
        import pickle

        from helpers import PicklePayload

        data = tmp_path / "cifar"
        data.mkdir()
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            (data / name).write_bytes(pickle.dumps({"data": PicklePayload(tmp_path / "pwned"), "labels": [0]}))
        extra, named = ["--data", str(data)], data / "data_batch_1"
    capsys.readouterr()
    code = main(["verify", str(onnx_path), "--artifact", str(art), "--max-batches", "1", *extra])
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if line.strip()]
    assert code == 2, captured.out
    assert len(lines) == 1, lines
    assert "qat-rep verify: error:" in lines[0] and "Traceback" not in lines[0]
    assert expect in lines[0] or __import__("re").search(expect, lines[0]), lines[0]
    assert str(named if named is not None else art / META_FILE) in lines[0]
    assert not (tmp_path / "pwned").exists()


@pytest.mark.slow
def test_inspect_json_is_valid_json_and_shows_what_the_tensors_say(artifact, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "240")
    assert main(["inspect", str(artifact), "--json"]) == 0

    def no_constants(name):
        raise AssertionError(f"bare {name} in the JSON output")

    data = json.loads(capsys.readouterr().out, parse_constant=no_constants)
    assert {tuple(row[k] for k in ("w_bits", "a_bits")) for row in data["layers"]} == {(8, 8)}
    assert main(["inspect", str(artifact)]) == 0
    assert "W8A8 per_channel (from the layers)" in capsys.readouterr().out
