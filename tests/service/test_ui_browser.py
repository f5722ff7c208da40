"""The browser UI as a person uses it: `anchor serve` on loopback, Debian's Chromium driven by Playwright — pick the
anchor, upload a WAV, press render, watch the progress, play the video; then the anchor's past renders with their
lineage. No request may leave loopback (no web fonts, no analytics). Screenshots land in $ANCHOR_SCREENSHOTS (the
ones in docs/ were taken so) or the test's temporary folder."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import av
import pytest

from tests.conftest import shared_video
from tests.service.conftest import ID, Served, serving

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# as the workplace's own probe starts it: headless, as root, and asking nothing of the network
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--autoplay-policy=no-user-gesture-required"]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, trained: Path) -> Iterator[Served]:
    with serving(tmp_path_factory, trained, None) as served:  # tokenless, as `make serve` on a workstation
        yield served


@pytest.fixture(scope="module")
def page(served: Served) -> Iterator[tuple]:
    """A Chromium page on the UI, and every request it made to anywhere but the server (each one refused)."""
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), "Debian's chromium is not installed (make test installs it)"
    outside: list[str] = []

    def only_loopback(route: object) -> None:
        url = route.request.url  # type: ignore[attr-defined]
        if urlsplit(url).hostname == "127.0.0.1" or url.startswith(("data:", "blob:")):
            route.continue_()  # type: ignore[attr-defined]
        else:
            outside.append(url)
            route.abort()  # type: ignore[attr-defined]

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.route("**/*", only_loopback)
            page.goto(served.url + "/", wait_until="domcontentloaded")
            yield page, outside
        finally:
            browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(os.environ.get("ANCHOR_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _wait(condition: object, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.25)


def test_render_from_speech_in_the_browser(page: tuple, served: Served, voice: Path, shots: Path,
                                           tmp_path: Path) -> None:
    page, outside = page
    anchor = page.locator("#anchor input")
    anchor.wait_for(timeout=60_000)
    _wait(lambda: anchor.input_value() == ID, 60, "the trained anchor picked")
    assert page.locator("#version input").input_value() == "v1 (current)"
    page.locator("#audio input[type=file]").set_input_files(str(voice))
    page.locator("#audio audio").first.wait_for(state="attached", timeout=60_000)  # the upload's player
    page.screenshot(path=str(shots / "ui-render.png"))
    page.locator("#render").click()

    status = page.locator("#render-status")
    lines: list[str] = []
    shot = False
    player = page.locator("#video video")
    deadline = time.monotonic() + 600
    while player.count() == 0 or not player.first.get_attribute("src"):
        assert time.monotonic() < deadline, lines[-3:]
        assert "failed" not in status.inner_text(), status.inner_text()
        # the status line itself: while Gradio's progress overlay covers the box (under load) its timer and bar
        # text come first in the element's text
        text = next((t for t in reversed(status.inner_text().splitlines()) if " · job " in t), "").strip()
        if text and (not lines or lines[-1] != text):
            lines.append(text)
            if "running" in text and "starting" not in text and not shot:
                page.screenshot(path=str(shots / "ui-progress.png"))
                shot = True
        time.sleep(0.3)
    _wait(lambda: "done" in status.inner_text(), 30, "the status saying done")
    # progress shown while it ran: a stage at work and a share above zero, rising
    shares = [int(line.split(" · ")[2].rstrip("%")) for line in lines
              if line.startswith("running · ") and line.count(" · ") >= 3 and "starting" not in line]
    assert shares and max(shares) > 0 and shares == sorted(shares), lines

    # it plays, with the audio's length: seconds of speech in, the same seconds of video out
    page.evaluate("v => { v.muted = true; return v.play(); }", player.first.element_handle())
    _wait(lambda: page.evaluate("v => v.currentTime", player.first.element_handle()) > 0.2, 60, "the video playing")
    duration = page.evaluate("v => v.duration", player.first.element_handle())
    with av.open(str(voice)) as c:
        seconds = float(c.streams.audio[0].duration * c.streams.audio[0].time_base)
    assert abs(duration - seconds) < 0.1, (duration, seconds)
    [made] = sorted((served.ws.root / "data" / "renders" / ID).glob("*/assemble/video.mp4"))
    key = made.parents[1].name
    assert key in status.inner_text()
    page.screenshot(path=str(shots / "ui-rendered.png"))

    # the anchor's renders: the new one listed; picked, its video and its lineage back to the source video
    page.get_by_role("tab", name="Renders").click()
    table = page.locator("#renders")
    _wait(lambda: key in table.inner_text(), 60, "the render listed")
    table.get_by_text(key).filter(visible=True).first.click()
    lineage = page.locator("#lineage")
    _wait(lambda: "source" in lineage.inner_text() and "assemble" in lineage.inner_text(), 60, "its lineage")
    assert "NO" not in lineage.inner_text().split()  # every step re-hashed and verified
    _wait(lambda: (page.locator("#gallery-video video").count() > 0
                   and bool(page.locator("#gallery-video video").first.get_attribute("src"))), 60, "its video")
    page.screenshot(path=str(shots / "ui-renders.png"), full_page=True)

    # onboarding: a taken name is refused on the page in the API's own sentence, and nothing is uploaded
    page.get_by_role("tab", name="Onboard").click()
    name = page.locator("#onboard-name input, #onboard-name textarea").first
    name.wait_for(timeout=30_000)
    page.screenshot(path=str(shots / "ui-onboard.png"))
    uploads = sorted((served.ws.state / "uploads").rglob("*"))
    name.fill(ID)
    clip = shared_video("anchor_seated_hevc.mp4")
    page.locator("#onboard-video input[type=file]").set_input_files(str(clip))
    page.get_by_text(clip.name).first.wait_for(timeout=60_000)
    page.locator("#onboard").click()
    page.get_by_text(f"identity {ID!r} exists; onboard another name").first.wait_for(timeout=60_000)
    # a new name with a file that is no video: stored, decoded, refused; neither the workspace nor Gradio keeps it
    fake = tmp_path / "talk.mp4"
    fake.write_text("not a video\n" * 100)
    page.reload()
    page.get_by_role("tab", name="Onboard").click()
    name.wait_for(timeout=60_000)
    name.fill("newcomer")
    page.locator("#onboard-video input[type=file]").set_input_files(str(fake))
    page.get_by_text(fake.name).first.wait_for(timeout=60_000)
    page.locator("#onboard").click()
    page.get_by_text("video.mp4: not a readable video").first.wait_for(timeout=60_000)
    assert "newcomer" not in served.ws.identities()
    assert sorted((served.ws.state / "uploads").rglob("*")) == uploads
    kept = [p.name for p in (served.ws.state / "gradio").rglob("*") if p.is_file()]
    assert "talk.mp4" not in kept and clip.name not in kept, kept
    assert outside == []
    for name in ("ui-render.png", "ui-progress.png", "ui-rendered.png", "ui-renders.png", "ui-onboard.png"):
        assert (shots / name).stat().st_size > 10_000, name
