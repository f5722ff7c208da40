"""The workspace: identity names, where artifacts live, identities.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from core.errors import InputError
from core.workspace import IDENTITIES_FILE, Workspace, check_identity_name

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------------- workspace


@pytest.mark.parametrize("name", ["demo", "a", "x_1-2", "0abc", "a" * 64])
def test_identity_name_accepted(name: str) -> None:
    assert check_identity_name(name) == name


@pytest.mark.parametrize("name", ["../x", "a/b", "Bob Smith", "Demo", "-x", "_x", "", "a" * 65, "b" * 200, "demo\n",
                                  "dé"])
def test_identity_name_rejected(name: str) -> None:
    with pytest.raises(InputError) as info:
        check_identity_name(name)
    message = str(info.value)
    assert "\n" not in message
    assert "identity name" in message
    assert len(message) < 200


def test_identity_name_not_a_string_is_input_error() -> None:
    with pytest.raises(InputError):
        check_identity_name(None)  # type: ignore[arg-type]


def test_identity_dir_refuses_path_traversal(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    assert ws.artifact_dir("ingest", "demo") == tmp_path / "data" / "identities" / "demo" / "ingest"
    with pytest.raises(InputError):
        ws.identity_dir("../x")


def test_register_identity_sorted_unique(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    assert ws.identities() == []
    for name in ("zeta", "alpha", "zeta", "mid", "alpha"):
        ws.register_identity(name)
    assert ws.identities() == ["alpha", "mid", "zeta"]
    data = yaml.safe_load((tmp_path / IDENTITIES_FILE).read_text())
    assert data == {"identities": ["alpha", "mid", "zeta"]}
    # no temporary file left; the state directory holds the records lock
    assert sorted(p.name for p in tmp_path.iterdir()) == [".anchor", IDENTITIES_FILE]
    assert [p.name for p in (tmp_path / ".anchor").rglob("*") if p.is_file()] == ["records.lock"]


def test_register_identity_refuses_bad_name(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    ws.register_identity("demo")
    before = (tmp_path / IDENTITIES_FILE).read_text()
    with pytest.raises(InputError):
        ws.register_identity("Bad Name")
    assert (tmp_path / IDENTITIES_FILE).read_text() == before


def test_a_worker_runs_only_its_own_workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`anchor worker` binds its runs to its workspace: a run for another path (another machine's, or another
    workspace of this one) fails before it touches anything, naming both; the same path, spelled otherwise, runs."""
    from core.workspace import WORKER_WORKSPACE_ENV, bound_workspace

    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    mine.mkdir()
    monkeypatch.delenv(WORKER_WORKSPACE_ENV, raising=False)
    monkeypatch.setenv("ANCHOR_WORKSPACE", str(mine))  # `-w`'s default binds nothing: only a worker binds
    assert bound_workspace(str(theirs)).root == theirs  # no worker: the run's own path
    monkeypatch.setenv(WORKER_WORKSPACE_ENV, str(mine))
    (tmp_path / "link").symlink_to(mine)
    assert bound_workspace(str(tmp_path / "link")).root == tmp_path / "link"  # the same place, named otherwise
    with pytest.raises(InputError, match=f"serves the workspace {mine}; the run is for {theirs}"):
        bound_workspace(str(theirs))
