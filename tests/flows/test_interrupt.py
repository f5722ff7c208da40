"""Interrupting a run mid-stage leaves no partial artifact, and the next run resumes after the last whole stage."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core import ledger
from core.artifacts import read_manifest, verify
from core.workspace import Workspace
from tasks.registry import artifact_dir
from tests.conftest import ROOT, anchor, copy_workspace, make_workspace

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


def own_server() -> dict[str, str]:
    """The environment of a command that starts its own embedded Prefect server, as a user's does: a run killed
    with the session's shared server would leave its concurrency slots taken there."""
    return {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}


def start_onboard(root: Path, video: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "cli.main", "-w", str(root), "onboard", "demo", "--video",
                             str(video)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=own_server())


def wait_for_partial(proc: subprocess.Popen[str], parent: Path, stage: str, timeout: float = 180) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(parent.glob(f".{stage}.tmp-*")) if parent.is_dir() else []
        if found:
            return found[0]
        if proc.poll() is not None:
            pytest.fail(f"run ended before {stage} started: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.02)
    pytest.fail(f"{stage} never started")


@pytest.mark.parametrize("sig", [signal.SIGINT])
def test_interrupted_run_leaves_no_partial_artifact_and_resumes(tmp_path: Path, short_video: Path, onboarded: Path,
                                                                  sig: signal.Signals) -> None:
    """The onboarded template without its keypoints: the run takes source and ingest as they are, is stopped
    while keypoints runs, and a second run makes keypoints again (the same bytes, so every later stage is the
    template's, taken as it is). SIGKILL mid-stage: the next test."""
    import shutil

    root = copy_workspace(onboarded, tmp_path / "ws")
    ws = Workspace(root)
    parent = ws.identity_dir("demo")
    template_keypoints = read_manifest(artifact_dir(ws, "keypoints", "demo"))["output_hash"]
    shutil.rmtree(artifact_dir(ws, "keypoints", "demo"))
    proc = start_onboard(root, short_video)
    wait_for_partial(proc, parent, "keypoints")
    time.sleep(0.3)  # well inside the stage
    os.killpg(proc.pid, sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0, stderr[-2000:]
    if sig == signal.SIGINT:  # Ctrl-C stops promptly: the embedded Prefect server is not in the signalled group
        assert "Crash detected! Execution was aborted by an interrupt signal" in stderr, stderr
    time.sleep(1.0)  # let the killed workers go

    assert not artifact_dir(ws, "keypoints", "demo").exists()  # never half an artifact
    ingest_hash = read_manifest(artifact_dir(ws, "ingest", "demo"))["output_hash"]
    assert verify(artifact_dir(ws, "ingest", "demo"), ingest_hash)

    from flows.onboard import onboard

    summary = onboard(str(root), "demo", str(short_video))
    df = ledger.read(ws.ledger_dir)
    rows = {r["stage"]: r for r in df[df["run_id"] == summary["run_id"]].to_dict("records")}
    assert rows["source"]["cache_hit"] and rows["ingest"]["cache_hit"]
    assert not rows["keypoints"]["cache_hit"]
    assert summary["stages"]["keypoints"]["output_hash"] == template_keypoints
    assert summary["stages"]["ingest"]["output_hash"] == ingest_hash
    assert verify(artifact_dir(ws, "keypoints", "demo"), summary["stages"]["keypoints"]["output_hash"])
    assert not [p.name for p in parent.iterdir() if p.name.startswith(".") and ".tmp-" in p.name]


def test_sigkill_at_a_random_point_of_a_multi_identity_run_then_rerun_equals_a_clean_run(
        tmp_path: Path, short_video: Path, onboarded: Path) -> None:
    """Killed inside a stage of one identity, both chosen at random from a seed (ANCHOR_TEST_KILL_SEED replays
    another), the kill landing while that stage's partial artifact exists: always mid-run, never too late."""
    import random

    seed = int(os.environ.get("ANCHOR_TEST_KILL_SEED") or 0)
    pick = random.Random(seed)
    names = ("ann", "bob")
    victim, stage = pick.choice(names), pick.choice(["ingest", "keypoints", "matting", "smplx_fit", "speech",
                                                     "render_mesh"])
    root = make_workspace(tmp_path / "ws")
    ws = Workspace(root)
    cmd = [sys.executable, "-m", "cli.main", "-w", str(root), "onboard", *(f"{n}={short_video}" for n in names)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=own_server())
    wait_for_partial(proc, ws.identity_dir(victim), stage, timeout=300)
    time.sleep(pick.uniform(0.0, 0.2))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill (seed {seed}, {stage}[{victim}])"
    time.sleep(1.0)  # let the killed workers go
    assert not artifact_dir(ws, stage, victim).exists(), f"half an artifact, seed {seed}"  # only its partial
    rows_before = len(ledger.read(ws.ledger_dir))

    rerun = anchor(root, *cmd[5:])  # the same command again, in this process (on the session's server)
    assert rerun.returncode == 0, f"seed {seed}, {stage}[{victim}]: {rerun.stdout[-3000:]}{rerun.stderr[-999:]}"
    rows = ledger.read(ws.ledger_dir).iloc[rows_before:]
    done = rows[(rows["status"] == "completed") & (rows["stage"] != "version")]
    killed = done[(done["stage"] == stage) & (done["identity"] == victim)]
    assert len(killed) == 1 and not killed["cache_hit"].astype(bool).any()  # the killed stage was made again
    template = Workspace(onboarded)
    for name in names:
        for each in ("source", "ingest", "keypoints", "matting", "smplx_fit", "perturb", "render_mesh", "speech"):
            clean = read_manifest(artifact_dir(template, each, "demo"))["output_hash"]
            art = artifact_dir(ws, each, name)
            assert read_manifest(art)["output_hash"] == clean, f"{each}[{name}], seed {seed}"
            assert verify(art, clean), f"{each}[{name}] differs from its manifest, seed {seed}"
        assert not [p.name for p in ws.identity_dir(name).iterdir() if ".tmp-" in p.name], f"seed {seed}"
    assert ws.identities() == list(names)
