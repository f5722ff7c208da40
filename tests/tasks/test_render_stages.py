"""The render stages on the tiny profile, on a really trained (briefly) identity: motion → render_body → face →
assemble through the runner. Tiny pictures are noise; these tests pin the plumbing: lengths, seeds, faces that come
and go, audio, and what the manifests record."""

from __future__ import annotations

import json
import wave
from pathlib import Path

import av
import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy.spatial.transform import Rotation

from core.artifacts import read_manifest
from core.errors import InputError, StageError
from core.progress import NullProgress
from core.workspace import Workspace
from tasks import runner
from tasks.registry import artifact_dir
from tasks.stages import motion as motion_task
from tests.conftest import ONBOARDED_ID, copy_workspace, held_out, render, video_frames

slow = pytest.mark.slow  # on a trained (or onboarded) identity; the unit tests below are not
ID = ONBOARDED_ID


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory, trained: Path) -> Workspace:
    return Workspace(copy_workspace(trained, tmp_path_factory.mktemp("ws") / "ws"))


@slow
def test_held_out_render_has_the_motions_length_and_records_what_shaped_it(ws: Workspace) -> None:
    blocks, _ = held_out(ws)
    n = len(blocks["transl"])
    meta = json.loads((artifact_dir(ws, "ingest", ID) / "meta.json").read_text())
    assert n == sum(c["frames"] for c in meta["clips"] if c["split"] == "test") == 19
    subject = render(ws, blocks)
    art = artifact_dir(ws, "assemble", subject)
    assert art == ws.root / "data" / "renders" / ID / subject.split("/")[1] / "assemble"
    frames = video_frames(art / "video.mp4")
    assert len(frames) == n and frames[0].shape == (64, 64, 3)  # the tiny checkpoint's resolution
    with av.open(str(art / "video.mp4")) as c:
        assert c.streams.video[0].codec_context.name == "h264" and c.streams.video[0].average_rate == 30
        assert not c.streams.audio  # the motion was staged without its audio
    record = json.loads((art / "render.json").read_text())
    fine = read_manifest(artifact_dir(ws, "finetune", ID))["output_hash"]
    assert record["model_version"] == fine
    assert record["motion"]["hash"] == read_manifest(artifact_dir(ws, "motion", subject))["output_hash"]
    assert record["params"]["render_body"]["steps"]["tiny"] == 3 and record["params"]["render_body"]["window"] == 16
    assert record["params"]["face"]["enabled"] is True and record["frames"] == n
    body = read_manifest(artifact_dir(ws, "render_body", subject))
    assert body["summary"]["frame_evals_per_step"] == 32 and body["summary"]["windows"] == 2  # 19 frames: 0, 3
    owners = {(i.get("stage"), i.get("identity")) for i in body["inputs"] if "stage" in i}
    assert owners == {("motion", subject), ("finetune", ID), ("smplx_fit", ID), ("ingest", ID)}
    # the conditions the body model saw are kept beside its frames, one per motion frame
    assert len(list((artifact_dir(ws, "render_body", subject) / "cond").glob("*.png"))) == n


@slow
def test_same_seed_same_frames_other_seed_other_frames(ws: Workspace) -> None:
    blocks, _ = held_out(ws)
    subject = render(ws, blocks)
    first = read_manifest(artifact_dir(ws, "render_body", subject))["output_hash"]
    again = runner.execute(ws, "render_body", subject)  # recomputed from scratch by the runner
    assert again.output_hash == first
    other = runner.execute(ws, "render_body", subject, overrides={"seed": 1})
    assert other.output_hash != first
    shared = runner.execute(ws, "render_body", subject, overrides={"noise": "shared"})
    assert shared.output_hash not in (first, other.output_hash)
    with pytest.raises(StageError, match="invalid override"):
        runner.execute(ws, "render_body", subject, overrides={"overlap": 16})


@slow
def test_faces_that_leave_the_view_pass_through_and_nothing_crashes(ws: Workspace) -> None:
    blocks, _ = held_out(ws)
    blocks = {k: v.copy() for k, v in blocks.items()}
    away = slice(5, 9)
    turn = Rotation.from_euler("y", 180, degrees=True)
    blocks["global_orient"][away] = (turn * Rotation.from_rotvec(blocks["global_orient"][away])).as_rotvec()
    blocks["transl"][12:14, 0] += 5.0  # far out of view to the side
    # the tiny profile draws noise, no skin for the check to find where no face is detected: trust the mesh here
    subject = render(ws, blocks, overrides={"face": {"check_skin": 0.0}})
    face_dir = artifact_dir(ws, "face", subject)
    table = pq.read_table(face_dir / "faces.parquet").to_pandas()
    reasons = dict(zip(table["frame"], table["reason"], strict=True))
    assert {reasons[i] for i in range(5, 9)} == {"turned_away"}
    assert {reasons[i] for i in (12, 13)} == {"out_of_view"}
    redone = sorted(int(p.stem) for p in (face_dir / "frames").glob("*.png"))
    assert redone == [int(f) for f, v in zip(table["frame"], table["visible"], strict=True) if v]
    assert redone == [0, 1, 2, 3, 4, 9, 10, 11, 14, 15, 16, 17, 18]
    summary = read_manifest(face_dir)["summary"]
    assert summary["runs"] == 3 and summary["missing"] == {"turned_away": 4, "out_of_view": 2}
    assert len(video_frames(artifact_dir(ws, "assemble", subject) / "video.mp4")) == 19


@slow
def test_no_face_leaves_every_body_frame(ws: Workspace) -> None:
    blocks, _ = held_out(ws)
    subject = render(ws, blocks, overrides={"face": {"enabled": False}})
    assert not list((artifact_dir(ws, "face", subject) / "frames").glob("*"))
    assert read_manifest(artifact_dir(ws, "assemble", subject))["summary"]["faces_enhanced"] == 0


@slow
def test_driving_audio_is_muxed_with_the_motions_duration(ws: Workspace, tmp_path: Path) -> None:
    wav = tmp_path / "tone.wav"
    rate, seconds = 16000, 2.0
    t = np.arange(int(rate * seconds)) / rate
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2").tobytes())
    blocks, _ = held_out(ws)
    blocks = {k: v[:12] for k, v in blocks.items()}
    subject = render(ws, blocks, audio=wav)
    video = artifact_dir(ws, "assemble", subject) / "video.mp4"
    with av.open(str(video)) as c:
        assert len(c.streams.audio) == 1
        audio = c.streams.audio[0]
        samples = sum(f.samples for f in c.decode(audio))
        assert audio.rate == rate
    assert abs(samples / rate - 12 / 30) < 0.07  # the cut is 0.4 s; AAC frames round it up a little
    assert len(video_frames(video)) == 12


@slow
def test_render_stages_refuse_an_identity_owner(ws: Workspace) -> None:
    with pytest.raises(StageError, match="belongs to a render"):
        runner.execute(ws, "render_body", ID)
    with pytest.raises(InputError, match="--frames 500: the motion has only 19"):
        motion_task.stage(ws.state / "motions", held_out(ws)[0], {}, None, frames=500)


def _face_on_grey(side: int, centre: tuple[float, float], size: int, tmp: Path) -> np.ndarray:
    """A grey frame with a real face (the seated anchor's, found by the face stage's own detector) at `centre`."""
    import cv2

    from tasks.stages import face
    from tasks.workers import run_parallel
    from tests.conftest import shared_video

    with av.open(str(shared_video("anchor_seated_hevc.mp4"))) as c:
        full = next(c.decode(video=0)).to_ndarray(format="rgb24")
    cv2.imwrite(str(tmp / "full.png"), cv2.cvtColor(full, cv2.COLOR_RGB2BGR))
    (x, y, _), = run_parallel(face.detect_faces, [([str(tmp / "full.png")], 0.5)], 1, NullProgress())[0][0]
    half = 0.12 * full.shape[1]
    crop = full[int(y - half):int(y + half), int(x - half):int(x + half)]
    frame = np.full((side, side, 3), 128, np.uint8)
    cx, cy = int(centre[0]), int(centre[1])
    frame[cy - size // 2: cy - size // 2 + size, cx - size // 2: cx - size // 2 + size] = cv2.resize(
        crop, (size, size), interpolation=cv2.INTER_AREA)
    return frame


@slow
@pytest.mark.parametrize("mode", ["align", "skip", "blurred"])
def test_the_face_stage_never_pastes_beside_the_face_the_body_drew(ws: Workspace, tmp_path: Path,
                                                                   mode: str) -> None:
    """The body drew its face away from the mesh's: found, the crop moves onto it (align) or the frame keeps it
    (skip); blurred past the detector, the mesh's place shows none of the identity's skin and the frame keeps it."""
    import shutil

    import cv2
    import torch

    from tasks import devices, registry
    from tasks.frames import frame_name, read_rgb, write_png
    from tasks.stages import face

    blocks, _ = held_out(ws)
    subject = render(ws, blocks, overrides={"face": {"check_skin": 0.0}})  # noise frames: the mesh's crops kept
    table = pq.read_table(artifact_dir(ws, "face", subject) / "faces.parquet").to_pandas()
    m = np.asarray(table["transform"][0], np.float64).reshape(2, 3)
    fres = 64  # the tiny face model's side
    mesh_face = np.linalg.solve(m[:, :2], np.array([fres / 2, fres / 2]) - m[:, 2])
    side = 64
    drawn = (side - 1 - mesh_face[0], side - 1 - mesh_face[1])  # the body drew its face on the other side
    assert np.linalg.norm(np.subtract(drawn, mesh_face)) > 20
    # the body frames: render_body's artifact copied, its frames replaced by the face drawn elsewhere
    body_dir = tmp_path / "render_body"
    shutil.copytree(artifact_dir(ws, "render_body", subject), body_dir)
    picture = _face_on_grey(side, drawn, 18, tmp_path)
    if mode == "blurred":
        picture = cv2.GaussianBlur(picture, (0, 0), 2.5)
    for png in (body_dir / "frames").glob("*.png"):
        write_png(png, picture)
    spec = registry.get("face")
    inputs = {key: art for key, (_, _, art) in runner.input_dirs(ws, spec, subject).items()}
    inputs["render_body"], inputs["body_model"] = body_dir, runner.body_model_path(ws)
    params = registry.section(ws, spec, {"check": "align" if mode == "blurred" else mode})
    out = tmp_path / f"face-{mode}"
    out.mkdir()
    summary = face.run(inputs, out, params, NullProgress(), settings=registry.settings(ws, spec),
                       compute=devices.Compute(torch.device("cpu")))
    visible = int(table["visible"].sum())
    check = summary["face_check"]
    if mode == "blurred":
        assert check["no_face_found"] == check["no_face_left"] == visible and summary["enhanced"] == 0
        assert set(pq.read_table(out / "faces.parquet").to_pandas()["reason"].dropna()) >= {face.NO_FACE}
        assert not list((out / "frames").glob("*.png")) and not list((out / "cond").glob("*.png"))
        return
    if mode == "skip":
        assert check["skipped"] == visible and summary["enhanced"] == 0
        assert not list((out / "frames").glob("*.png"))  # every frame keeps the body's own face
        return
    assert check["aligned"] == visible and check["agreed"] == 0
    # what the stage changed sits on the face the body drew, not where the mesh put a face
    changed = np.abs(read_rgb(out / "frames" / frame_name(0, "png")).astype(int) - picture.astype(int)).sum(2) > 30
    ys, xs = np.nonzero(changed)
    centroid = np.array([xs.mean(), ys.mean()])
    assert np.linalg.norm(centroid - drawn) < 4 < np.linalg.norm(centroid - mesh_face) - 10


def test_reconcile_moves_or_drops_a_crop_away_from_the_found_face() -> None:
    from tasks.stages import face

    m = np.array([[2.0, 0, -20], [0, 2.0, -40]])  # frame → 64 px crop: crop centre at frame (26, 36), side 32
    found = [[(27.0, 38.0, 0.9)], [(50.0, 10.0, 0.9)], [], [(50.0, 10.0, 0.9), (28.0, 35.0, 0.6)]]
    transforms = [m.copy() for _ in found]
    reasons: list[str | None] = [None] * 4
    counts = face.reconcile(transforms, reasons, found, 64, 0.35, "align")
    assert counts == {"agreed": 2, "aligned": 1, "skipped": 0, "no_face_found": 1, "no_face_redone": 1,
                      "no_face_left": 0}
    np.testing.assert_allclose(transforms[1] @ [50.0, 10.0, 1.0], [32.0, 32.0])  # now centred on the found face
    np.testing.assert_array_equal(transforms[0], m)
    transforms = [m.copy() for _ in found]
    counts = face.reconcile(transforms, reasons, found, 64, 0.35, "skip")
    assert counts["skipped"] == 1 and transforms[1] is None and reasons[1] == face.AWAY
    # no face found: redone where the body frame shows the identity's skin there, left alone where it does not
    for share, kept in ((0.8, True), (0.1, False), (None, True)):
        transforms, reasons = [m.copy() for _ in found], [None] * 4
        counts = face.reconcile(transforms, reasons, found, 64, 0.35, "align", [None, None, share, None], 0.4)
        assert (transforms[2] is not None) == kept and counts["no_face_found"] == 1
        assert counts["no_face_left"] == (not kept) and reasons[2] == (None if kept else face.NO_FACE)


@slow
def test_where_no_face_is_found_the_skin_at_the_mesh_face_decides(tmp_path: Path) -> None:
    """A real face blurred past the detector: its crop centre is the identity's skin (redone there), a crop beside
    it is not (the frame keeps the body's face). The skin model is the person's own face."""
    import cv2

    from tasks.stages import face
    from tasks.workers import run_parallel

    side, size = 256, 64
    sharp = _face_on_grey(side, (128, 128), size, tmp_path)
    blurred = cv2.GaussianBlur(sharp, (0, 0), 9)
    for name, image in (("sharp", sharp), ("blurred", blurred)):
        cv2.imwrite(str(tmp_path / f"{name}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    found = run_parallel(face.detect_faces, [([str(tmp_path / "sharp.png"), str(tmp_path / "blurred.png")], 0.5)],
                         1, NullProgress())[0]
    assert found[0] and not found[1]  # the blurred face is past the detector

    def crop(image: np.ndarray, centre: tuple[int, int]) -> np.ndarray:
        x, y = centre
        return cv2.resize(image[y - size // 2:y + size // 2, x - size // 2:x + size // 2], (64, 64))

    model = face.skin_model(crop(sharp, (128, 128)))
    assert face.skin_share(crop(sharp, (128, 128)), model) > 0.8
    assert face.skin_share(crop(blurred, (128, 128)), model) > 0.6  # blurred, still the person's skin
    assert face.skin_share(crop(blurred, (128 + size, 128)), model) < 0.1  # beside it: the grey background
    # a grey-on-grey frame (the chroma of no one's skin) and a flat face refuse nothing by accident
    assert face.skin_share(np.full((64, 64, 3), 200, np.uint8), model) < 0.1
    flat = face.skin_model(np.full((64, 64, 3), (200, 150, 120), np.uint8))
    assert face.skin_share(np.full((64, 64, 3), (200, 150, 120), np.uint8), flat) == 1.0
