"""The render flow through the command line: caching, motion specs, copies out of the workspace."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from core import progress
from core.errors import InputError
from core.workspace import Workspace
from tasks import smplx_table
from tasks.registry import artifact_dir
from tasks.stages import motion as motion_task
from tests.conftest import (
    ONBOARDED_ID,
    SECOND_ID,
    anchor,
    cli,
    copy_workspace,
    held_out,
    set_param,
    show_pickle,
    video_frames,
)

pytestmark = pytest.mark.slow
ID = ONBOARDED_ID


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory, trained: Path) -> Workspace:
    return Workspace(copy_workspace(trained, tmp_path_factory.mktemp("ws") / "ws"))


def test_anchor_render_command_caches_and_copies_the_video_out(ws: Workspace, tmp_path: Path) -> None:
    out = tmp_path / "out" / "demo.mp4"
    # as a user runs it: a process of its own with its own embedded Prefect server
    first = cli(ws.root, "render", ID, "--motion", f"{ID}:test", "--out", str(out), "--frames", "8", embedded=True)
    assert first.returncode == 0, first.stderr
    assert f"video: {out}" in first.stdout and "assemble" in first.stdout
    # every render scored against its own motion, said with the stage lines
    assert re.search(r"follow: ran [0-9.]+ s: 8 frames scored against the motion: body (—|[0-9.]+%), hands ",
                     first.stdout), first.stdout
    assert len(video_frames(out)) == 8
    # the command's progress and summary only: Prefect's own lines are in the run's log file
    said = first.stdout + first.stderr
    for line in ("temporary server", "Finished in state", "Beginning flow run", "| INFO"):
        assert line not in said, said
    [log] = sorted((ws.state / "logs").glob("run-*.log"))[-1:]
    logged = log.read_text()
    assert "Starting temporary server" in logged and "Stopping temporary server" in logged
    assert "Finished in state Completed()" in logged
    second = anchor(ws.root, "render", ID, "--motion", f"{ID}:test", "--out", str(out), "--frames", "8")
    assert second.returncode == 0, second.stderr
    for stage in ("motion", "render_body", "face", "hands", "assemble", "follow"):
        assert f"{stage}: cached" in second.stdout, second.stdout
    assert any(out.read_bytes() == p.read_bytes() for p in ws.root.glob("data/renders/demo/*/assemble/video.mp4"))
    # errors name what is wrong, before any work
    missing = anchor(ws.root, "render", ID, "--motion", str(tmp_path / "nope.npz"))
    assert missing.returncode != 0 and "no such file" in missing.stderr
    stranger = anchor(ws.root, "render", "nobody", "--motion", "nobody:test")
    assert stranger.returncode != 0 and "has no finetune yet" in stranger.stderr


def test_motion_specs_resolve_to_staged_motions(ws: Workspace, second_person: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from flows.render import stage_motion

    own, _ = held_out(ws)
    key, staged = stage_motion(ws, None, ID, f"{ID}:test", None)  # type: ignore[arg-type]
    _, blocks = smplx_table.read(staged / smplx_table.TABLE)
    assert all(np.array_equal(blocks[k], own[k]) for k in own)  # its own fit, not retargeted
    assert motion_task.read_info(staged)["kind"] == "held_out"
    assert stage_motion(ws, None, ID, f"{ID}:test", None)[0] == key  # content-addressed: same motion, same key
    assert stage_motion(ws, None, ID, f"{ID}:test", 5)[0] != key

    # another person's held-out clips (the half-body portrait, fitted beside it) are retargeted onto this one
    for stage in ("ingest", "smplx_fit"):
        shutil.copytree(artifact_dir(Workspace(second_person), stage, SECOND_ID), artifact_dir(ws, stage, SECOND_ID))
    theirs, _ = motion_task.held_out(artifact_dir(ws, "smplx_fit", SECOND_ID), artifact_dir(ws, "ingest", SECOND_ID))
    _, other = stage_motion(ws, None, ID, f"{SECOND_ID}:test", None)  # type: ignore[arg-type]
    info = motion_task.read_info(other)
    assert info["kind"] == "other_identity" and info["frames"] == len(theirs["transl"]) == 19
    assert "framing" not in info and "retarget" not in info  # beside the motion, never in its key
    info = {**info, **motion_task.read_framing(other)}
    _, moved = smplx_table.read(other / smplx_table.TABLE)
    arms = slice(3 * 15, 63)  # shoulders, elbows, wrists: the gestures are theirs; the placement is this anchor's
    np.testing.assert_allclose(moved["body_pose"][:, arms], theirs["body_pose"][:, arms], atol=1e-6)
    np.testing.assert_array_equal(moved["right_hand_pose"], theirs["right_hand_pose"])
    assert not np.allclose(moved["transl"], theirs["transl"], atol=1e-3)  # moved into this anchor's framing
    assert not np.allclose(theirs["body_pose"][:, arms], own["body_pose"][:, arms], atol=1e-2)  # another person
    # in this anchor's framing: at most one of the 19 frames with the head or shoulders beyond the 2 % tolerance (the
    # head's worst frame sits at 1.85 %, and one whole-suite run saw it cross: 1 frame, 0.0526), never mostly out
    assert info["framing"]["head_or_shoulders_outside_share"] <= 0.06 and not info["framing"]["mostly_outside"]

    # a motion file (this project's own fit format)
    path = tmp_path / "dance.parquet"
    motion_task.write(path, own)
    _, staged_file = stage_motion(ws, None, ID, str(path), None)  # type: ignore[arg-type]
    assert motion_task.read_info(staged_file)["kind"] == "file"
    # a motion that leans far forward and drops: kept in frame; with the old pelvis mode, warned about before
    # any denoising (and the framing check is in what the render records)
    leaned = {**own, "body_pose": own["body_pose"].copy(), "transl": own["transl"] + np.float32([0, 0.3, 0])}
    leaned["body_pose"][:, 3 * 5: 3 * 6] += np.float32([0.7, 0, 0])
    motion_task.write(tmp_path / "lean.parquet", leaned)
    said: list[str] = []
    monkeypatch.setattr(progress, "notice", said.append)
    _, kept = stage_motion(ws, None, ID, str(tmp_path / "lean.parquet"), None)  # type: ignore[arg-type]
    assert not motion_task.read_framing(kept)["framing"]["mostly_outside"] and said == []
    params_file = ws.root / "params.yaml"
    before = params_file.read_text()
    try:
        set_param(ws.root, "motion", "retarget", "pelvis")
        _, left = stage_motion(ws, None, ID, str(tmp_path / "lean.parquet"), None)  # type: ignore[arg-type]
    finally:
        params_file.write_text(before)
    assert motion_task.read_framing(left)["framing"]["mostly_outside"]
    assert left != kept  # retargeted differently: another motion, another render
    assert len(said) == 1 and said[0].startswith(f"warning: {ID} following ") and "training framing" in said[0]
    with pytest.raises(InputError, match="no such file"):
        stage_motion(ws, None, ID, str(tmp_path / "missing.npz"), None)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="has no smplx_fit yet"):
        stage_motion(ws, None, ID, "nobody:test", None)  # type: ignore[arg-type]


def test_lineage_of_a_copy_outside_the_workspace_is_found_by_content(ws: Workspace, tmp_path: Path) -> None:
    out = tmp_path / "delivery" / "spot.mp4"
    done = anchor(ws.root, "render", ID, "--motion", f"{ID}:test", "--frames", "8", "--out", str(out))
    assert done.returncode == 0, done.stderr
    traced = anchor(ws.root, "lineage", str(out), "--json")
    assert traced.returncode == 0, traced.stderr
    steps = json.loads(traced.stdout)
    assert steps[0]["stage"] == "copy" and steps[0]["path"] == str(out)
    assert steps[0]["copy_of"].startswith(f"data/renders/{ID}/") and steps[0]["copy_of"].endswith("/assemble")
    stages = [s["stage"] for s in steps]
    for stage in ("assemble", "face", "render_body", "motion", "finetune", "pretrain", "smplx_fit", "source"):
        assert stage in stages, stages
    source = next(s for s in steps if s["stage"] == "source")
    assert len(source["source_sha256"]) == 64 and all(s["verified"] for s in steps)
    stranger = tmp_path / "other.mp4"
    stranger.write_bytes(out.read_bytes()[:-1] + b"\0")
    refused = anchor(ws.root, "lineage", str(stranger))
    assert refused.returncode != 0 and "no render there made a file with its content" in refused.stderr


def test_a_show_pickle_renders_and_its_record_says_how_it_was_framed(ws: Workspace, tmp_path: Path) -> None:
    done = anchor(ws.root, "render", ID, "--motion", str(show_pickle(tmp_path / "show.pkl")), "--frames", "4",
               "--no-face", "--out", str(tmp_path / "show.mp4"))
    assert done.returncode == 0, done.stderr
    assert len(video_frames(tmp_path / "show.mp4")) == 4
    record = _record_of(ws, tmp_path / "show.mp4")
    motion = record["motion"]
    assert motion["source_format"] == "show-pkl" and motion["retarget"]["mode"] == "framing"
    assert "relaxed pose is used instead" in motion["notes"][0]  # the mannequin cannot decode SHOW's PCA hands
    assert set(motion["framing"]) >= {"head", "shoulders", "hands", "head_or_shoulders_outside_share"}


def _record_of(ws: Workspace, video: Path) -> dict:
    for art in ws.root.glob("data/renders/demo/*/assemble"):
        if (art / "video.mp4").read_bytes() == video.read_bytes():
            return json.loads((art / "render.json").read_text())
    raise AssertionError(f"no render made {video}")


def _talkshow(path: Path, frames: int = 45) -> Path:
    """TalkSHOW's (T, 265) layout: jaw, eyes, a root turned by pi (its camera's y is down), body, hands, 100
    expressions; gestures as slow sines."""
    t = np.linspace(0, 2 * np.pi, frames, dtype=np.float32)[:, None]
    data = np.zeros((frames, 265), np.float32)
    data[:, 0] = 0.15 * (1 + np.sin(3 * t[:, 0]))  # the jaw opens and closes
    data[:, 9] = np.pi
    data[:, 12:75] = 0.1 * np.sin(t + np.arange(63, dtype=np.float32))
    data[:, 75:165] = 0.2 * np.sin(2 * t + np.arange(90, dtype=np.float32))
    np.save(path, data)
    return path


def _amass(path: Path, frames: int = 90) -> Path:
    """An AMASS/BEAT2-style .npz at 60 fps: z-up world, 1 m off the origin, a wide sway."""
    t = np.arange(frames) / 60.0
    poses = np.zeros((frames, 165), np.float32)
    poses[:, 0] = np.pi / 2
    poses[:, 3 + 15 * 3 + 2] = -1.3 + 0.3 * np.sin(2 * np.pi * t)
    trans = np.stack([0.2 * np.sin(np.pi * t), np.ones(frames), np.full(frames, 0.9)], 1).astype(np.float32)
    np.savez(path, poses=poses, trans=trans, betas=np.zeros(16, np.float32), mocap_frame_rate=np.array(60.0))
    return path


@pytest.mark.parametrize("source", ["talkshow-npy", "amass-npz", "show-pkl"])
def test_each_motion_file_format_lands_in_the_identitys_framing_and_renders(ws: Workspace, tmp_path: Path,
                                                                            source: str) -> None:
    from flows.render import stage_motion
    from tests.conftest import render

    make = {"talkshow-npy": lambda: _talkshow(tmp_path / "t.npy"), "amass-npz": lambda: _amass(tmp_path / "a.npz"),
            "show-pkl": lambda: show_pickle(tmp_path / "s.pkl")}[source]
    _, staged = stage_motion(ws, None, ID, str(make()), None)  # type: ignore[arg-type]
    info = {**motion_task.read_info(staged), **motion_task.read_framing(staged)}
    assert info["source_format"] == source
    assert info["framing"]["head"]["outside_share"] <= 0.05, info["framing"]  # the bar: the head in frame
    if source == "show-pkl":
        return  # rendered through the command line above
    _, blocks = smplx_table.read(staged / smplx_table.TABLE)
    subject = render(ws, {k: v[:4] for k, v in blocks.items()})
    assert len(video_frames(artifact_dir(ws, "assemble", subject) / "video.mp4")) == 4
