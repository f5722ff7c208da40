"""Jobs on a Prefect work pool: `anchor serve --pool P` only registers the jobs on the pool, and `anchor worker
--pool P` runs them — a job waits, pending, until a worker takes it, and the run it becomes is the pool's; a job
whose worker dies ends `failed`, and runs again on another."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import ID, anchor, own_prefect_server, serving, stop

pytestmark = pytest.mark.slow


def _until_ended(api: httpx.Client, job: str, seconds: float) -> list[dict]:
    seen, deadline = [], time.monotonic() + seconds
    while not seen or seen[-1]["state"] not in ("completed", "failed", "cancelled"):
        assert time.monotonic() < deadline, seen[-1:]
        seen.append(api.get(f"/api/v1/jobs/{job}").json())
        time.sleep(0.3)
    return seen


def _kill_worker(worker: subprocess.Popen[str]) -> None:
    """As a machine lost: the worker and every process it started, at once (SIGKILL)."""
    import psutil

    family = [psutil.Process(worker.pid), *psutil.Process(worker.pid).children(recursive=True)]
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(family, timeout=30)
    worker.communicate()


def test_a_job_waits_for_a_worker_runs_there_and_outlives_its_death(tmp_path_factory: pytest.TempPathFactory,
                                                                     trained: Path, voice: Path) -> None:
    """One story on a Prefect server of the test's own, as a studio runs one (`prefect server start`: the
    session's test server runs no lease repossessor, and a dead run's concurrency slot would stay taken for every
    later test): a job submitted with no worker stays pending; a worker takes it and is killed mid-job (its run's
    process with it) — the run stops sending heartbeats and the pool's automation crashes it: the job `failed`,
    saying why, within the automation's 90 s, nothing of it published; submitted again, it completes on a second
    worker (once the dead run's slot is back: its 60 s lease lapsed), as the pool's run."""
    pool = f"studio-{uuid.uuid4().hex[:8]}"
    with own_prefect_server(tmp_path_factory.mktemp("prefect")) as prefect, \
            serving(tmp_path_factory, trained, None, "--pool", pool, prefect=prefect) as served, \
            served.client() as api:
        env = {**os.environ, "PREFECT_API_URL": prefect}

        def submit() -> str:
            with voice.open("rb") as f:
                made = api.post("/api/v1/renders", data={"identity": ID},
                                files={"audio": ("line.wav", f, "audio/wav")})
            assert made.status_code == 202, made.text
            return made.json()["job"]

        job = submit()
        time.sleep(3)  # no worker yet: the pool keeps the job
        assert api.get(f"/api/v1/jobs/{job}").json()["state"] == "pending"
        assert not (served.ws.root / "data" / "renders" / ID).exists()

        doomed = anchor(served.ws, env, "worker", "--pool", pool)
        try:
            deadline = time.monotonic() + 300
            while (status := api.get(f"/api/v1/jobs/{job}").json())["progress"] <= 0:
                assert status["state"] in ("pending", "running") and time.monotonic() < deadline, status
                time.sleep(0.3)
            _kill_worker(doomed)
        finally:  # the worker's runs share its process group: nothing of it outlives the test
            with contextlib.suppress(ProcessLookupError):
                os.killpg(doomed.pid, signal.SIGKILL)
        killed = time.monotonic()
        seen = _until_ended(api, job, 300)
        assert seen[-1]["state"] == "failed" and "stopped answering" in seen[-1]["error"], seen[-1]
        assert time.monotonic() - killed < 200 and seen[-1]["result"] is None
        assert not list((served.ws.root / "data" / "renders").glob(f"{ID}/*/assemble/video.mp4"))

        survivor = anchor(served.ws, env, "worker", "--pool", pool, "--limit", "1")
        try:
            again = submit()
            seen = _until_ended(api, again, 600)
        finally:
            printed = stop(survivor)
        assert seen[-1]["state"] == "completed", (seen[-1], printed[1][-3000:])
        assert any(s["state"] == "running" for s in seen)
        assert f"of pool {pool!r} on {served.ws.root}, 1 run(s) at a time" in printed[0]
        run = httpx.get(f"{prefect}/flow_runs/{again}").json()
        assert run["work_pool_name"] == pool  # the pool's run, started by its worker, not by a runner of the server
        name, key = seen[-1]["result"]["render"].split("/")
        assert (served.ws.root / "data" / "renders" / name / key / "assemble" / "video.mp4").is_file()
        assert len(list((served.ws.root / "data" / "renders").glob(f"{ID}/*/assemble/video.mp4"))) == 1
