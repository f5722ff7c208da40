"""Jobs on a Prefect work pool: `anchor serve --pool P` only registers the jobs on the pool, and `anchor worker
--pool P` runs them — a job waits, pending, until a worker takes it, and the run it becomes is the pool's."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.conftest import prefect_server
from tests.service.conftest import ID, anchor, serving, stop

pytestmark = pytest.mark.slow


def _until_ended(api: httpx.Client, job: str, seconds: float) -> list[dict]:
    seen, deadline = [], time.monotonic() + seconds
    while not seen or seen[-1]["state"] not in ("completed", "failed", "cancelled"):
        assert time.monotonic() < deadline, seen[-1:]
        seen.append(api.get(f"/api/v1/jobs/{job}").json())
        time.sleep(0.3)
    return seen


def test_a_job_waits_for_a_worker_of_the_pool_and_runs_there(tmp_path_factory: pytest.TempPathFactory,
                                                              trained: Path, voice: Path) -> None:
    pool = f"studio-{uuid.uuid4().hex[:8]}"
    with serving(tmp_path_factory, trained, None, "--pool", pool) as served, served.client() as api:
        with voice.open("rb") as f:
            made = api.post("/api/v1/renders", data={"identity": ID}, files={"audio": ("line.wav", f, "audio/wav")})
        assert made.status_code == 202, made.text
        job = made.json()["job"]
        time.sleep(3)  # no worker yet: the pool keeps the job
        assert api.get(f"/api/v1/jobs/{job}").json()["state"] == "pending"
        assert not (served.ws.root / "data" / "renders" / ID).exists()

        env = {**os.environ, "PREFECT_API_URL": prefect_server()}
        worker = anchor(served.ws, env, "worker", "--pool", pool, "--limit", "1")
        try:
            seen = _until_ended(api, job, 600)
        finally:
            printed = stop(worker)
        assert seen[-1]["state"] == "completed", (seen[-1], printed[1][-3000:])
        assert any(s["state"] == "running" for s in seen)
        assert f"of pool {pool!r} on {served.ws.root}" in printed[0]
        run = httpx.get(f"{prefect_server()}/flow_runs/{job}").json()
        assert run["work_pool_name"] == pool  # the pool's run, started by its worker, not by a runner of the server
        name, key = seen[-1]["result"]["render"].split("/")
        assert (served.ws.root / "data" / "renders" / name / key / "assemble" / "video.mp4").is_file()
