"""Two machines, one remote: `anchor serve --pool P` and two `anchor worker --pool P` in workspaces of their own,
sharing only a Prefect server and an S3 bucket (moto's S3 server on loopback), every process started and stopped
here. A job waits for a worker; the onboarding runs on worker A, which is killed once in the middle of pushing the
identity (the job fails, the bucket holds nothing half-written) and then completes it; worker B, which never saw
the identity, pulls it from the bucket and renders it from speech; the server serves B's video; `anchor audit` is
clean on every machine."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from core.workspace import Workspace
from tests.conftest import FAST, FEW, copy_workspace, make_workspace
from tests.service.conftest import ID, anchor, free_port, own_prefect_server, serving, stop, until_answered

pytestmark = pytest.mark.slow
BUCKET = "studio"
AWS = {"AWS_ACCESS_KEY_ID": "anchor-test", "AWS_SECRET_ACCESS_KEY": "anchor-test", "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def s3_server(log: Path) -> Iterator[str]:
    """moto's S3-compatible server on loopback with an empty bucket; its endpoint URL. Its request log goes to
    `log` (into a pipe nobody reads, it would fill the pipe and stop answering)."""
    port = free_port()
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                   env={**os.environ, **AWS}, stdout=out, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        until_answered(process, lambda: httpx.get(url).status_code < 500, "moto_server", 60)
        bucket(url).create_bucket(Bucket=BUCKET)
        yield url
    finally:
        stop(process)


def bucket(endpoint: str | None = None):  # noqa: ANN201 - boto3's client
    import boto3

    return boto3.client("s3", endpoint_url=endpoint or _ENDPOINT[0], aws_access_key_id=AWS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=AWS["AWS_SECRET_ACCESS_KEY"], region_name=AWS["AWS_DEFAULT_REGION"])


_ENDPOINT: list[str] = []


def objects() -> dict[str, bytes]:
    s3 = bucket()
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
            for o in page.get("Contents", [])]
    return {k: s3.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in keys}


def whole(found: dict[str, bytes]) -> list[str]:
    """DVC's objects whose bytes do not hash to their name (a half-written one would not)."""
    bad = []
    for key, data in found.items():
        if "/files/md5/" in key:
            name = "".join(key.split("/files/md5/")[1].split("/")).removesuffix(".dir")
            if hashlib.md5(data).hexdigest() != name:
                bad.append(key)
    return bad


def pushing(worker: subprocess.Popen[str]):  # noqa: ANN201 - a psutil.Process or None
    """The worker's `dvc push` process, if one runs."""
    import psutil

    try:
        family = psutil.Process(worker.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return None
    for p in family:
        with contextlib.suppress(psutil.Error):
            line = p.cmdline()
            if "dvc" in line and "push" in line:
                return p
    return None


def pushed(s3) -> bool:  # noqa: ANN001 - boto3's client
    """Whether DVC has put any object in the bucket yet."""
    return s3.list_objects_v2(Bucket=BUCKET, Prefix="anchors/files/", MaxKeys=1).get("KeyCount", 0) > 0


def until_ended(api: httpx.Client, job: str, seconds: float) -> list[dict]:
    seen, deadline = [], time.monotonic() + seconds
    while not seen or seen[-1]["state"] not in ("completed", "failed", "cancelled"):
        assert time.monotonic() < deadline, seen[-1:]
        seen.append(api.get(f"/api/v1/jobs/{job}").json())
        time.sleep(0.3)
    return seen


def kill_worker(worker: subprocess.Popen[str]) -> None:
    """As a machine lost: the worker and every process it started, at once (SIGKILL)."""
    import psutil

    family = [psutil.Process(worker.pid), *psutil.Process(worker.pid).children(recursive=True)]
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(family, timeout=30)
    worker.communicate()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(worker.pid, signal.SIGKILL)


def test_an_identity_onboarded_on_one_worker_renders_on_another_through_the_shared_bucket(
        tmp_path_factory: pytest.TempPathFactory, onboarded: Path, short_video: Path, voice: Path) -> None:
    """Worker A's workspace starts as a copy of the onboarded template (a machine that ran the onboarding stages
    once: they are cached there), so what its job computes is the pretraining, the finetune and the evaluation;
    the server's and worker B's workspaces start empty. The Prefect server is the test's own, as a studio runs
    one (its lease repossessor frees the identity's lock of a killed worker)."""
    from flows.versions import current_model

    pool, home = f"studio-{uuid.uuid4().hex[:8]}", tmp_path_factory.mktemp("machines")
    with s3_server(home / "s3.log") as endpoint, own_prefect_server(home / "prefect") as prefect:
        _ENDPOINT[:] = [endpoint]
        shared = {"storage": {"remote": f"s3://{BUCKET}/anchors", "endpoint_url": endpoint},
                  "pretrain": FEW, "finetune": FEW, **FAST}
        a = Workspace(copy_workspace(onboarded, home / "a", shared))
        b, s = Workspace(make_workspace(home / "b")), Workspace(make_workspace(home / "server"))
        for ws in (b, s):
            (ws.root / "params.yaml").write_text((a.root / "params.yaml").read_text())
        env = {**os.environ, **AWS, "PREFECT_API_URL": prefect}
        with serving(tmp_path_factory, None, None, "--pool", pool, prefect=prefect, ws=s, env=env) as served, \
                served.client() as api:
            assert api.get("/api/v1/identities").json() == []

            def onboard() -> str:
                with short_video.open("rb") as f:
                    made = api.post("/api/v1/identities", data={"name": ID},
                                    files={"video": ("me.mp4", f, "video/mp4")})
                assert made.status_code == 202, made.text
                return made.json()["job"]

            # 1. no worker yet: the pool keeps the job; the upload is in the bucket for whichever worker takes it
            job = onboard()
            time.sleep(3)
            assert api.get(f"/api/v1/jobs/{job}").json()["state"] == "pending"
            uploads = {k: v for k, v in objects().items() if "/anchor/uploads/" in k}
            assert list(uploads.values()) == [short_video.read_bytes()]

            # 2. worker A takes it and dies while it pushes the identity to the bucket: the job fails, and the
            # bucket holds whole objects (each one's bytes hash to its name) that no record names
            doomed, s3 = anchor(a, env, "worker", "--pool", pool), bucket()
            try:
                deadline, looked = time.monotonic() + 400, 0.0
                while True:
                    push = pushing(doomed)
                    if push is not None and pushed(s3):
                        push.suspend()  # frozen mid-push at once (SIGSTOP), then killed with the rest below
                        break
                    if time.monotonic() - looked > 1:  # the job, now and then: the loop must stay quick
                        status, looked = api.get(f"/api/v1/jobs/{job}").json(), time.monotonic()
                        assert status["state"] in ("pending", "running") and time.monotonic() < deadline, status
                    time.sleep(0.02 if push is not None else 0.2)
            finally:
                kill_worker(doomed)
            killed = time.monotonic()
            seen = until_ended(api, job, 300)
            assert seen[-1]["state"] == "failed" and "stopped answering" in seen[-1]["error"], seen[-1]
            print(f"worker A killed while pushing; its job failed {time.monotonic() - killed:.0f} s later")
            assert time.monotonic() - killed < 200
            left = objects()
            assert [k for k in left if "/files/md5/" in k] and whole(left) == []
            assert not [k for k in left if "/anchor/identities/" in k]
            assert api.get("/api/v1/identities").json() == []

            # 3. submitted again, A (restarted) completes it and publishes the identity
            worker = anchor(a, env, "worker", "--pool", pool)
            try:
                again, started = onboard(), time.monotonic()
                seen = until_ended(api, again, 900)
                print(f"onboard job resubmitted on A: {seen[-1]['state']} in {time.monotonic() - started:.0f} s")
            finally:
                printed = stop(worker)
            assert seen[-1]["state"] == "completed", (seen[-1], printed[1][-3000:])
            assert httpx.get(f"{prefect}/flow_runs/{again}").json()["work_pool_name"] == pool
            published = objects()
            assert f"{BUCKET}/anchors/anchor/identities/{ID}.json" in [f"{BUCKET}/{k}" for k in published]
            assert whole(published) == []
            listed = api.get("/api/v1/identities").json()  # the server fetched it from the bucket
            assert isinstance(listed, list) and len(listed) == 1, listed
            (listed,) = listed
            assert listed["name"] == ID and listed["trained"] and listed["speech"] and listed["current_version"] == 1

            # 4. worker B, which never saw the identity, pulls it and renders it from speech
            assert ID not in b.identities() and current_model(b, ID) is None
            worker = anchor(b, env, "worker", "--pool", pool, "--limit", "1")
            try:
                with voice.open("rb") as f:
                    made = api.post("/api/v1/renders", data={"identity": ID},
                                    files={"audio": ("line.wav", f, "audio/wav")})
                assert made.status_code == 202, made.text
                started = time.monotonic()
                seen = until_ended(api, made.json()["job"], 600)
                print(f"speech render on B (identity pulled first): {seen[-1]['state']} in "
                      f"{time.monotonic() - started:.0f} s")
            finally:
                printed = stop(worker)
            assert seen[-1]["state"] == "completed", (seen[-1], printed[1][-3000:])
            assert f"of pool {pool!r} on {b.root}, 1 run(s) at a time" in printed[0]
            assert current_model(b, ID) == current_model(a, ID) is not None
            name, key = seen[-1]["result"]["render"].split("/")
            made_on_b = b.data / "renders" / name / key / "assemble" / "video.mp4"
            assert made_on_b.is_file() and not (a.data / "renders" / name / key).exists()
            video = api.get(seen[-1]["result"]["video"])  # the server fetched B's render from the bucket
            assert video.status_code == 200 and video.content == made_on_b.read_bytes()

        # 5. every machine's records match its bytes
        for ws in (a, b, s):
            audited = subprocess.run([sys.executable, "-m", "cli.main", "-w", str(ws.root), "audit"], env=env,
                                     capture_output=True, text=True)
            assert audited.returncode == 0 and ", 0 problem(s)" in audited.stdout, (ws.root, audited.stdout,
                                                                                   audited.stderr)
