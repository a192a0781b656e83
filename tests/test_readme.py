"""The README never rots: its Python snippets run, and CI runs its test command verbatim."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SNIPPETS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def _quickstart_commands() -> list[str]:
    section = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return [c.strip() for c in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_quickstart_has_exactly_two_commands():
    cmds = _quickstart_commands()
    assert len(cmds) == 2 and all("\n" not in c for c in cmds), cmds
    assert "recipes/qat_b0.py" in cmds[0] and "pytest" in cmds[1]


def test_ci_runs_readme_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _quickstart_commands()[1] in ci


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_snippet_runs(index, tmp_path):
    # each snippet runs in a fresh interpreter, from an empty folder, as a user would paste it
    path = tmp_path / f"snippet_{index}.py"
    path.write_text(SNIPPETS[index])
    proc = subprocess.run([sys.executable, str(path)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_quickstart_embeds_the_collected_default_run():
    """The Quickstart's figure and numbers are the ones benchmarks/run_all.py builds from the committed
    benchmarks/results/qat_b0.json, and every image the README embeds is a file in the repository."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("qat_rep_run_all", ROOT / "benchmarks" / "run_all.py")
    run_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_all)
    section = run_all.quickstart_section()
    quickstart = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    assert section is not None and section in quickstart
    images = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", README)
    assert "benchmarks/results/qat_b0.png" in images
    for image in images:
        assert (ROOT / image).is_file(), image
