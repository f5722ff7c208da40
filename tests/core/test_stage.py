"""The code in a stage's cache key: derived from its imports, so every edit to code it runs invalidates it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from core.stage import PROJECT_PACKAGES, code_hash_of, import_closure
from tasks.registry import STAGES
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the project's code to edit."""
    root = tmp_path_factory.mktemp("code")
    for package in PROJECT_PACKAGES:
        shutil.copytree(ROOT / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _hashes(root: Path) -> dict[str, str]:
    return {s.name: code_hash_of(s.module, root=root) for s in STAGES.values()}


def _file(root: Path, module: str) -> Path:
    base = root.joinpath(*module.split("."))
    return base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"


def test_the_copy_hashes_like_the_project(tree: Path) -> None:
    assert _hashes(tree) == {s.name: s.code_hash() for s in STAGES.values()}


def test_editing_any_module_a_stage_imports_changes_its_hash_and_only_where_it_is_imported(tree: Path) -> None:
    closures = {s.name: set(import_closure(s.module, tree)) for s in STAGES.values()}
    before = _hashes(tree)
    modules = sorted(set().union(*closures.values()))
    assert "tasks.smplx_table" in closures["render_body"] and "models.retarget" in closures["motion"]
    assert "tasks.stages.keypoints" in closures["metrics"] and "models.motion_io" in closures["motion"]
    for module in modules:
        path = _file(tree, module)
        original = path.read_text()
        path.write_text(original + "\n_EDITED_BY_TEST = 1\n")
        try:
            after = _hashes(tree)
        finally:
            path.write_text(original)
        changed = {name for name in before if after[name] != before[name]}
        assert changed == {name for name, closure in closures.items() if module in closure}, module
    assert _hashes(tree) == before


def test_an_unrelated_module_a_comment_or_a_docstring_changes_no_hash(tree: Path) -> None:
    before = _hashes(tree)
    unrelated = _file(tree, "flows.audit")
    stage = _file(tree, "tasks.stages.ingest")
    originals = {p: p.read_text() for p in (unrelated, stage)}
    try:
        unrelated.write_text(originals[unrelated] + "\n_EDITED_BY_TEST = 1\n")
        text = originals[stage]
        edited = text.replace('"""ingest:', '"""ingest (reworded):', 1) + "\n# a comment\n"
        assert edited != text
        stage.write_text(edited)
        assert _hashes(tree) == before
    finally:
        for p, text in originals.items():
            p.write_text(text)


def test_imports_only_for_type_checking_are_not_code_the_stage_runs(tmp_path: Path) -> None:
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "__init__.py").write_text("")
    (tmp_path / "core" / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from core import b\n"
        "def f():\n    from core.c import g\n    return g\n")
    (tmp_path / "core" / "b.py").write_text("X = 1\n")
    (tmp_path / "core" / "c.py").write_text("def g():\n    return 2\n")
    assert import_closure("core.a", tmp_path) == ["core", "core.a", "core.c"]  # a function's import counts too
