"""Model versions, stale renders, the scheduled re-render through Prefect, and pulling an old version back."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from core.artifacts import read_manifest
from core.workspace import Workspace
from tasks.registry import artifact_dir
from tests.conftest import ONBOARDED_ID, ROOT, anchor, copy_workspace, held_out, render, set_param

pytestmark = pytest.mark.slow
ID = ONBOARDED_ID


@pytest.fixture
def ws(tmp_path: Path, trained: Path) -> Workspace:
    """A private copy of the trained identity for each test: none depends on what another one left."""
    return Workspace(copy_workspace(trained, tmp_path / "ws"))


def test_each_new_model_is_a_version_older_renders_go_stale_and_a_pulled_version_renders_its_video_again(
        ws: Workspace, tmp_path: Path) -> None:
    import shutil

    from flows.versions import current_model, versions

    def status() -> dict:
        done = anchor(ws.root, "status", ID, "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)[0]

    def finetune_steps(n: int) -> subprocess.CompletedProcess[str]:
        params = yaml.safe_load((ws.root / "params.yaml").read_text())
        params["finetune"]["steps"]["tiny"] = n
        (ws.root / "params.yaml").write_text(yaml.safe_dump(params))
        return anchor(ws.root, "finetune", ID, "--no-evaluate")

    def render(out: Path) -> bytes:
        done = anchor(ws.root, "render", ID, "--motion", f"{ID}:test", "--frames", "6", "--seed", "11", "--out",
                      str(out))
        assert done.returncode == 0, done.stderr
        return out.read_bytes()

    params = yaml.safe_load((ws.root / "params.yaml").read_text())
    params["finetune"]["steps"]["tiny"] = 4
    (ws.root / "params.yaml").write_text(yaml.safe_dump(params))
    made = anchor(ws.root, "finetune", ID, "--no-evaluate")  # v1
    assert made.returncode == 0 and f"{ID} model v1 (new" in made.stdout, made.stdout + made.stderr
    video_v1 = render(tmp_path / "v1.mp4")
    first = status()
    assert first["current_version"] == 1 and [v["version"] for v in first["versions"]] == [1]
    # renders made by v1 with today's render params are current (a --seed/--no-face choice is not staleness)
    assert any(not r["stale"] and r["model_version"] == 1 and r["why"] == [] for r in first["renders"])
    tags = subprocess.run(["git", "tag"], cwd=ws.root, capture_output=True, text=True).stdout.split()
    assert f"{ID}-v1" in tags
    assert anchor(ws.root, "push", ID).returncode == 0

    newer = finetune_steps(3)
    assert newer.returncode == 0 and f"{ID} model v2 (new" in newer.stdout, newer.stdout + newer.stderr
    second = status()
    assert second["current_version"] == 2
    # every earlier render is stale now; those v1 made say so (others were made before versioning, by hash)
    assert all(r["stale"] and any(w.startswith("made by model ") and w.endswith(", now v2") for w in r["why"])
               for r in second["renders"])
    by_v1 = [r for r in second["renders"] if r["model_version"] == 1]
    assert by_v1 and all("made by model v1, now v2" in r["why"] for r in by_v1)
    assert f"{ID}-v2" in subprocess.run(["git", "tag"], cwd=ws.root, capture_output=True, text=True).stdout
    lock_v2 = subprocess.run(["git", "show", f"{ID}-v2:dvc.lock"], cwd=ws.root, capture_output=True, text=True)
    assert second["current_model"] not in subprocess.run(["git", "show", f"{ID}-v1:versions.yaml"], cwd=ws.root,
                                                         capture_output=True, text=True).stdout
    assert lock_v2.returncode == 0 and f"finetune@{ID}" in lock_v2.stdout
    table = versions(ws)[ID]
    assert len(table) == 2 and current_model(ws, ID) == table[1]["finetune"]
    assert anchor(ws.root, "push", ID).returncode == 0

    # v1's dvc.lock and `anchor pull` bring its weights back; with nothing cached, its video is made again, the same
    checkout = subprocess.run(["git", "checkout", f"{ID}-v1", "--", "dvc.lock"], cwd=ws.root, capture_output=True,
                              text=True)
    assert checkout.returncode == 0, checkout.stderr
    pulled = anchor(ws.root, "pull", ID)
    assert pulled.returncode == 0, pulled.stderr
    assert current_model(ws, ID) == table[0]["finetune"]
    shutil.rmtree(ws.data / "renders" / ID)
    assert render(tmp_path / "v1-again.mp4") == video_v1

    back = finetune_steps(4)  # the old params again: the same weights, so the same version, nothing new
    assert back.returncode == 0 and f"{ID} model v1 (unchanged" in back.stdout, back.stdout + back.stderr
    assert status()["current_version"] == 1


@pytest.mark.usefixtures("prefect_harness")
def test_a_scheduled_rerender_served_and_triggered_through_prefect_redoes_exactly_the_stale_renders(
        ws: Workspace, tmp_path: Path) -> None:
    import os
    import shutil
    import signal
    import socket

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    w = ws
    shutil.rmtree(w.data / "renders", ignore_errors=True)
    blocks, _ = held_out(w)
    short = {k: v[:6] for k, v in blocks.items()}
    seeded = {"render_body": {"seed": 5}, "face": {"seed": 5}}
    stale = render(w, short, kind="old", overrides=seeded)  # made with crf 18 and a --seed of its own
    set_param(w.root, "assemble", "crf", 30)
    fresh = render(w, short, kind="new")  # made with today's params: current
    before = {s: {st: read_manifest(artifact_dir(w, st, s)) for st in ("render_body", "face", "assemble")}
              for s in (stale, fresh)}

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    made = subprocess.run([sys.executable, "-m", "cli.main", "-w", str(w.root), "schedule", "rerender", "--cron",
                           "0 3 * * *"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    assert yaml.safe_load((w.root / "schedules.yaml").read_text())["rerender"]["cron"] == "0 3 * * *"
    from flows.rerender import deployment_name

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(f"rerender/{deployment_name(w)}")
        assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
        assert deployment.parameters == {"workspace": str(w.root), "identity": None}
        with socket.socket() as sock:  # a free loopback port for the API `anchor serve` starts beside the runner
            sock.bind(("127.0.0.1", 0))
            port = str(sock.getsockname()[1])
        serving = subprocess.Popen([sys.executable, "-m", "cli.main", "-w", str(w.root), "serve", "--port", port],
                                   cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True)
        try:
            run = client.create_flow_run_from_deployment(deployment.id)  # "run now", as the UI's button does
            deadline = time.monotonic() + 600
            while not (state := client.read_flow_run(run.id).state).is_final():
                assert serving.poll() is None, serving.communicate()[1][-2000:]
                assert time.monotonic() < deadline, "the triggered run never finished"
                time.sleep(1.0)
        finally:
            os.killpg(serving.pid, signal.SIGTERM)
            serving.communicate(timeout=60)
    assert state.is_completed(), state.message

    after = {s: {st: read_manifest(artifact_dir(w, st, s)) for st in ("render_body", "face", "assemble")}
             for s in (stale, fresh)}
    assert after[fresh] == before[fresh]  # current: not touched
    # stale by its assemble params: assemble made again under today's; render_body and face, whose own params did
    # not change (the --seed it was made with is kept), are the same artifacts, taken as they were
    assert after[stale]["assemble"]["finished_at"] > before[stale]["assemble"]["finished_at"]
    assert after[stale]["render_body"] == before[stale]["render_body"] and after[stale]["face"] == before[stale]["face"]
    assert after[stale]["assemble"]["params"]["crf"] == 30
    # with the --seed it was made with, not today's default
    assert after[stale]["render_body"]["params"]["seed"] == after[stale]["face"]["params"]["seed"] == 5
    from flows.versions import renders

    assert not any(r["stale"] for r in renders(w, ID))


@pytest.mark.usefixtures("prefect_harness")
def test_a_failed_evaluation_still_leaves_the_new_model_a_version(ws: Workspace,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from flows import train
    from flows.versions import current_model, versions

    def broken(*_: object) -> None:
        raise RuntimeError("the evaluation render failed")

    monkeypatch.setattr(train, "evaluation", broken)
    with pytest.raises(RuntimeError, match="evaluation render failed"):
        train.finetune(str(ws.root), ID, True)
    table = versions(ws)[ID]
    assert [v["version"] for v in table] == [1] and table[0]["finetune"] == current_model(ws, ID)
    tags = subprocess.run(["git", "tag"], cwd=ws.root, capture_output=True, text=True).stdout.split()
    assert f"{ID}-v1" in tags


@pytest.mark.usefixtures("prefect_harness")
def test_prefect_keeps_stage_results_as_json_in_this_users_own_directory(ws: Workspace) -> None:
    import json
    import os

    from flows import train
    from flows.stage_task import private_cache

    train.finetune(str(ws.root), ID, False)
    records = [p for p in private_cache(ws).iterdir() if p.is_file()]
    assert records, "no cache record written"
    for record in records:
        meta = json.loads(record.read_text())
        assert meta["serializer"]["type"] == "json"  # never pickle: nothing a record names can run code
        json.loads(Path(meta["storage_key"]).read_text())
    folder = private_cache(ws)
    assert not folder.is_relative_to(ws.root) and folder.stat().st_uid == os.getuid()
    assert folder.stat().st_mode & 0o077 == 0
    assert not (ws.state / "prefect-cache").exists()
