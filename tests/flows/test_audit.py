"""anchor audit: a flipped byte named with its artifact and the stage that made it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.workspace import Workspace
from tasks.registry import artifact_dir
from tests.conftest import ONBOARDED_ID, cli, copy_workspace

pytestmark = pytest.mark.slow
ID = ONBOARDED_ID


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory, trained: Path) -> Workspace:
    return Workspace(copy_workspace(trained, tmp_path_factory.mktemp("ws") / "ws"))


def test_audit_names_a_flipped_byte_with_its_artifact_and_stage(ws: Workspace, short_video: Path) -> None:
    recorded = cli(ws.root, "onboard", ID, "--video", str(short_video))  # every stage cached; recorded in DVC
    assert recorded.returncode == 0, recorded.stderr
    clean = cli(ws.root, "audit", ID)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "0 problem(s)" in clean.stdout
    frame = next((artifact_dir(ws, "ingest", ID) / "frames").rglob("*.jpg"))
    original = frame.read_bytes()
    frame.write_bytes(original[:100] + bytes([original[100] ^ 1]) + original[101:])
    try:
        found = cli(ws.root, "audit", ID, "--json")
        assert found.returncode == 1, found.stdout + found.stderr
        findings = json.loads(found.stdout)["findings"]
        where = f"data/identities/{ID}/ingest"
        assert {(f["path"], f["stage"], f["owner"], f["check"]) for f in findings} == {
            (where, "ingest", ID, "manifest"), (where, "ingest", ID, "dvc.lock")}
        shown = cli(ws.root, "audit")  # every identity
        assert shown.returncode == 1 and f"{where}: content differs from its manifest" in shown.stderr
    finally:
        frame.write_bytes(original)
    assert cli(ws.root, "audit", ID).returncode == 0
