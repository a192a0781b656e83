"""Small shared helpers for the benchmark scripts: timing, machine stamp, atomic table/JSON writing."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable
from qat_rep.export.atomic import write_text_atomic as write_atomic  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def median_time(fn: Callable[[], Any], warmup: int = 3, repeats: int = 20) -> float:
    """Median wall time of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def stamp() -> dict[str, Any]:
    """Commit, date and machine, for every result file."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    import torch

    return {
        "commit": commit,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, torch {torch.__version__}",
    }


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)




def write_results(name: str, payload: dict[str, Any], table_md: str) -> None:
    """Write ``results/<name>.json`` and ``results/<name>.md`` (table plus stamp)."""
    info = stamp()
    write_atomic(RESULTS / f"{name}.json", json.dumps({**info, **payload}, indent=2) + "\n")
    header = f"_commit {info['commit']}, {info['date']}, {info['machine']}_\n\n"
    write_atomic(RESULTS / f"{name}.md", header + table_md + "\n")
