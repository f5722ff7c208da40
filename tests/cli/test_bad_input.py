"""Bad input: one clear line on stderr, a non-zero exit, no artifact and no completed ledger row."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from core import ledger
from core.workspace import Workspace
from tests.conftest import ROOT, make_workspace, shared_video


def anchor(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli.main", "-w", str(root), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def assert_refused(root: Path, proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode != 0
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]
    ids = root / "data/identities"
    assert not ids.exists() or not any(ids.iterdir()), list(ids.rglob("*"))
    df = ledger.read(Workspace(root).ledger_dir)
    assert not (df["status"] == "completed").any()


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("bad") / "ws")


def test_empty_file(ws: Path, tmp_path: Path) -> None:
    video = tmp_path / "empty.mp4"
    video.write_bytes(b"")
    assert_refused(ws, anchor(ws, "onboard", "demo", "--video", str(video)), "empty file")


def test_truncated_mp4(ws: Path, tmp_path: Path) -> None:
    data = shared_video("halfbody_portrait.mp4").read_bytes()
    video = tmp_path / "cut.mp4"
    video.write_bytes(data[: len(data) // 2])
    assert_refused(ws, anchor(ws, "onboard", "demo", "--video", str(video)), str(video))


def test_text_file_named_mp4(ws: Path, tmp_path: Path) -> None:
    video = tmp_path / "notes.mp4"
    video.write_text("this is not a video\n" * 50)
    assert_refused(ws, anchor(ws, "onboard", "demo", "--video", str(video)), "not a readable video")


def test_missing_path(ws: Path, tmp_path: Path) -> None:
    assert_refused(ws, anchor(ws, "onboard", "demo", "--video", str(tmp_path / "nope.mp4")), "no such file")


@pytest.mark.parametrize("name", ["../x", "a/b", "Bob Smith", "x" * 200, "_lead", "UPPER"])
def test_bad_identity_names(ws: Path, name: str) -> None:
    proc = anchor(ws, "onboard", name, "--video", str(shared_video("halfbody_portrait.mp4")))
    assert_refused(ws, proc, "invalid identity name")


@pytest.mark.slow  # 8-20 s on a busy machine: `make test`, not the edit loop
def test_malformed_params(tmp_path: Path) -> None:
    root = make_workspace(tmp_path / "ws")
    video = str(shared_video("halfbody_portrait.mp4"))
    (root / "params.yaml").write_text("ingest:\n  resolution: [1, 2\n")
    assert_refused(root, anchor(root, "onboard", "demo", "--video", video), "params.yaml", "not valid YAML")
    (root / "params.yaml").write_text("ingest:\n  resolution: 12\n")
    assert_refused(root, anchor(root, "onboard", "demo", "--video", video), "ingest.resolution = 12", "64")
    (root / "params.yaml").write_text("ingest:\n  resolutoin: 512\n")
    assert_refused(root, anchor(root, "onboard", "demo", "--video", video), "unknown key ingest.resolutoin")


@pytest.mark.slow  # 8-20 s on a busy machine: `make test`, not the edit loop
def test_video_without_a_person(ws: Path, tmp_path: Path) -> None:
    video = tmp_path / "empty_room.mp4"
    rng = np.random.default_rng(0)
    with av.open(str(video), "w") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        yy, xx = np.mgrid[0:240, 0:320]
        for i in range(60):
            img = ((xx + 3 * i) % 256).astype(np.uint8)[..., None].repeat(3, 2)
            img = np.clip(img.astype(int) + rng.integers(-8, 8, img.shape), 0, 255).astype(np.uint8)
            img[:, :, 2] = (yy % 200).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    assert_refused(ws, anchor(ws, "onboard", "demo", "--video", str(video)), "no person found")
