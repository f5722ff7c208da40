"""Studio operations on a real onboarded identity: one writer per artifact."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from filelock import FileLock

from core.artifacts import read_manifest
from core.workspace import Workspace
from tests.conftest import ONBOARDED_ID, ROOT, copy_workspace

pytestmark = pytest.mark.slow
ID = ONBOARDED_ID


def _stage_run(root: Path, stage: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "cli.main", "-w", str(root), "stage", "run", stage, ID], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _lock(ws: Workspace, stage: str) -> FileLock:
    return FileLock(ws.state / "locks" / f"{stage}@{ID}.lock")


def test_a_second_writer_waits_then_takes_what_the_first_made(onboarded: Path, tmp_path: Path) -> None:
    ws = Workspace(copy_workspace(onboarded, tmp_path / "ws"))
    art = ws.artifact_dir("perturb", ID)
    before = read_manifest(art)
    held = _lock(ws, "perturb")
    held.acquire()
    t0 = time.monotonic()
    proc = _stage_run(ws.root, "perturb")
    time.sleep(4.0)
    assert proc.poll() is None  # still waiting
    held.release()  # the "first writer" finishes (its artifact is already in place)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert time.monotonic() - t0 >= 4.0  # it waited for the lock
    assert f"perturb[{ID}]" in stdout
    assert read_manifest(art) == before  # and took the finished artifact instead of writing it again


def test_a_second_writer_stops_with_a_clear_message(onboarded: Path, tmp_path: Path) -> None:
    ws = Workspace(copy_workspace(onboarded, tmp_path / "ws", {"storage": {"lock_wait_s": 1.0}}))
    before = read_manifest(ws.artifact_dir("perturb", ID))
    with _lock(ws, "perturb"):
        proc = _stage_run(ws.root, "perturb")
        _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert f"another run is writing data/identities/{ID}/perturb (waited 1 s" in stderr
    assert read_manifest(ws.artifact_dir("perturb", ID)) == before
    assert not list(ws.artifact_dir("perturb", ID).parent.glob(".perturb.tmp-*"))
