"""The studio's browser UI: Gradio, mounted at `/` of the API's own app, calling the same Studio as the API.

Three tabs: render (an anchor, its model version, speech uploaded or recorded or a motion file, live progress, the
video to play and download), the anchor's past renders (stale marks, lineage, its report), and onboarding a new
anchor from a video. Nothing is fetched from the internet: system fonts only, no share link, no analytics.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import gradio as gr
from fastapi import FastAPI, HTTPException

from service.studio import Studio

TITLE = "Make-Your-Anchor+"
RENDER_COLUMNS = ["render", "model version", "stale", "why", "finished", "motion"]
LINEAGE_COLUMNS = ["stage", "of", "verified", "hash", "path"]
MOTION_TYPES = [".npz", ".npy", ".pkl", ".parquet", ".mp4", ".mov", ".mkv", ".webm", ".avi"]


def _version(label: str | None) -> int | None:
    """'v3 (current)' → 3."""
    return int(label.split()[0][1:]) if label and label.startswith("v") else None


def _line(status: dict[str, Any]) -> str:
    """One line for a job's status; an ended job's with its error, if any."""
    if status["state"] in ("failed", "cancelled"):
        return f"**{status['state']}**{' · ' + status['error'] if status.get('error') else ''} · job `{status['job']}`"
    stage = f" · {status['stage']}" if status.get("stage") else ""
    return f"**{status['state']}**{stage} · {status['progress']:.0%} · job `{status['job']}`"


def uploaded(path: str | None) -> Path | None:
    """A file the browser uploaded, which Gradio keeps in its upload folder; any other path a client names (a file
    of the server's, fetched or not by Gradio) is refused, so the UI, like the API, never reads a path it is told."""
    if not path:
        return None
    found = Path(path).resolve()
    if not found.is_relative_to(Path(gr.utils.get_upload_folder()).resolve()):
        raise gr.Error("only files uploaded from this page are accepted", print_exception=False)
    return found


def discard(*paths: Path | None) -> None:
    """Gradio's copies of uploads the studio has copied (or refused): the workspace keeps what it needs."""
    for path in paths:
        if path is not None:
            shutil.rmtree(path.parent, ignore_errors=True)


def shown(path: Path) -> str:
    """A workspace file handed to the page through Gradio's upload folder (a hard link, or a copy across devices):
    Gradio serves that folder only, never the workspace."""
    folder = Path(tempfile.mkdtemp(dir=gr.utils.get_upload_folder()))
    target = folder / path.name
    try:
        os.link(path, target)
    except OSError:
        shutil.copyfile(path, target)
    return str(target)


def build(studio: Studio, poll_s: float) -> gr.Blocks:
    """The UI's Blocks; every handler turns the studio's refusals into one sentence on the page."""

    def refused(exc: HTTPException) -> Exception:
        return gr.Error(str(exc.detail), print_exception=False)

    def anchors() -> list[dict[str, Any]]:
        return studio.identities()

    def pick_version(name: str | None) -> Any:
        row = next((a for a in anchors() if a["name"] == name), None)
        if row is None:
            return gr.update(choices=[], value=None)
        labels = [f"v{v['version']}" + (" (current)" if v["version"] == row["current_version"] else "")
                  for v in row["versions"]]
        if row["current_version"] is None:  # a model not numbered (made outside `anchor finetune`): still current
            labels.append("current (not numbered)")
        current = next(label for label in labels if "current" in label)
        speech = "" if row["speech"] else " · no speech model: drive it with a motion file"
        return gr.update(choices=labels, value=current, info=f"renders use the current version{speech}")

    def loaded() -> tuple[Any, Any, Any]:
        rows = anchors()
        names = [a["name"] for a in rows if a["trained"]]
        first = names[0] if names else None
        return (gr.update(choices=names, value=first), pick_version(first),
                gr.update(choices=[a["name"] for a in rows], value=first))

    async def follow(job: str, progress: gr.Progress) -> AsyncIterator[dict[str, Any]]:
        """The job's statuses until it ends, shown on the page's progress bar as they come."""
        progress(0, desc="queued")
        try:
            async for status in studio.wait(job, poll_s):
                progress(status["progress"], desc=status["stage"] or status["state"])
                yield status
        except HTTPException as exc:
            raise refused(exc) from None

    async def render(anchor: str | None, version: str | None, audio: str | None, motion: str | None,
                     seed: str | None, progress: gr.Progress = gr.Progress()) -> AsyncIterator[tuple]:
        speech, moves = uploaded(audio), uploaded(motion)
        try:
            if not anchor:
                raise gr.Error("pick an anchor first", print_exception=False)
            if seed and not seed.strip().isdigit():
                raise gr.Error(f"seed {seed!r}: a whole number ≥ 0, or nothing", print_exception=False)
            try:
                job = await studio.render(anchor, audio=speech, motion=moves, version=_version(version),
                                          seed=int(seed) if seed and seed.strip() else None)
            except HTTPException as exc:
                raise refused(exc) from None
        finally:
            discard(speech, moves)
        yield job, f"**pending** · job `{job}`", gr.skip()  # the job known at once: Cancel can reach it
        async for status in follow(job, progress):
            if status["state"] == "completed":
                name, key = status["result"]["render"].split("/")
                try:
                    video = shown(await asyncio.to_thread(studio.finished, name, key))  # may fetch it
                except HTTPException as exc:
                    raise refused(exc) from None
                yield job, f"**done** · render `{key}` · job `{job}`", video
            else:
                yield job, _line(status), None if status["state"] in ("failed", "cancelled") else gr.skip()

    async def cancel(job: str | None) -> str:
        if not job:
            return "no job to cancel"
        try:
            return f"**cancelled** · job `{(await studio.cancel(job))['job']}`"
        except HTTPException as exc:
            raise refused(exc) from None

    def past(name: str | None) -> tuple[Any, list[str], Any, Any, Any]:
        """The anchor's renders and its report; what was picked for another anchor is cleared."""
        if not name:
            return gr.update(value=[]), [], None, None, gr.update(value=[])
        try:
            rows = studio.renders(name)
            report = shown(studio.report(name))
        except HTTPException as exc:
            if exc.status_code != 404 or "report" not in str(exc.detail):
                raise refused(exc) from None
            rows, report = studio.renders(name), None
        table = [[r["render"].split("/")[1], r["model_version"], "stale" if r["stale"] else "",
                  "; ".join(r["why"] or []), r["finished_at"] or "", r["motion"] or ""] for r in rows]
        return gr.update(value=table), [r["render"] for r in rows], report, None, gr.update(value=[])

    def show(keys: list[str], evt: gr.SelectData) -> tuple[Any, Any]:
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        if row is None or row >= len(keys):
            return None, gr.update(value=[])
        name, key = keys[row].split("/")
        try:
            steps = studio.lineage(name, key)
            return shown(studio.finished(name, key)), [
                [step["stage"], step.get("identity") or "", "yes" if step.get("verified") else "NO",
                 (step.get("output_hash") or "")[:16], step.get("path") or ""] for step in steps]
        except HTTPException as exc:
            raise refused(exc) from None

    async def onboard(name: str, video: str | None, progress: gr.Progress = gr.Progress()) -> AsyncIterator[str]:
        clip = uploaded(video)
        try:
            if clip is None:
                raise gr.Error("upload a video of the anchor (about a minute of one person)", print_exception=False)
            try:
                job = await studio.onboard(name or "", clip)
            except HTTPException as exc:
                raise refused(exc) from None
        finally:
            discard(clip)
        yield f"**pending** · job `{job}`"
        async for status in follow(job, progress):
            if status["state"] == "completed":
                made = status["result"]
                yield f"**done** · {made['identity']} v{made['version']} is trained · job `{job}`"
            else:
                yield _line(status)

    # Gradio's copies of uploads and of what it shows are dropped after a day, checked hourly
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(3600, 86400)) as ui:
        gr.Markdown(f"# {TITLE}\nRender an anchor from speech or motion, look back at its renders, onboard a new one.")
        with gr.Tab("Render", id="render-tab"):
            with gr.Row():
                anchor = gr.Dropdown(label="Anchor", choices=[], elem_id="anchor")
                version = gr.Dropdown(label="Model version", choices=[], elem_id="version")
                seed = gr.Textbox(label="Seed (optional)", placeholder="the render's default", elem_id="seed")
            with gr.Row():
                audio = gr.Audio(label="Speech: upload or record", sources=["upload", "microphone"], type="filepath",
                                 buttons=["download"], elem_id="audio")  # no share button: it posts to a hub
                motion = gr.File(label="…or a motion file (.npz/.npy/.pkl/.parquet) or a video of anyone",
                                 file_types=MOTION_TYPES, type="filepath", elem_id="motion")
            with gr.Row():
                go = gr.Button("Render", variant="primary", elem_id="render")
                stop = gr.Button("Cancel", elem_id="cancel")
            status = gr.Markdown(elem_id="render-status")
            video = gr.Video(label="Video", interactive=False, height=480, buttons=["download"], elem_id="video")
            job = gr.State()
        with gr.Tab("Renders", id="renders-tab") as renders_tab:
            gallery_anchor = gr.Dropdown(label="Anchor", choices=[], elem_id="gallery-anchor")
            table = gr.Dataframe(headers=RENDER_COLUMNS, interactive=False, elem_id="renders")
            keys = gr.State([])
            with gr.Row():
                chosen = gr.Video(label="Render (pick a row)", interactive=False, height=360, buttons=["download"],
                                  elem_id="gallery-video")
                report = gr.File(label="Evaluation report", interactive=False, elem_id="report")
            lineage = gr.Dataframe(headers=LINEAGE_COLUMNS, interactive=False, elem_id="lineage",
                                   label="Lineage: the render back to its source video, each step re-hashed")
        with gr.Tab("Onboard", id="onboard-tab"):
            name = gr.Textbox(label="New anchor's name", elem_id="onboard-name")
            source = gr.File(label="Video of the anchor (about a minute of one person)", file_types=["video"],
                             type="filepath", elem_id="onboard-video")
            start = gr.Button("Onboard and train", variant="primary", elem_id="onboard")
            onboarded = gr.Markdown(elem_id="onboard-status")

        # the page's own events only: no Gradio API beside the service's (clients use /api/v1)
        private: dict[str, Any] = {"api_visibility": "private"}
        ui.load(loaded, outputs=[anchor, version, gallery_anchor], **private)
        anchor.change(pick_version, inputs=anchor, outputs=version, **private)
        go.click(render, inputs=[anchor, version, audio, motion, seed], outputs=[job, status, video],
                 concurrency_limit=None, **private)
        stop.click(cancel, inputs=job, outputs=status, **private)
        picked = [table, keys, report, chosen, lineage]
        gallery_anchor.change(past, inputs=gallery_anchor, outputs=picked, **private)
        renders_tab.select(past, inputs=gallery_anchor, outputs=picked, **private)  # renders made meanwhile
        table.select(show, inputs=keys, outputs=[chosen, lineage], **private)
        start.click(onboard, inputs=[name, source], outputs=onboarded, concurrency_limit=None, **private)
    return ui


def mount(app: FastAPI, studio: Studio, tokens: frozenset[str], poll_s: float) -> FastAPI:
    """The UI at `/` of `app`. With tokens, it asks for one as the password (any user name)."""

    def signed_in(_user: str, password: str) -> bool:
        return any(hmac.compare_digest(password.encode(), t.encode()) for t in tokens)

    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # no web fonts: nothing from the internet
    blocks = build(studio, poll_s)
    gr.mount_gradio_app(app, blocks, path="/", auth=signed_in if tokens else None,
                        auth_message="Sign in with any name and one of the service's tokens as the password.",
                        ssr_mode=False, mcp_server=False, theme=theme, footer_links=[], max_file_size=studio.limit)
    # what `launch()` sets and mounting does not: from now on Gradio takes, as an input file, only one a browser
    # uploaded to it (else a client could name any file of the server's)
    blocks.has_launched = True
    return app
