"""A workspace as a replica of the shared remote (flows/replica.py), on a directory remote two workspaces share:
where a job runs, and renders and uploads travelling whole or not at all. (Identities: tests/flows/test_onboard.py
pulls one into a workspace that never had it; tests/service/test_two_machines.py does it all over S3.)"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from core.errors import AnchorError, InputError
from core.workspace import WORKER_WORKSPACE_ENV, Workspace
from flows import replica
from tests.conftest import make_workspace, set_param

KEY = "0123456789ab"


def two(tmp_path: Path, remote: Path | None = None) -> tuple[Workspace, Workspace]:
    out = []
    for name in ("one", "two"):
        ws = Workspace(make_workspace(tmp_path / name))
        set_param(ws.root, "storage", "remote", str(remote or tmp_path / "remote"))
        out.append(ws)
    return out[0], out[1]


def test_a_job_runs_in_the_workers_workspace_only_through_the_same_remote(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mine, theirs = two(tmp_path)
    monkeypatch.delenv(WORKER_WORKSPACE_ENV, raising=False)
    assert replica.job_workspace(str(theirs.root), None) == (theirs, None)  # no worker: where the job says
    monkeypatch.setenv(WORKER_WORKSPACE_ENV, str(mine.root))
    assert replica.job_workspace(str(mine.root), None) == (mine, None)  # the worker's own workspace: in place
    remote = replica.remote_url(theirs)
    assert replica.job_workspace(str(theirs.root), remote) == (Workspace(mine.root), theirs.root)
    set_param(mine.root, "storage", "remote", str(tmp_path / "elsewhere"))
    with pytest.raises(InputError, match=f"serves the workspace {mine.root}, whose remote is {tmp_path}/elsewhere; "
                                         f"the run is for {theirs.root}, whose remote is {remote}"):
        replica.job_workspace(str(theirs.root), remote)
    with pytest.raises(InputError, match="whose remote is not shared"):
        replica.job_workspace(str(theirs.root), None)  # a job of a server that does not share its remote


def test_a_render_travels_as_one_checked_tar(tmp_path: Path) -> None:
    made, other = two(tmp_path)
    subject = f"demo/{KEY}"
    folder = replica.render_dir(made, subject)
    (folder / "assemble").mkdir(parents=True)
    (folder / "assemble" / "video.mp4").write_bytes(b"frames" * 1000)
    (folder / "motion").mkdir()
    (folder / "motion" / "manifest.json").write_text('{"stage": "motion"}')
    digest = replica.publish_render(made, subject)
    assert replica.published_renders(other, "demo") == [subject]
    assert replica.published_renders(other, "nobody") == []

    assert replica.fetch_render(other, subject) is True
    got = replica.render_dir(other, subject)
    assert (got / "assemble" / "video.mp4").read_bytes() == b"frames" * 1000
    assert (got / "motion" / "manifest.json").read_text() == '{"stage": "motion"}'
    assert replica.fetch_render(other, subject) is False  # this record is here already
    assert replica.fetch_render(other, f"demo/{'f' * 12}") is False  # the remote has no such render

    tar = tmp_path / "remote" / "anchor" / "renders" / "demo" / KEY / f"{digest}.tar"
    assert hashlib.sha256(tar.read_bytes()).hexdigest() == digest
    tar.write_bytes(tar.read_bytes()[:-10])  # damaged in the store
    third = Workspace(make_workspace(tmp_path / "three"))
    set_param(third.root, "storage", "remote", str(tmp_path / "remote"))
    with pytest.raises(AnchorError, match=f"render {subject} in the remote differs from its record"):
        replica.fetch_render(third, subject)
    assert not replica.render_dir(third, subject).exists()
    assert list(replica.render_dir(third, subject).parent.iterdir()) == []  # no unpacked leftovers either


def test_an_upload_reaches_a_worker_in_the_same_folder(tmp_path: Path) -> None:
    server, worker = two(tmp_path)
    upload = server.uploads / ("c0ffee" * 5 + "00") / "audio.wav"
    upload.parent.mkdir(parents=True)
    upload.write_bytes(b"RIFF speech")
    replica.publish_upload(server, upload)
    got = replica.fetch_upload(worker, server.root, str(upload))
    assert got == worker.uploads / upload.parent.name / "audio.wav" and got.read_bytes() == b"RIFF speech"
    assert not list(worker.uploads.rglob("*.part"))
    missing = "beef" * 8
    with pytest.raises(InputError, match=f"the upload {missing}/audio.wav is not in the remote"):
        replica.fetch_upload(worker, server.root, str(server.uploads / missing / "audio.wav"))
    assert not (worker.uploads / missing).exists()
    (worker.root / "secret.txt").write_text("of the worker's")
    for named in (server.root / "params.yaml", server.uploads / upload.parent.name / ".." / ".." / ".." / "secret.txt",
                  server.uploads / "x" / "audio.wav", server.uploads / upload.parent.name / "a" / "b"):
        with pytest.raises(InputError, match=f"is not an upload of the workspace {server.root}"):
            replica.fetch_upload(worker, server.root, str(named))


def _plant(ws: Workspace, name: str, **changes: object) -> Path:
    """A record of `name` in the remote as another machine's `anchor push` would write it, with `changes`."""
    record = {"identity": name, "source": "outs:\n- md5: 0f.dir\n  path: source\n", "stages": {}, "shared": {},
              "versions": [], "published_at": "2026-12-01T00:00:00+00:00", "host": "elsewhere", **changes}
    path = Path(replica.remote_url(ws)) / "anchor" / "identities" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return path


@pytest.mark.parametrize("changes", [
    {"identity": "other"},  # filed under demo, about another
    {"stages": {"finetune@other": {"outs": [{"path": "data/checkpoints/identities/other/finetune"}]}}},
    {"stages": {"finetune@demo": {"outs": [{"path": "data/checkpoints/identities/other/finetune"}]}}},
    {"stages": {"report@demo": {"outs": [{"path": "data/reports/demo/../../params.yaml"}]}}},
    {"shared": {"finetune@demo": {"outs": [{"path": "data/checkpoints/identities/demo/finetune"}]}}},
    {"source": "outs:\n- path: ../../../params.yaml\n"},
    {"source": "outs:\n- path: source\nwdir: ../..\n"},
    {"versions": "v1"},
    {"versions": [{"version": "1", "finetune": "ab"}]},
    {"host": None},
])
def test_a_record_that_reaches_beyond_its_identity_is_not_taken(tmp_path: Path, changes: dict) -> None:
    ws, _ = two(tmp_path)
    _plant(ws, "demo", **changes)
    lock = ws.root / "dvc.lock"
    before = lock.read_bytes() if lock.exists() else None
    with pytest.raises(AnchorError, match="the remote's record of demo is not one `anchor push` writes"):
        replica.fetch_identity(ws, "demo")
    assert (lock.read_bytes() if lock.exists() else None) == before and "demo" not in ws.identities()
    assert replica.refresh(ws) == []  # skipped (and logged), not the end of every other identity's fetch


def test_an_identity_another_machine_wrote_is_not_overwritten(tmp_path: Path) -> None:
    """Unless this workspace has what that record names (its own state lost, say): then it is its own."""
    from flows.dvc_store import source_target

    ws, _ = two(tmp_path)
    planted = _plant(ws, "demo")
    with pytest.raises(AnchorError, match="the remote's demo was written by elsewhere at 2026-12-01T00:00:00.*"
                                          r"`anchor pull demo --latest` takes it first"):
        replica.publish_identity(ws, "demo")
    assert json.loads(planted.read_text())["host"] == "elsewhere"
    dot_dvc = ws.root / source_target(ws, "demo")
    dot_dvc.parent.mkdir(parents=True)
    dot_dvc.write_text(json.loads(planted.read_text())["source"])
    replica._foreign(ws, "demo")  # the same files: not another machine's
    dot_dvc.write_text("outs:\n- md5: 1e.dir\n  path: source\n")
    with pytest.raises(AnchorError, match="the remote's demo was written by elsewhere"):
        replica._foreign(ws, "demo")


@pytest.mark.usefixtures("prefect_harness")
def test_one_writer_of_an_identity_at_a_time(tmp_path: Path) -> None:
    """The lock is the Prefect server's: a second holder waits storage.lock_wait_s, then gives up saying why; once
    the first lets go it is free, and another identity's lock is another lock."""
    ws, other = two(tmp_path)
    set_param(other.root, "storage", "lock_wait_s", 1.0)
    with replica.owner_lock(ws, "demo"):
        with pytest.raises(AnchorError, match=r"demo is being written to the remote by another machine for over 1 s"), \
                replica.owner_lock(other, "demo"):
            pytest.fail("two holders")
        with replica.owner_lock(other, "half"):
            pass
    with replica.owner_lock(other, "demo"):
        pass
