"""Layers import downward only: models ← tasks ← flows ← service ← cli, core at the bottom; stages live in
tasks/stages/."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from core.stage import PROJECT_PACKAGES
from tests.conftest import ROOT

# what each package may import from this project
ALLOWED = {
    "core": {"core"},
    "models": {"models", "core.errors"},
    "tasks": {"core", "models", "tasks"},
    "flows": {"core", "models", "tasks", "flows"},
    "service": {"core", "models", "tasks", "flows", "service"},
    "cli": {"core", "models", "tasks", "flows", "service", "cli"},
}


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module)
    return [n for n in names if n.split(".")[0] in PROJECT_PACKAGES]


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_no_import_goes_upward(package: str) -> None:
    allowed = ALLOWED[package]
    wrong = [f"{path.relative_to(ROOT)}: {name}" for path in sorted((ROOT / package).rglob("*.py"))
             for name in _imports(path)
             if not any(name == a or name.startswith(a + ".") for a in allowed)]
    assert not wrong, wrong


def test_every_module_in_tasks_stages_is_a_declared_stage_and_nothing_else_is() -> None:
    from tasks.registry import STAGES

    modules = {p.stem for p in (ROOT / "tasks" / "stages").glob("*.py") if p.stem != "__init__"}
    assert modules == {s.module.rsplit(".", 1)[1] for s in STAGES.values()}
    assert all(s.module.startswith("tasks.stages.") for s in STAGES.values())
    outside = [p.name for p in (ROOT / "tasks").glob("*.py") if re.search(r"^STAGE = ", p.read_text(), re.M)]
    assert not outside
