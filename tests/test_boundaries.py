"""The layering rules, checked on the source: engine/ imports neither Flask nor Celery,
and workers/ never imports api/."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("engine", {"flask", "flask_jwt_extended", "flask_smorest", "celery", "api", "workers"}),
        ("workers", {"api", "flask"}),
    ],
)
def test_layering(package, forbidden):
    modules = imported_modules(package)
    assert modules, f"no modules found under {package}/"
    offenders = {path: names & forbidden for path, names in modules.items() if names & forbidden}
    assert offenders == {}
