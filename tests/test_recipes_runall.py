"""benchmarks/run_all.py: the README results section is rebuilt from the result files, between its markers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("qat_rep_run_all", ROOT / "benchmarks" / "run_all.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


run_all = _load()


def _results(tmp_path: Path) -> Path:
    d = tmp_path / "results"
    d.mkdir()
    (d / "fuse_speed.md").write_text("| a | b |\n|---|---|\n| 1 | 2 |\n")
    (d / "qat_accuracy.md").write_text("| model | acc |\n|---|---|\n| qarepvgg_a0 | 97.5 |\n")
    (d / "zzz_custom.md").write_text("custom table\n")
    return d


def test_section_orders_known_benchmarks_first_and_is_stamped(tmp_path: Path) -> None:
    section = run_all.results_section(_results(tmp_path))
    assert section.startswith(run_all.START) and section.endswith(run_all.END)
    i_acc, i_fuse, i_custom = (section.index(s) for s in ("97.5", "| 1 | 2 |", "custom table"))
    assert i_acc < i_fuse < i_custom  # ORDER first, then the rest alphabetically
    assert "### zzz_custom" in section and "commit " in section and "CPU cores" in section


def test_readme_is_replaced_between_markers_and_text_around_is_kept(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# T\n\nbefore\n\n{run_all.START}\nOLD TABLE\n{run_all.END}\n\nafter\n")
    assert run_all.rewrite_readme(readme, run_all.results_section(_results(tmp_path))) is True
    text = readme.read_text()
    assert "OLD TABLE" not in text and "97.5" in text
    assert text.startswith("# T\n\nbefore\n\n") and text.endswith("\n\nafter\n")
    assert text.count(run_all.START) == 1 and text.count(run_all.END) == 1
    once = text
    again = tmp_path / "again"
    again.mkdir()
    run_all.rewrite_readme(readme, run_all.results_section(_results(again)))  # idempotent: one section
    assert readme.read_text().count(run_all.START) == 1 and len(readme.read_text()) == len(once)


def test_missing_markers_append_a_results_section(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# T\n")
    assert run_all.rewrite_readme(readme, run_all.results_section(_results(tmp_path))) is False
    assert readme.read_text().startswith("# T\n\n## Results\n\n" + run_all.START)


def test_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no benchmark results"):
        run_all.results_section(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(f"{run_all.END}\n{run_all.START}\n")
    with pytest.raises(ValueError, match="comes before"):
        run_all.rewrite_readme(readme, "x")
    with pytest.raises(SystemExit, match="2"):
        run_all.main(["--only", "no_such_benchmark", "--no-run"])


def test_recipe_results_are_collected_with_table_json_and_plot(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "report.md").write_text("# r\n\n## Results\n\n| method | bits |\n|---|---|\n| FP32 | FP32 |\n\n![p](accuracy.png)"
                                   "\n\n## Files\n\n- x\n")
    (out / "results.json").write_text(json.dumps({"seconds": {"total": 12.0, "cpu": 20.0}}))
    (out / "accuracy.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
    monkeypatch.setattr(run_all, "RESULTS", tmp_path / "results")
    run_all.collect_recipe(out, "qat_b0")
    md = (tmp_path / "results" / "qat_b0.md").read_text()
    assert "| FP32 | FP32 |" in md and "## Files" not in md and "wall time 12 s, CPU time 20 s" in md
    assert (tmp_path / "results" / "qat_b0.png").read_bytes().startswith(b"\x89PNG")
    assert json.loads((tmp_path / "results" / "qat_b0.json").read_text())["seconds"]["cpu"] == 20.0


def test_problem_table_is_built_from_ptq_accuracy_json(tmp_path: Path) -> None:
    d = tmp_path / "results"
    d.mkdir()
    assert run_all.problem_table(d) is None  # no PTQ results yet: the README keeps its placeholder
    summary = [dict(recipe=r, model=m, bits=b, method=k, acc_mean=acc) for r, m, b, k, acc in [
        ("adamw16", "repvgg_a0", "FP32", "fp32", 99.1), ("adamw16", "repvgg_a0", "W8A8", "minmax", 98.2),
        ("adamw16", "repvgg_a0", "W6A6-pt", "minmax", 12.3), ("adamw16", "qarepvgg_a0", "FP32", "fp32", 98.7),
        ("adamw16", "qarepvgg_a0", "W6A6-pt", "minmax", 97.4), ("sgd32", "repvgg_a0", "FP32", "fp32", 99.7)]]
    recipes = dict(adamw16=dict(epochs=4, optimizer="adamw", image_size=16, shift=0),
                   sgd32=dict(epochs=12, optimizer="sgd", image_size=32, shift=3))
    (d / "ptq_accuracy.json").write_text(json.dumps(dict(
        meta=dict(recipes=recipes), summary=summary,
        rows=[dict(recipe="adamw16", seed=0), dict(recipe="adamw16", seed=2), dict(recipe="sgd32", seed=1)])))
    table = run_all.problem_table(d)
    lines = table.splitlines()
    assert lines[0] == run_all.PROBLEM_START and lines[-1] == run_all.PROBLEM_END
    assert "`adamw16` (4 epochs ADAMW at 16×16; seeds 0, 2)" in table
    assert "`sgd32` (12 epochs SGD at 32×32, ±3 px shifts; seeds 1)" in table
    rep = next(line for line in lines if line.startswith("| RepVGG-A0 | adamw16"))
    assert rep.split(" | ")[2:6] == ["99.10", "n/a", "98.20", "12.30"] and rep.count("n/a") == 4
    rep_sgd = next(line for line in lines if line.startswith("| RepVGG-A0 | sgd32"))
    assert rep_sgd.split(" | ")[2] == "99.70" and rep_sgd.count("n/a") == 6
    qa = next(line for line in lines if line.startswith("| QARepVGG-A0 | adamw16"))
    assert qa.split(" | ")[2:6] == ["98.70", "n/a", "n/a", "97.40"]
    readme = tmp_path / "README.md"
    readme.write_text(f"# T\n\n{run_all.PROBLEM_START}\nold\n{run_all.PROBLEM_END}\n\nrest\n")
    assert run_all.rewrite_readme(readme, table, run_all.PROBLEM_START, run_all.PROBLEM_END, append=False)
    assert "old" not in readme.read_text() and readme.read_text().endswith("\n\nrest\n") and "12.30" in readme.read_text()
    plain = tmp_path / "PLAIN.md"
    plain.write_text("# no markers\n")
    assert not run_all.rewrite_readme(plain, table, run_all.PROBLEM_START, run_all.PROBLEM_END, append=False)
    assert plain.read_text() == "# no markers\n"


def _qat_b0_models(rep_fp32: float, qarep_fp32: float, rep_ptq: dict, qarep_ptq: dict) -> dict:
    def model(fp32, ptq, w4):
        cfws = {"cfws/W8A8 per-tensor W": fp32 - 0.25}  # CFWS at the collapsing setting of the data below
        return {"fp32_acc": fp32, "ptq": {f"max/{k}": v for k, v in ptq.items()} | cfws,
                "qat": {"w8a8": {"fakequant_acc": fp32, "ort_agreement": 100.0},
                        "w4a4": {"fakequant_acc": w4, "onnx_skipped": "8-bit only"}}}
    return {"repvgg_a0": model(rep_fp32, rep_ptq, rep_fp32 - 1.25),
            "qarepvgg_a0": model(qarep_fp32, qarep_ptq, qarep_fp32 + 0.5)}


def test_quickstart_numbers_are_built_from_the_collected_default_run(tmp_path: Path) -> None:
    d = tmp_path / "results"
    d.mkdir()
    assert run_all.quickstart_section(d) is None  # nothing collected yet: the README keeps what it has
    (d / "qat_b0.json").write_text(json.dumps({"models": {"qarepvgg_a0": {}}}))
    assert run_all.quickstart_section(d) is None  # a one-model run does not make the comparison
    rep_ptq = {"W8A8": 98.0, "W8A8 per-tensor W": 60.0, "W6A6": 90.0, "W4A4": 10.0}
    qarep_ptq = {"W8A8": 98.5, "W8A8 per-tensor W": 98.0, "W6A6": 97.0, "W4A4": 12.0}
    (d / "qat_b0.json").write_text(json.dumps({
        "validation_images": 359, "stamp": "commit abc1234, 2026-01-01 00:00 UTC",
        "seconds": {"process": 512.4, "total": 500.0, "cpu": 700.0},
        "models": _qat_b0_models(99.0, 98.5, rep_ptq, qarep_ptq)}))
    section = run_all.quickstart_section(d)
    assert section.startswith(run_all.QUICKSTART_START) and section.endswith(run_all.QUICKSTART_END)
    assert "](benchmarks/results/qat_b0.png)" in section and "359 validation images" in section
    assert "commit abc1234" in section and "512 s wall" in section
    # the collapsing setting is where RepVGG loses most above 4 bits (per-tensor W8 here, not W4A4)
    assert ("at W8A8 per-tensor W, where RepVGG loses most above 4 bits: RepVGG-A0 -39.00 points, QARepVGG-A0 -0.50 "
            "(CFWS there: -0.25 and -0.25)") in section
    assert "at W4A4 -89.00 and -86.50" in section
    assert "RepVGG-A0 -1.25 points (99.00 → 97.75), QARepVGG-A0 +0.50 (98.50 → 99.00)" in section
    assert "100.00 % (RepVGG-A0) and 100.00 % (QARepVGG-A0)" in section
    readme = tmp_path / "README.md"
    readme.write_text(f"# T\n\n## Quickstart\n\n{run_all.QUICKSTART_START}\nold\n{run_all.QUICKSTART_END}\n\n## Next\n")
    assert run_all.rewrite_readme(readme, section, run_all.QUICKSTART_START, run_all.QUICKSTART_END, append=False)
    assert readme.read_text() == f"# T\n\n## Quickstart\n\n{section}\n\n## Next\n"
