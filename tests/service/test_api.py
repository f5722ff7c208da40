"""The HTTP API as a studio meets it: `anchor serve` in its own process on loopback, on the session's Prefect
server, driven with httpx — identities, a speech render as a job whose progress rises, its video streamed and
seekable, and every refusal (token, size, type, name) leaving nothing behind."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import av
import httpx
import pytest

from core.workspace import Workspace
from models import speech as sp
from tasks import audio as aud
from tests.conftest import shared_video
from tests.service.conftest import ID, Served, free_port, serving

slow = pytest.mark.slow  # a served trained workspace; the unit tests at the end are not
TOKEN = "studio-secret"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, trained: Path) -> Iterator[Served]:
    with serving(tmp_path_factory, trained, f"other, {TOKEN}") as served:
        yield served


class Receiver:
    """A webhook receiver on loopback: the JSON bodies POSTed to it."""

    def __enter__(self) -> Receiver:
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.bodies: list[dict] = []
        bodies = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@slow
def test_a_speech_render_is_a_job_whose_video_streams(served: Served, voice: Path) -> None:
    with served.client() as api, Receiver() as receiver:
        [listed] = api.get("/api/v1/identities").json()
        assert listed["name"] == ID and listed["current_version"] == 1 and listed["speech"] is True
        assert listed["renders"] == f"/api/v1/identities/{ID}/renders"

        with voice.open("rb") as f:
            made = api.post("/api/v1/renders", data={"identity": ID, "seed": "3", "webhook": receiver.url},
                            files={"audio": ("line.wav", f, "audio/wav")})
        assert made.status_code == 202, made.text
        job = made.json()["job"]
        seen: list[dict] = []
        deadline = time.monotonic() + 600
        while True:
            status = api.get(f"/api/v1/jobs/{job}").json()
            seen.append(status)
            if status["state"] in ("completed", "failed", "cancelled"):
                break
            assert time.monotonic() < deadline, seen[-1]
            time.sleep(0.2)
        assert status["state"] == "completed", status
        assert status["kind"] == "render" and status["error"] is None and status["progress"] == 1.0
        progress = [s["progress"] for s in seen]
        assert progress == sorted(progress)  # never going back
        running = [s for s in seen if s["state"] == "running"]
        # 1 ("done") can show while the run is still running: every stage done, the run publishing what it made
        assert running and all(0 <= s["progress"] <= 1 for s in running) and running[0]["progress"] < 1
        assert {s["stage"].split(":")[0] for s in running if s["stage"]} <= {
            "starting", "motion", "render_body", "face", "hands", "assemble", "follow", "done"}

        result = status["result"]
        identity, key = result["render"].split("/")
        assert identity == ID and result["video"] == f"/api/v1/renders/{ID}/{key}/video"
        video = api.get(result["video"])
        assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
        path = served.ws.root / "data" / "renders" / ID / key / "assemble" / "video.mp4"
        assert video.content == path.read_bytes()
        with av.open(str(path)) as c:
            assert sum(1 for _ in c.decode(video=0)) == 45  # 1.5 s at 30 fps
        with av.open(str(path)) as c:
            assert len(c.streams.audio) == 1
        part = api.get(result["video"], headers={"Range": "bytes=100-199"})  # a player seeking
        assert part.status_code == 206 and part.content == video.content[100:200]
        steps = api.get(f"/api/v1/renders/{ID}/{key}/lineage").json()  # back to the source video, each verified
        assert steps[0]["stage"] == "assemble"
        assert {"motion", "render_body", "finetune", "speech", "source"} <= {s["stage"] for s in steps}
        assert all(s["verified"] for s in steps)
        [render] = api.get(f"/api/v1/identities/{ID}/renders").json()
        assert render["render"] == result["render"] and render["stale"] is False and render["motion"] == "speech"
        # the upload is kept where the render's lineage points, and only it
        [kept] = served.uploads()
        assert kept.read_bytes() == voice.read_bytes() and kept.suffix == ".wav"
        assert api.delete(f"/api/v1/jobs/{job}").status_code == 409  # it has ended
        deadline = time.monotonic() + 30  # the webhook: called once, when the job ended
        while not receiver.bodies and time.monotonic() < deadline:
            time.sleep(0.2)
        assert receiver.bodies == [{"job": job, "kind": "render", "state": "completed", "error": None}]

        # a longer line, cancelled while it runs: the job ends cancelled, its video never appears
        longer = voice.with_name("longer.wav")
        aud.write_wav(longer, aud.decode(shared_video("anchor_seated_hevc.mp4"))[:8 * sp.SAMPLE_RATE])
        with longer.open("rb") as f:
            again = api.post("/api/v1/renders", data={"identity": ID, "webhook": receiver.url},
                             files={"audio": ("longer.wav", f, "audio/wav")}).json()["job"]
        deadline = time.monotonic() + 300
        while (state := api.get(f"/api/v1/jobs/{again}").json()["state"]) == "pending":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert state == "running"
        assert api.delete(f"/api/v1/jobs/{again}").status_code == 202
        while (status := api.get(f"/api/v1/jobs/{again}").json())["state"] == "running":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert status["state"] == "cancelled" and status["result"] is None, status
        videos = sorted((served.ws.root / "data" / "renders" / ID).glob("*/assemble/video.mp4"))
        assert videos == [path]
        while len(receiver.bodies) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert receiver.bodies[1] == {"job": again, "kind": "render", "state": "cancelled", "error": None}


@slow
def test_refusals_leave_nothing_behind(served: Served, tmp_path: Path, voice: Path) -> None:
    before = served.uploads()
    with served.client(token=None) as anonymous:
        assert anonymous.get("/api/v1/identities").status_code == 401
        # the browser UI: its page asks for a sign-in, its app answers nothing before one with a token
        assert "Sign in with any name and one of the service" in anonymous.get("/").text
        assert anonymous.get("/config").status_code == 401
        assert anonymous.post("/login", data={"username": "x", "password": "wrong"}).status_code == 400
        assert anonymous.get("/config").status_code == 401
        elsewhere = {"Origin": "https://elsewhere.example"}  # another site's page, whose browser has the cookie
        assert anonymous.post("/login", data={"username": "x", "password": TOKEN}, headers=elsewhere
                              ).status_code == 403
        assert anonymous.post("/login", data={"username": "x", "password": TOKEN}).status_code == 200
        assert anonymous.get("/config").json()["title"] == "Make-Your-Anchor+"  # its cookie set by the sign-in
        assert anonymous.post("/gradio_api/upload", files={"files": ("a.wav", b"RIFF")}, headers=elsewhere
                              ).status_code == 403
        assert "access-control-allow-origin" not in anonymous.get("/config", headers=elsewhere).headers
    with served.client(token="wrong") as stranger:
        answer = stranger.get("/api/v1/identities")
        assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer"
    with served.client() as api:
        text = tmp_path / "notes.wav"
        text.write_text("this is not audio\n" * 50)
        with text.open("rb") as f:
            refused = api.post("/api/v1/renders", data={"identity": ID}, files={"audio": ("notes.wav", f)})
        assert refused.status_code == 422 and "not an audio or video file" in refused.json()["detail"], refused.text
        with voice.open("rb") as f, text.open("rb") as g:
            both = api.post("/api/v1/renders", data={"identity": ID}, files={"audio": f, "motion": g})
        assert both.status_code == 422 and "exactly one" in both.json()["detail"]
        with voice.open("rb") as f:
            assert api.post("/api/v1/renders", data={"identity": "nobody"}, files={"audio": f}).status_code == 404
        with voice.open("rb") as f:
            hook = api.post("/api/v1/renders", data={"identity": ID, "webhook": "file:///etc/passwd"},
                            files={"audio": f})
        assert hook.status_code == 422 and "http(s) URL" in hook.json()["detail"]
        with voice.open("rb") as f:
            old = api.post("/api/v1/renders", data={"identity": ID, "version": "7"}, files={"audio": f})
        assert old.status_code == 409 and "v1" in old.json()["detail"]
        with text.open("rb") as f:
            named = api.post("/api/v1/identities", data={"name": "../evil"}, files={"video": f})
        assert named.status_code == 422 and "invalid identity name" in named.json()["detail"]
        with text.open("rb") as f:
            taken = api.post("/api/v1/identities", data={"name": ID}, files={"video": f})
        assert taken.status_code == 409
        with text.open("rb") as f:
            bad = api.post("/api/v1/identities", data={"name": "newcomer"}, files={"video": f})
        assert bad.status_code == 422 and "not a readable video" in bad.json()["detail"]
        assert api.get("/api/v1/jobs/not-a-job").status_code == 404
        assert api.get("/api/v1/jobs/00000000-0000-0000-0000-000000000000").status_code == 404
        assert api.get(f"/api/v1/renders/{ID}/0123456789ab/video").status_code == 404
        assert api.get("/api/v1/identities/nobody/report").status_code == 404
        assert api.get("/docs").status_code == 200  # FastAPI's schema pages
    # 2 GB announced: refused from the headers alone, before a byte of the body is read
    host, port = served.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(f"POST /api/v1/renders HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
                  f"Content-Type: multipart/form-data; boundary=x\r\nContent-Length: {2 * 1024 ** 3}\r\n\r\n"
                  "--x\r\n".encode())
        reply = b""
        while not (b"\r\n\r\n" in reply and reply.endswith(b"}")) and (chunk := s.recv(4096)):
            reply += chunk
        reply = reply.decode()
    assert reply.startswith("HTTP/1.1 413") and "service.max_upload_mb" in reply, reply
    assert served.uploads() == before
    assert served.process.poll() is None  # still serving


def test_serving_beyond_loopback_needs_tokens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused before anything binds (uvicorn would fail the test if it were reached)."""
    import uvicorn

    from core.errors import InputError
    from service import server
    from tests.conftest import make_workspace

    class NoBinding:
        def __init__(self, *args: object, **kwargs: object) -> None:
            raise AssertionError("uvicorn was reached")

    monkeypatch.setattr(uvicorn, "Server", NoBinding)
    monkeypatch.delenv(server.TOKENS_ENV, raising=False)
    ws = Workspace(make_workspace(tmp_path / "ws"))
    with pytest.raises(InputError, match="serving beyond loopback needs bearer tokens"):
        server.serve(ws, "0.0.0.0", 9, print)
    assert server.is_loopback("127.0.0.1") and server.is_loopback("::1") and server.is_loopback("localhost")
    assert not server.is_loopback("192.168.1.4") and not server.is_loopback("example.org")
    (tmp_path / "tokens").write_text("# the studio's\nalpha\n\n beta \n")
    monkeypatch.setenv(server.TOKENS_ENV, "gamma,,")
    assert server.tokens(ws, str(tmp_path / "tokens")) == {"alpha", "beta", "gamma"}
    with pytest.raises(InputError, match="no such file"):
        server.tokens(ws, str(tmp_path / "missing"))


def test_without_tokens_only_loopback_names_and_pages_are_answered(tmp_path: Path) -> None:
    """A tokenless server (loopback only) on real HTTP: a request addressed to another name (DNS rebinding) gets
    400, a write that a browser says comes from another site's page 403; its own pages and curl get through."""
    import threading
    import uuid

    import uvicorn

    from service.api import create_app
    from service.studio import Studio
    from tests.conftest import make_workspace

    ws = Workspace(make_workspace(tmp_path / "ws"))
    app = create_app(Studio(ws, {"onboard": uuid.uuid4(), "render": uuid.uuid4()}, 1), frozenset())
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{port}/api/v1"
        deadline = time.monotonic() + 60
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.05)
        assert httpx.get(f"{url}/identities").json() == []  # no token needed
        assert httpx.get(f"{url}/identities", headers={"Host": "localhost"}).status_code == 200
        assert httpx.get(f"{url}/identities", headers={"Host": "anchor.example.com"}).status_code == 400
        page = {"Origin": "https://anchor.example.com"}
        refused = httpx.post(f"{url}/renders", data={"identity": ID}, headers=page)
        assert refused.status_code == 403 and "need a bearer token" in refused.json()["detail"]
        assert httpx.delete(f"{url}/jobs/{uuid.uuid4()}", headers=page).status_code == 403
        own = httpx.post(f"{url}/renders", data={"identity": ID}, headers={"Origin": f"http://127.0.0.1:{port}"})
        assert own.status_code == 404 and own.json()["detail"] == f"no identity {ID!r} in this workspace"
        too_big = httpx.post(f"{url}/renders", data={"identity": ID}, files={"audio": ("a.wav", b"0" * 1_000_001)})
        assert too_big.status_code == 413
    finally:
        server.should_exit = True
        thread.join(30)
    assert not (ws.state / "uploads").exists() or not any((ws.state / "uploads").iterdir())
