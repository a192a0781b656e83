"""The benchmarks' shared helpers (``benchmarks/common.py``): every markdown table comes from ``markdown_table``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from common import markdown_table  # benchmarks/ is on sys.path (tests/conftest.py), as it is for a benchmark script

ROOT = Path(__file__).resolve().parents[1]


def test_markdown_table_rows_and_alignment():
    text = markdown_table(["model", "ms"], [["a0", 1.5], ("b0", "2.0")], align="lr")
    assert text.splitlines() == ["| model | ms |", "| --- | ---: |", "| a0 | 1.5 |", "| b0 | 2.0 |"]
    assert markdown_table(["x"], []) == "| x |\n| --- |"


def test_markdown_table_refuses_a_broken_table():
    with pytest.raises(ValueError, match="a row of 3 cells in a table of 2 columns"):
        markdown_table(["a", "b"], [[1, 2, 3]])
    with pytest.raises(ValueError, match="one of 'l'/'r' per column"):
        markdown_table(["a", "b"], [[1, 2]], align="l")


def test_no_benchmark_builds_a_table_by_hand():
    # a hand-built separator row ("|---|", "| --- |", "---:|") outside the helper
    found = []
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        if path.name == "common.py":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\|\s*-{3,}:?\s*\|", line) or re.search(r'"-{3}\|"', line):
                found.append(f"{path.name}:{i}: {line.strip()}")
    assert not found, "\n".join(found)
