"""The public API is small, written down in the README's "API" table, and the only thing modules share privately.

- the union of the ``__all__`` lists of the API modules is at most 45 names, and the README's table lists exactly
  each module's ``__all__``;
- no other module of the package defines an ``__all__`` (a name is public by being in the table, nowhere else);
- no module of ``qat_rep``, ``callbacks``, ``recipes`` or ``benchmarks`` imports another module's ``_private`` name.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
API_MODULES = ["qat_rep", "qat_rep.quant", "qat_rep.ptq", "qat_rep.export", "qat_rep.models", "qat_rep.data",
               "qat_rep.detection", "qat_rep.callbacks"]
API_FILES = {"qat_rep/__init__.py", "qat_rep/quant/__init__.py", "qat_rep/ptq/__init__.py", "qat_rep/export/__init__.py",
             "qat_rep/models/__init__.py", "qat_rep/data.py", "qat_rep/detection/__init__.py", "callbacks/__init__.py"}
MAX_PUBLIC_NAMES = 45


def readme_api_table() -> dict[str, set[str]]:
    """``{module: names}`` from the rows of the README's "API" table (a module may span several rows)."""
    section = (ROOT / "README.md").read_text().split("\n## API\n", 1)[1].split("\n## ", 1)[0]
    table: dict[str, set[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].startswith("`"):
            continue
        table.setdefault(cells[0].strip("`"), set()).update(re.findall(r"`(\w+)`", cells[1]))
    return table


def test_public_names_are_few_and_exist():
    union: set[str] = set()
    for name in API_MODULES:
        module = importlib.import_module(name)
        assert len(module.__all__) == len(set(module.__all__)), name
        for public in module.__all__:
            assert hasattr(module, public), f"{name}.{public}"
        union.update(module.__all__)
    assert len(union) <= MAX_PUBLIC_NAMES, sorted(union)


def test_readme_api_table_matches_all():
    table = readme_api_table()
    assert sorted(table) == sorted(API_MODULES)
    for name in API_MODULES:
        assert table[name] == set(importlib.import_module(name).__all__), name


def test_only_api_modules_define_all():
    found = set()
    for base in ("qat_rep", "callbacks"):
        for path in sorted((ROOT / base).rglob("*.py")):
            tree = ast.parse(path.read_text())
            if any(isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets)
                   for node in tree.body):
                found.add(path.relative_to(ROOT).as_posix())
    assert found == API_FILES


def project_module_names() -> set[str]:
    """Top-level names this repository's code imports as its own: the package and the recipes' and benchmarks'
    modules (a script's folder is on ``sys.path``)."""
    return {"qat_rep"} | {p.stem for folder in ("recipes", "benchmarks") for p in (ROOT / folder).glob("*.py")}


def private_imports(source: str, filename: str, package_dir: Path | None, own: set[str]) -> list[str]:
    """Where ``source`` imports a ``_private`` name of another module of this project.

    A private submodule (``_compat``) may be imported by the package that holds it (``from . import _compat``,
    ``from ._compat import X``); third-party private names are not this test's business.
    """
    tree = ast.parse(source)
    found, module_aliases = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            ours = node.level > 0 or (node.module or "").split(".")[0] in own
            if not ours:
                continue
            path = (node.module or "").split(".")
            if any(p.startswith("_") and not p.startswith("__") for p in path) and node.level != 1:
                found.append(f"{filename}:{node.lineno}: private module {node.module}")
            for alias in node.names:
                private = alias.name.startswith("_") and not alias.name.startswith("__")
                own_submodule = (node.level == 1 and not node.module and package_dir is not None
                                 and (package_dir / f"{alias.name}.py").is_file())
                if private and not own_submodule:
                    found.append(f"{filename}:{node.lineno}: {alias.name} from {'.' * node.level}{node.module or ''}")
                elif not private:
                    module_aliases.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in own:
                    module_aliases.add((alias.asname or alias.name).split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in module_aliases:
                found.append(f"{filename}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_private_import_check_can_fail():
    own = {"qat_rep", "recipe_common"}
    assert private_imports("from .onnx_export import _uncalibrated\n", "a.py", ROOT / "qat_rep/export", own)
    assert private_imports("from qat_rep.reparam import _flatten\n", "a.py", None, own)
    assert private_imports("import recipe_common\nrecipe_common._parser()\n", "a.py", None, own)
    assert private_imports("from qat_rep.callbacks._compat import FLAVORS\n", "a.py", None, own)
    assert not private_imports("from . import _origin\nfrom ._compat import FLAVORS\n", "a.py", ROOT / "callbacks", own)
    assert not private_imports("from torch.nn.modules.batchnorm import _BatchNorm\n", "a.py", None, own)


@pytest.mark.parametrize("folder", ["qat_rep", "callbacks", "recipes", "benchmarks"])
def test_no_module_imports_another_modules_private_name(folder):
    own = project_module_names()
    found = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        package_dir = path.parent if (path.parent / "__init__.py").is_file() else None
        found += private_imports(path.read_text(), path.relative_to(ROOT).as_posix(), package_dir, own)
    assert not found, "\n".join(found)


@pytest.mark.parametrize("shared,folder", [("recipe_common", "recipes"), ("recipe_ptq", "recipes")])
def test_shared_script_module_all_is_current(shared, folder):
    # the module the recipes share lists what they take from it, and nothing that is gone
    module = importlib.import_module(shared)
    assert all(hasattr(module, name) for name in module.__all__), shared
    taken = set()
    for path in (ROOT / folder).glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == shared:
                taken.update(alias.name for alias in node.names)
            elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                  and node.value.id in {shared, "common"} and path.stem != shared):
                if shared == "recipe_common" or node.value.id == shared:
                    taken.add(node.attr)
    assert taken <= set(module.__all__), sorted(taken - set(module.__all__))


def test_comments_cite_only_what_a_reader_can_find():
    # no notes files outside the repository, no bare issue numbers ("#5"), no "the target": a reference
    # names the file in this repository, or the other project and its issue
    pattern = re.compile(r"(?<![\w&/])#\d+\b|\b(?:FACTS|DESIGN|STYLE)\.md\b|\bthe issue(?:'s)?\b", re.IGNORECASE)
    found = []
    for folder in ("qat_rep", "callbacks", "recipes", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not found, "\n".join(found)
