"""`anchor serve` on a copy of the trained template, in its own process on loopback and on the session's Prefect
server, as the API and the browser tests meet it; and a line of speech to upload."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from core.workspace import Workspace
from models import speech as sp
from tasks import audio as aud
from tests.conftest import ONBOARDED_ID, ROOT, copy_workspace, prefect_server, set_param, shared_video

ID = ONBOARDED_ID


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, ws: Workspace, url: str, process: subprocess.Popen[str], token: str | None) -> None:
        self.ws, self.url, self.process, self.token = ws, url, process, token

    def client(self, token: str | None = "") -> httpx.Client:
        """A client with the server's token, another one, or none (None)."""
        token = self.token if token == "" else token
        return httpx.Client(base_url=self.url, timeout=60,
                            headers={"Authorization": f"Bearer {token}"} if token else {})

    def uploads(self) -> list[Path]:
        return sorted(p for p in (self.ws.state / "uploads").rglob("*") if p.is_file())


@contextlib.contextmanager
def serving(tmp_path_factory: pytest.TempPathFactory, trained: Path | None, tokens: str | None,
            *options: str, prefect: str | None = None, ws: Workspace | None = None,
            env: dict[str, str] | None = None) -> Iterator[Served]:
    """`anchor serve [options]` on a copy of `trained` (its model numbered v1) or on `ws` as it is (jobs polled
    every 0.5 s, uploads up to 5 MB), on the session's Prefect server or `prefect`, in `env`, answering once it
    lists the identities; stopped (SIGTERM, then SIGKILL) at the end."""
    from flows.versions import record_version

    if ws is None:
        assert trained is not None
        ws = Workspace(copy_workspace(trained, tmp_path_factory.mktemp("ws") / "ws"))
        record_version(ws, ID, "test", commit=False)  # v1, as `anchor finetune` numbers it (the template ran no flow)
    set_param(ws.root, "service", "poll_s", 0.5)
    set_param(ws.root, "service", "max_upload_mb", 5)
    port = free_port()
    env = {**(env or os.environ), "PREFECT_API_URL": prefect or prefect_server()}
    env.pop("ANCHOR_API_TOKENS", None)
    if tokens:
        env["ANCHOR_API_TOKENS"] = tokens
    token = tokens.split(",")[-1].strip() if tokens else None
    process = anchor(ws, env, "serve", "--port", str(port), *options)
    served = Served(ws, f"http://127.0.0.1:{port}", process, token)
    try:
        def listed() -> bool:
            with served.client() as api:
                return api.get("/api/v1/identities").status_code == 200

        until_answered(process, listed, "anchor serve", 180)
        yield served
    finally:
        stop(process)


@contextlib.contextmanager
def own_prefect_server(home: Path) -> Iterator[str]:
    """A Prefect server of the test's own, as a studio runs one (`prefect server start`: every service, the lease
    repossessor among them, which the session's test server does not run), on loopback; its API URL."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_UI_ENABLED="false")
    process = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                                str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        until_answered(process, lambda: httpx.get(f"{url}/health").status_code == 200, "prefect server start", 120)
        yield url
    finally:
        stop(process)


def until_answered(process: subprocess.Popen[str], answers: Callable[[], bool], what: str, seconds: float) -> None:
    """Polls `answers` until it says yes; fails with what the process printed if it ends first, or after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        if process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"{what} ended: {((err or '') + (out or ''))[-3000:]}")
        assert time.monotonic() < deadline, f"{what} never answered"
        try:
            if answers():
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)


def anchor(ws: Workspace, env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    """`anchor -w WS ARGS` in a process group of its own (so it and its children can be stopped together)."""
    return subprocess.Popen([sys.executable, "-m", "cli.main", "-w", str(ws.root), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def stop(process: subprocess.Popen[str]) -> tuple[str, str]:
    """SIGTERM to its process group, SIGKILL after a minute; what it printed."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        return process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        return process.communicate()


@pytest.fixture(scope="module")
def voice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1.5 s of the seated anchor's speech, as a studio would upload it."""
    path = tmp_path_factory.mktemp("audio") / "line.wav"
    y = aud.decode(shared_video("anchor_seated_hevc.mp4"))
    aud.write_wav(path, y[5 * sp.SAMPLE_RATE: int(6.5 * sp.SAMPLE_RATE)])
    return path
