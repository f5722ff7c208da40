"""anchor render, speak, rerender, motion import: new videos of an identity, and motion brought to it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli import show
from cli.app import app, motion_app, out, say
from cli.env import run_flow, workspace
from core.workspace import Workspace, check_identity_name


@app.command()
def render(
        name: Annotated[str, typer.Argument(help="Identity to render (finetuned).")],
        motion: Annotated[str, typer.Option("--motion", "-m", help="NAME:test (an identity's held-out clips), a "
                                            "video of anyone, a motion file (.npz/.npy/.pkl/.parquet), or an "
                                            "audio file (.wav/.mp3/.m4a/…: speech drives the anchor).")],
        out_path: Annotated[Path | None, typer.Option("--out", "-o", help="Where to copy the finished mp4 "
                                                      "(default: leave it under data/renders/).")] = None,
        frames: Annotated[int | None, typer.Option("--frames", min=1, help="Only the first N frames.")] = None,
        seed: Annotated[int | None, typer.Option("--seed", min=0, help="Overrides render_body/face seed.")] = None,
        no_face: Annotated[bool, typer.Option("--no-face", help="Skip the face stage.")] = False,
) -> None:
    """A new video of NAME following a motion: batch-overlapped denoising, face inpainting, H.264 with audio."""
    from core.errors import InputError

    check_identity_name(name)
    if not motion.endswith(":test"):
        path = Path(motion).expanduser()
        if not path.is_file():
            raise InputError(f"--motion {motion}: expected NAME:test, a video file or a motion file; no such file")
        motion = str(path.resolve())
    ws = workspace()
    from tasks.audio import is_audio

    if not motion.endswith(":test") and is_audio(Path(motion)):
        _check_speech(ws, name, Path(motion))
    summary = run_flow(ws, "flows.render", "render", str(ws.root), name, motion,
                        str(out_path.expanduser().resolve()) if out_path else None, frames, seed, not no_face)
    show.runs(summary["stages"])
    say(f"video: {summary['video']}")


@app.command()
def speak(
        name: Annotated[str, typer.Argument(help="Identity to render (finetuned, onboarded from a video with sound).")],
        audio: Annotated[Path, typer.Option("--audio", "-a", help="Speech: wav, mp3, m4a, … or any video file (its "
                                            "audio is used).")],
        out_path: Annotated[Path | None, typer.Option("--out", "-o", help="Where to copy the finished mp4 "
                                                      "(default: leave it under data/renders/).")] = None,
        frames: Annotated[int | None, typer.Option("--frames", min=1, help="Only the first N frames.")] = None,
        seed: Annotated[int | None, typer.Option("--seed", min=0, help="Overrides speech/render_body/face seed: "
                                                 "another seed, other gestures for the same speech.")] = None,
        no_face: Annotated[bool, typer.Option("--no-face", help="Skip the face stage.")] = False,
) -> None:
    """A video of NAME speaking AUDIO: gestures, head and mouth from NAME's own speech model, as long as the audio,
    the audio muxed."""
    from core.errors import InputError

    check_identity_name(name)
    path = audio.expanduser()
    if not path.is_file():
        raise InputError(f"--audio {audio}: no such file")
    ws = workspace()
    _check_speech(ws, name, path)
    summary = run_flow(ws, "flows.render", "render", str(ws.root), name, str(path.resolve()),
                        str(out_path.expanduser().resolve()) if out_path else None, frames, seed, not no_face, True)
    show.runs(summary["stages"])
    say(f"video: {summary['video']}")


def _check_speech(ws: Workspace, name: str, audio: Path) -> None:
    """Bad audio or an identity without a speech model: one line, before Prefect starts."""
    from flows.render import speech_model
    from tasks.audio import check

    check(audio)
    speech_model(ws, name)


@app.command()
def rerender(name: Annotated[str | None, typer.Argument(help="Only this identity's renders.")] = None) -> None:
    """Re-render every stale render (newer model version or changed render params) now; current ones stay."""
    if name:
        check_identity_name(name)
    ws = workspace()
    summary = run_flow(ws, "flows.rerender", "rerender", str(ws.root), name)
    for subject, why in summary["redone"].items():
        out.print(f"redone {subject}: {'; '.join(why)}", markup=False, highlight=False)
    out.print(f"{len(summary['redone'])} re-rendered, {len(summary['current'])} already current")


@motion_app.command("import")
def motion_import(
        motion: Annotated[Path, typer.Argument(help="AMASS/BEAT2 .npz, TalkSHOW .npy, SHOW .pkl, a smplx_fit "
                                               "params.parquet (or its folder), or a video of any person.")],
        identity: Annotated[str, typer.Option("--identity", "-i", help="Identity to retarget onto.")],
        out_path: Annotated[Path | None, typer.Option("--out", help="Parquet file to write (default: "
                                                      "data/motions/<identity>/<name>.parquet).")] = None,
        clip: Annotated[str | None, typer.Option(help="One clip of a fit table.")] = None) -> None:
    """Read a motion, resample it to 30 fps and retarget it onto an identity's shape, camera and framing."""
    from core.errors import InputError
    from tasks.stages.motion import is_video

    check_identity_name(identity)
    ws = workspace()
    motion = motion.expanduser()
    if not motion.exists():
        raise InputError(f"{motion}: no such file")
    target = out_path or ws.data / "motions" / identity / f"{motion.stem}.parquet"
    if is_video(motion):
        from tasks import video as vio

        vio.probe(motion)
        info = run_flow(ws, "flows.motion", "import_motion", str(ws.root), identity, str(motion.resolve()),
                         str(target), clip)
    else:
        from flows.motion import import_motion

        info = import_motion.fn(str(ws.root), identity, str(motion.resolve()), str(target), clip)
    say(f"{info['source_format']}: {info['source_frames']} frames at {info['source_fps']:g} fps → "
        f"{info['frames']} frames at 30 fps ({info['seconds']:.1f} s), retargeted onto {identity}")
    for note in info.get("notes", []):
        say(note)
    framing = info.get("framing") or {}
    if framing:
        say(f"framing: head or shoulders outside {identity}'s training framing in "
            f"{100 * framing['head_or_shoulders_outside_share']:.0f}% of frames, hands in "
            f"{100 * framing['hands']['outside_share']:.0f}%")
    say(f"wrote {info['out']}")
