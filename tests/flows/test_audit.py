"""anchor audit: a flipped byte named with its artifact and the stage that made it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.workspace import Workspace
from tasks.registry import artifact_dir
from tests.conftest import ONBOARDED_ID, anchor, cli, copy_workspace

pytestmark = pytest.mark.slow
ID = ONBOARDED_ID


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory, trained: Path) -> Workspace:
    return Workspace(copy_workspace(trained, tmp_path_factory.mktemp("ws") / "ws"))


def test_a_cached_onboard_starts_nothing_rewrites_nothing_and_is_recorded(ws: Workspace, short_video: Path) -> None:
    """`anchor bench cached`'s measuring code on the onboarded identity, each run as a user's (its own process,
    Prefect's home in the workspace): every stage cached, so no Prefect server and no stage; each stage a cache hit
    in the ledger under one run; the re-run writes nothing but the ledger."""
    from cli.benchmarks import cached_onboard
    from core import ledger

    rows_before = len(ledger.read(ws.ledger_dir))
    result = cached_onboard(short_video, ws.root, repeat=1, name=ID)
    assert result["files_rewritten"] == 0, result["rewritten"]
    assert result["cached_s"] > 0 and len(result["cached_runs_s"]) == 1
    rows = ledger.read(ws.ledger_dir).iloc[rows_before:]
    assert len(rows) == 16 and rows["cache_hit"].all() and rows["run_id"].nunique() == 2
    assert sorted(rows["stage"].unique()) == sorted(["source", "ingest", "keypoints", "matting", "smplx_fit",
                                                     "perturb", "speech", "render_mesh"])
    assert not list((ws.state / "prefect").glob("*.db"))  # no embedded server started: its database would be there


def test_audit_names_a_flipped_byte_with_its_artifact_and_stage(ws: Workspace, short_video: Path) -> None:
    recorded = anchor(ws.root, "onboard", ID, "--video", str(short_video))  # every stage cached; recorded in DVC
    assert recorded.returncode == 0, recorded.stderr
    clean = cli(ws.root, "audit", ID)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "0 problem(s)" in clean.stdout
    frame = next((artifact_dir(ws, "ingest", ID) / "frames").rglob("*.jpg"))
    original = frame.read_bytes()
    frame.write_bytes(original[:100] + bytes([original[100] ^ 1]) + original[101:])
    try:
        found = anchor(ws.root, "audit", ID, "--json")
        assert found.returncode == 1, found.stdout + found.stderr
        findings = json.loads(found.stdout)["findings"]
        where = f"data/identities/{ID}/ingest"
        assert {(f["path"], f["stage"], f["owner"], f["check"]) for f in findings} == {
            (where, "ingest", ID, "manifest"), (where, "ingest", ID, "dvc.lock")}
        shown = anchor(ws.root, "audit")  # every identity
        assert shown.returncode == 1 and f"{where}: content differs from its manifest" in shown.stderr
    finally:
        frame.write_bytes(original)
    assert anchor(ws.root, "audit", ID).returncode == 0
