"""The import graph runs one way: training never imports benchmarks, and no module imports
another package's underscore names (private helpers stay private to their package)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("runtime", "training", "export", "benchmarks", "serving")


def _imports(path: Path, package: tuple[str, ...] | None = None) -> list[tuple[str, list[str], int]]:
    """(module, names, line) of each import in ``path`` (relative imports resolved against
    ``package``, default the path's place in the repository)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = package or path.relative_to(ROOT).with_suffix("").parts
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                module = ".".join([*package[: len(package) - node.level], *filter(None, [module])])
            out.append((module, [alias.name for alias in node.names], node.lineno))
    return out


def _modules() -> list[Path]:
    return [p for name in PACKAGES for p in sorted((ROOT / name).rglob("*.py"))]


def test_no_training_module_imports_benchmarks() -> None:
    bad = [f"{p.relative_to(ROOT)}:{line} imports {module}"
           for p in sorted((ROOT / "training").rglob("*.py"))
           for module, _, line in _imports(p) if module.split(".")[0] == "benchmarks"]
    assert not bad, "\n".join(bad)


def test_no_module_imports_another_packages_underscore_names() -> None:
    bad = []
    for path in _modules():
        own = path.relative_to(ROOT).parts[0]
        for module, names, line in _imports(path):
            top = module.split(".")[0]
            if top not in PACKAGES or top == own:
                continue
            private = [n for n in names if n.startswith("_")]
            private += [part for part in module.split(".") if part.startswith("_") and part != "__init__"]
            if private:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {', '.join(private)} from {module}")
    assert not bad, "\n".join(bad)


def test_the_checks_see_a_violation(tmp_path: Path) -> None:
    """The scanner finds an underscore import (so the tests above could fail)."""
    sample = tmp_path / "probe.py"
    sample.write_text("from benchmarks.common import _private\nfrom .. import _x\n", encoding="utf-8")
    found = _imports(sample, ("training", "data", "probe"))
    assert ("benchmarks.common", ["_private"], 1) in found and ("training", ["_x"], 2) in found
