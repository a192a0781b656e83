"""Artifacts a hostile or careless user can hand us: what a save may replace, crash safety of the replace, the hash
over the whole description, validation of what a forged description would still get past the hash, and a fuzz
test of load_quantized."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import qat_rep
from qat_rep.export import (
    ARTIFACT_FILES,
    META_FILE,
    WEIGHTS_FILE,
    ArtifactWriteError,
    canonical_json,
    export_onnx,
    load_quantized,
    save_quantized,
)
from qat_rep.export import atomic
from qat_rep.quant import DegenerateCalibrationError, QuantConfig, calibrate, prepare

pytestmark = pytest.mark.slow  # every test saves or loads a full model's artifact

ROOT = Path(__file__).resolve().parents[1]
SIZE = 16


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = qat_rep.create_model("qarepvgg_a0", num_classes=10, small_input=True)
    prepare(m, QuantConfig())
    calibrate(m, [torch.randn(8, 3, SIZE, SIZE)])
    return m.eval()


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory) -> Path:
    return save_quantized(model, tmp_path_factory.mktemp("saved") / "art", input_shape=(1, 3, SIZE, SIZE))


@pytest.fixture
def artifact(saved, tmp_path) -> Path:
    out = tmp_path / "art"
    out.mkdir()
    for f in saved.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out


def _forge(directory: Path, meta: dict) -> None:
    """Write ``meta`` with both hashes recomputed: what only the checks after the hashes can refuse."""
    meta = dict(meta)
    meta["sha256"] = hashlib.sha256((directory / WEIGHTS_FILE).read_bytes()).hexdigest()
    meta["artifact_sha256"] = hashlib.sha256(canonical_json(
        {k: v for k, v in meta.items() if k != "artifact_sha256"})).hexdigest()
    (directory / META_FILE).write_text(json.dumps(meta))


def _meta(directory: Path) -> dict:
    return json.loads((directory / META_FILE).read_text())


# ------------------------------------------------------------------------------------ what a save may replace
def test_project_folder_with_a_stray_qat_rep_json_is_not_replaced(model, tmp_path):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print('mine')")
    (project / "README.md").write_text("# mine")
    (project / META_FILE).write_text('{"name": "some other tool"}')
    with pytest.raises(ArtifactWriteError, match=r"refusing to overwrite .*holds no valid 'qat_rep.json'.*"
                                                 r"README.md, qat_rep.json, src/"):
        save_quantized(model, project)
    assert (project / "src" / "main.py").read_text() == "print('mine')" and (project / "README.md").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]


def test_old_artifact_with_user_files_is_not_replaced(model, artifact):
    (artifact / "my_notes.txt").write_text("notes")
    (artifact / "eval_results").mkdir()
    (artifact / "eval_results" / "top1.csv").write_text("97.5")
    before = {p.name: p.read_bytes() for p in artifact.iterdir() if p.is_file()}
    with pytest.raises(ArtifactWriteError, match=r"also holds eval_results/, my_notes.txt, which qat-rep did not "
                                                 r"write; move them elsewhere"):
        save_quantized(model, artifact)
    assert {p.name: p.read_bytes() for p in artifact.iterdir() if p.is_file()} == before
    assert (artifact / "eval_results" / "top1.csv").read_text() == "97.5"


def test_our_artifact_with_onnx_files_and_stale_temps_is_replaced(model, artifact):
    for name in ARTIFACT_FILES[2:]:
        (artifact / name).write_text("old")
    (artifact / ".model_int8.onnx.ab12cd34.tmp").write_bytes(b"partial")  # a killed export's leftover
    save_quantized(model, artifact, input_shape=(1, 3, SIZE, SIZE))
    assert sorted(p.name for p in artifact.iterdir()) == [WEIGHTS_FILE, META_FILE]
    load_quantized(artifact)
    assert sorted(p.name for p in artifact.parent.iterdir()) == ["art"]


def test_permissions_of_directories_match_files(model, tmp_path):
    art = save_quantized(model, tmp_path / "art")
    assert stat.S_IMODE(art.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in art.iterdir()} == {0o644}


# ---------------------------------------------------------------------------------- the name stays valid
def test_crash_after_the_exchange_leaves_the_new_artifact_in_place(model, artifact, monkeypatch):
    """Two renames left no directory under the name when a crash fell between them; one exchange cannot."""
    old = _meta(artifact)["created_utc"], (artifact / WEIGHTS_FILE).read_bytes()

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic, "_remove_owned", crash)  # dies right after the swap, before the old copy is gone
    model2 = copy.deepcopy(model)
    with torch.no_grad():
        model2.linear.bias.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(model2, artifact)
    assert artifact.is_dir()
    assert (artifact / WEIGHTS_FILE).read_bytes() != old[1]  # the new artifact, complete
    loaded = load_quantized(artifact)
    assert torch.equal(loaded.linear.bias, model2.linear.bias)
    hidden = [p for p in artifact.parent.iterdir() if p.name.startswith(".art.")]
    assert len(hidden) == 1  # the old copy, under the temporary name
    monkeypatch.undo()
    save_quantized(model, artifact)  # the next write removes it
    assert sorted(p.name for p in artifact.parent.iterdir()) == ["art"]


def test_fallback_without_an_atomic_exchange(model, artifact, monkeypatch):
    monkeypatch.setattr(atomic, "_RENAMEAT2", None)
    (artifact / "model_int8.onnx").write_text("stale")
    model2 = copy.deepcopy(model)
    with torch.no_grad():
        model2.linear.bias.add_(1.0)
    save_quantized(model2, artifact)
    assert sorted(p.name for p in artifact.iterdir()) == [WEIGHTS_FILE, META_FILE]
    assert torch.equal(load_quantized(artifact).linear.bias, model2.linear.bias)
    assert sorted(p.name for p in artifact.parent.iterdir()) == ["art"]


_KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from qat_rep.export.atomic import atomic_directory, atomic_file
target = Path(sys.argv[1])
if sys.argv[2] == "dir":
    with atomic_directory(target, marker="qat_rep.json") as tmp:
        (tmp / "model.safetensors").write_bytes(b"x" * 100000)
        os.kill(os.getpid(), signal.SIGKILL)
else:
    with atomic_file(target) as tmp:
        tmp.write_bytes(b"x" * 100000)
        os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dir", "file"])
def test_kill_9_leftovers_are_cleaned_by_the_next_write(model, tmp_path, kind):
    target = tmp_path / ("art" if kind == "dir" else "model.onnx")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(target), kind], env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(f".{target.name}.")]
    assert len(leftovers) == 1 and not target.exists()
    # a write in progress (its lock held) is not a leftover: a concurrent cleaner leaves it alone
    live = tmp_path / f".{target.name}.live0001.tmp"
    (live.mkdir() if kind == "dir" else live.write_bytes(b"y"))
    lock = atomic._hold(live)
    try:
        if kind == "dir":
            save_quantized(model, target)
        else:
            atomic.write_bytes_atomic(target, b"complete")
    finally:
        atomic._release(lock)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, live.name])


# ------------------------------------------------------------------------- the hash covers the description
@pytest.mark.parametrize("edit", [
    lambda m: m["quant_config"].update(w_bits=4),
    lambda m: m.update(w_bits=4),
    lambda m: m["quant_config"].update(w_granularity="per_tensor"),
    lambda m: m["model"].update(num_classes=10 ** 12),
    lambda m: m["model"].update(small_input=False),
    lambda m: m.update(input_shape=[1, 3, 64, 64]),
], ids=["config-bits", "header-bits", "granularity", "num_classes", "architecture", "input_shape"])
def test_an_edited_description_is_refused(artifact, edit):
    meta = _meta(artifact)
    edit(meta)
    (artifact / META_FILE).write_text(json.dumps(meta, indent=2))
    with pytest.raises(ValueError, match="qat_rep.json' was modified after it was written.*re-export the artifact"):
        load_quantized(artifact)


def test_reformatted_json_still_loads(artifact, saved):
    meta = _meta(artifact)
    (artifact / META_FILE).write_text(json.dumps(dict(reversed(list(meta.items()))), indent=7))
    assert torch.equal(load_quantized(artifact).linear.weight, load_quantized(saved).linear.weight)


def test_format_1_artifacts_are_refused(artifact):
    meta = _meta(artifact)
    meta["format_version"] = 1
    _forge(artifact, meta)
    with pytest.raises(ValueError, match="format_version 1, whose hash covers only the weights.*re-export"):
        load_quantized(artifact)


# ------------------------------------------------------------ what a forged description meets after the hash
@pytest.mark.parametrize("edit, match", [
    (lambda m: m["quant_config"].update(w_bits=4), "header says w_bits=8 but quant_config says 4"),
    (lambda m: m["model"].update(num_classes=10 ** 12), r"do not fit the model described .*linear.weight"),
    (lambda m: (m["quant_config"].update(w_granularity="per_tensor"), m.update(w_granularity="per_tensor")),
     r"different shape or dtype: .*_weight_quantizer._amax"),
    (lambda m: m["layer_bits"].update(linear=[4, 8]), r"layer_bits disagree with the QuantConfig for \['linear'\]"),
    (lambda m: m.update(input_shape=[1, 3, -2, 16]), "input_shape must be null or 4 integers"),
    (lambda m: m["model"].update(block=[1, 2]), "describes a model that cannot be built"),
    (lambda m: m.update(weights_file="/etc/passwd"), "weights_file must be 'model.safetensors'"),
])
def test_forged_descriptions_are_refused(artifact, edit, match):
    meta = _meta(artifact)
    edit(meta)
    _forge(artifact, meta)
    with pytest.raises(ValueError, match=match):
        load_quantized(artifact)


@pytest.mark.parametrize("value, match", [
    (0.0, "input of layer 'stage1.0.rbr_reparam' calibrated to amax 0"),
    (-1.0, "input quantizer of layer 'stage1.0.rbr_reparam' holds a negative amax"),
    (float("nan"), "input quantizer of layer 'stage1.0.rbr_reparam' was never calibrated"),
    (float("inf"), "input quantizer of layer 'stage1.0.rbr_reparam' holds a non-finite amax"),
])
def test_stored_amax_is_validated(artifact, value, match):
    tensors = load_file(str(artifact / WEIGHTS_FILE))
    tensors["stage1.0.rbr_reparam._input_quantizer._amax"] = torch.tensor(value)
    save_file(tensors, str(artifact / WEIGHTS_FILE), metadata={"format": "pt"})
    _forge(artifact, _meta(artifact))
    with pytest.raises(DegenerateCalibrationError, match=match):
        load_quantized(artifact)


def test_deeply_nested_json_and_a_file_as_directory(artifact, tmp_path):
    (artifact / META_FILE).write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ValueError, match="nested too deeply"):
        load_quantized(artifact)
    with pytest.raises(NotADirectoryError, match="is a file, not an artifact directory"):
        load_quantized(artifact / WEIGHTS_FILE)


def test_save_and_export_refuse_an_amax_of_zero(model, tmp_path):
    """calibrate() refuses all-zero data now; an amax set to 0 by other means is still refused at save/export."""
    broken = copy.deepcopy(model)
    broken.stage1[0].rep_quant._input_quantizer.set_amax(0.0)
    with pytest.raises(DegenerateCalibrationError, match="input of layer 'stage1.0.rep_quant'"):
        save_quantized(broken, tmp_path / "art")
    with pytest.raises(DegenerateCalibrationError, match="input of layer 'stage1.0.rep_quant'"):
        export_onnx(broken, tmp_path / "m.onnx", torch.zeros(1, 3, SIZE, SIZE))
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ fuzzing
def _equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10 ** 15), max_value=10 ** 15)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6)
_FUZZ = settings(max_examples=20, deadline=timedelta(seconds=60), derandomize=True,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@_FUZZ
@given(which=st.sampled_from([WEIGHTS_FILE, META_FILE]), data=st.data())
def test_fuzz_flipped_bytes(saved, tmp_path_factory, which, data):
    art = tmp_path_factory.mktemp("fuzz") / "art"
    art.mkdir()
    for f in saved.iterdir():
        (art / f.name).write_bytes(f.read_bytes())
    raw = bytearray((art / which).read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    (art / which).write_bytes(bytes(raw))
    try:
        loaded = load_quantized(art)
    except ValueError:
        return
    assert _equal(loaded, load_quantized(saved))  # a flip that kept the canonical JSON (e.g. in whitespace)


@_FUZZ
@given(path=st.sampled_from([("quant_config", "w_bits"), ("quant_config", "w_granularity"), ("quant_config", "skip"),
                             ("model", "num_classes"), ("model", "small_input"), ("model", "name"),
                             ("input_shape",), ("w_bits",), ("layer_bits", "linear"), ("format_version",),
                             ("sha256",), ("weights_file",), ("created_utc",), ("artifact_sha256",)]),
       value=_JSON_VALUES, forge=st.booleans())
def test_fuzz_mutated_json_fields(saved, tmp_path_factory, path, value, forge):
    """Without forging, any change is refused by the digest; with forged hashes the later checks must still give
    one ValueError-family error (never another type) — or a model equal to the original."""
    art = tmp_path_factory.mktemp("fuzz") / "art"
    art.mkdir()
    for f in saved.iterdir():
        (art / f.name).write_bytes(f.read_bytes())
    meta = _meta(art)
    node = meta
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    if forge and path[-1] not in ("sha256", "artifact_sha256"):
        _forge(art, meta)
    else:
        (art / META_FILE).write_text(json.dumps(meta))
    try:
        loaded = load_quantized(art)
    except ValueError:
        return
    if not forge:  # a forged description is simply another artifact; unforged, only a no-op edit may load
        original = load_quantized(saved)
        assert _equal(loaded, original) and loaded.qat_rep_artifact == original.qat_rep_artifact
