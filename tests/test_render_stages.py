"""Rendering on the tiny profile, on a really trained (briefly) identity: motion → render_body → face → assemble,
through the runner, the Prefect flow and the command line. Tiny pictures are noise; these tests pin the plumbing:
lengths, caching, seeds, faces that come and go, audio, and what the manifests record."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
import wave
from pathlib import Path

import av
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from scipy.spatial.transform import Rotation

from core.artifacts import read_manifest
from core.errors import InputError, StageError
from core.workspace import SHARED, Workspace, render_subject
from tasks import motion as motion_task
from tasks import runner, smplx_table
from tasks.frames import read_rgb
from tests.conftest import ONBOARDED_ID, ROOT, copy_workspace

pytestmark = pytest.mark.slow
ID = ONBOARDED_ID
FEW = {"steps": {"tiny": 2, "cpu": 1, "sd15": 1}, "face_steps": {"tiny": 2, "cpu": 1, "sd15": 1}}
FAST = {"render_body": {"steps": 3}, "face": {"steps": 3}, "assemble": {"preset": "veryfast"}}


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory, onboarded: Path) -> Workspace:
    w = Workspace(copy_workspace(onboarded, tmp_path_factory.mktemp("render") / "ws",
                                 {"pretrain": FEW, "finetune": FEW, **FAST}))
    runner.execute(w, "pretrain", SHARED)
    runner.execute(w, "finetune", ID)
    return w


def _held_out(ws: Workspace) -> tuple[dict[str, np.ndarray], float]:
    return motion_task.held_out(ws.artifact_dir("smplx_fit", ID), ws.artifact_dir("ingest", ID))


def _render(ws: Workspace, blocks: dict[str, np.ndarray], audio: Path | None = None,
            overrides: dict[str, dict] | None = None, kind: str = "test") -> str:
    key, staged = motion_task.stage(ws.state / "motions", blocks, {"kind": kind}, audio)
    subject = render_subject(ID, key)
    runner.execute(ws, "motion", subject, external=staged)
    for stage in ("render_body", "face", "assemble"):
        runner.execute(ws, stage, subject, overrides=(overrides or {}).get(stage))
    return subject


def _video_frames(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def test_held_out_render_has_the_motions_length_and_records_what_shaped_it(ws: Workspace) -> None:
    blocks, _ = _held_out(ws)
    n = len(blocks["transl"])
    meta = json.loads((ws.artifact_dir("ingest", ID) / "meta.json").read_text())
    assert n == sum(c["frames"] for c in meta["clips"] if c["split"] == "test") == 19
    subject = _render(ws, blocks)
    art = ws.artifact_dir("assemble", subject)
    assert art == ws.root / "data" / "renders" / ID / subject.split("/")[1] / "assemble"
    frames = _video_frames(art / "video.mp4")
    assert len(frames) == n and frames[0].shape == (64, 64, 3)  # the tiny checkpoint's resolution
    with av.open(str(art / "video.mp4")) as c:
        assert c.streams.video[0].codec_context.name == "h264" and c.streams.video[0].average_rate == 30
        assert not c.streams.audio  # the cut test clip has no sound
    record = json.loads((art / "render.json").read_text())
    fine = read_manifest(ws.artifact_dir("finetune", ID))["output_hash"]
    assert record["model_version"] == fine
    assert record["motion"]["hash"] == read_manifest(ws.artifact_dir("motion", subject))["output_hash"]
    assert record["params"]["render_body"]["steps"] == 3 and record["params"]["render_body"]["window"] == 16
    assert record["params"]["face"]["enabled"] is True and record["frames"] == n
    body = read_manifest(ws.artifact_dir("render_body", subject))
    assert body["summary"]["frame_evals_per_step"] == 32 and body["summary"]["windows"] == 2  # 19 frames: 0, 3
    owners = {(i.get("stage"), i.get("identity")) for i in body["inputs"] if "stage" in i}
    assert owners == {("motion", subject), ("finetune", ID), ("smplx_fit", ID), ("ingest", ID)}
    # the conditions the body model saw are kept beside its frames, one per motion frame
    assert len(list((ws.artifact_dir("render_body", subject) / "cond").glob("*.png"))) == n


def test_same_seed_same_frames_other_seed_other_frames(ws: Workspace) -> None:
    blocks, _ = _held_out(ws)
    subject = _render(ws, blocks)
    first = read_manifest(ws.artifact_dir("render_body", subject))["output_hash"]
    again = runner.execute(ws, "render_body", subject)  # recomputed from scratch by the runner
    assert again.output_hash == first
    other = runner.execute(ws, "render_body", subject, overrides={"seed": 1})
    assert other.output_hash != first
    shared = runner.execute(ws, "render_body", subject, overrides={"noise": "shared"})
    assert shared.output_hash not in (first, other.output_hash)
    with pytest.raises(StageError, match="invalid override"):
        runner.execute(ws, "render_body", subject, overrides={"overlap": 16})


def test_faces_that_leave_the_view_pass_through_and_nothing_crashes(ws: Workspace) -> None:
    blocks, _ = _held_out(ws)
    blocks = {k: v.copy() for k, v in blocks.items()}
    away = slice(5, 9)
    turn = Rotation.from_euler("y", 180, degrees=True)
    blocks["global_orient"][away] = (turn * Rotation.from_rotvec(blocks["global_orient"][away])).as_rotvec()
    blocks["transl"][12:14, 0] += 5.0  # far out of view to the side
    subject = _render(ws, blocks)
    face_dir = ws.artifact_dir("face", subject)
    table = pq.read_table(face_dir / "faces.parquet").to_pandas()
    reasons = dict(zip(table["frame"], table["reason"], strict=True))
    assert {reasons[i] for i in range(5, 9)} == {"turned_away"}
    assert {reasons[i] for i in (12, 13)} == {"out_of_view"}
    redone = sorted(int(p.stem) for p in (face_dir / "frames").glob("*.png"))
    assert redone == [int(f) for f, v in zip(table["frame"], table["visible"], strict=True) if v]
    assert redone == [0, 1, 2, 3, 4, 9, 10, 11, 14, 15, 16, 17, 18]
    summary = read_manifest(face_dir)["summary"]
    assert summary["runs"] == 3 and summary["missing"] == {"turned_away": 4, "out_of_view": 2}
    assert len(_video_frames(ws.artifact_dir("assemble", subject) / "video.mp4")) == 19


def test_no_face_leaves_every_body_frame(ws: Workspace) -> None:
    blocks, _ = _held_out(ws)
    subject = _render(ws, blocks, overrides={"face": {"enabled": False}})
    assert not list((ws.artifact_dir("face", subject) / "frames").glob("*"))
    assert read_manifest(ws.artifact_dir("assemble", subject))["summary"]["faces_enhanced"] == 0


def test_driving_audio_is_muxed_with_the_motions_duration(ws: Workspace, tmp_path: Path) -> None:
    wav = tmp_path / "tone.wav"
    rate, seconds = 16000, 2.0
    t = np.arange(int(rate * seconds)) / rate
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2").tobytes())
    blocks, _ = _held_out(ws)
    blocks = {k: v[:12] for k, v in blocks.items()}
    subject = _render(ws, blocks, audio=wav)
    video = ws.artifact_dir("assemble", subject) / "video.mp4"
    with av.open(str(video)) as c:
        assert len(c.streams.audio) == 1
        audio = c.streams.audio[0]
        samples = sum(f.samples for f in c.decode(audio))
        assert audio.rate == rate
    assert abs(samples / rate - 12 / 30) < 0.07  # the cut is 0.4 s; AAC frames round it up a little
    assert len(_video_frames(video)) == 12


def test_render_stages_refuse_an_identity_owner(ws: Workspace) -> None:
    with pytest.raises(StageError, match="belongs to a render"):
        runner.execute(ws, "render_body", ID)
    with pytest.raises(InputError, match="--frames 500: the motion has only 19"):
        motion_task.stage(ws.state / "motions", _held_out(ws)[0], {}, None, frames=500)


def _cli(ws: Workspace, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli.main", "-w", str(ws.root), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)


def test_anchor_render_command_caches_and_copies_the_video_out(ws: Workspace, tmp_path: Path) -> None:
    out = tmp_path / "out" / "demo.mp4"
    first = _cli(ws, "render", ID, "--motion", f"{ID}:test", "--out", str(out), "--frames", "8")
    assert first.returncode == 0, first.stderr
    assert f"video: {out}" in first.stdout and "assemble" in first.stdout
    assert len(_video_frames(out)) == 8
    second = _cli(ws, "render", ID, "--motion", f"{ID}:test", "--out", str(out), "--frames", "8")
    assert second.returncode == 0, second.stderr
    for stage in ("motion", "render_body", "face", "assemble"):
        assert f"{stage}: cached" in second.stdout, second.stdout
    assert any(out.read_bytes() == p.read_bytes() for p in ws.root.glob("data/renders/demo/*/assemble/video.mp4"))
    # errors name what is wrong, before any work
    missing = _cli(ws, "render", ID, "--motion", str(tmp_path / "nope.npz"))
    assert missing.returncode != 0 and "no such file" in missing.stderr
    stranger = _cli(ws, "render", "nobody", "--motion", "nobody:test")
    assert stranger.returncode != 0 and "has no finetune yet" in stranger.stderr


def test_motion_specs_resolve_to_staged_motions(ws: Workspace, tmp_path: Path) -> None:
    import shutil

    from flows.render import stage_motion

    own, _ = _held_out(ws)
    key, staged = stage_motion(ws, None, ID, f"{ID}:test", None)  # type: ignore[arg-type]
    _, blocks = smplx_table.read(staged / smplx_table.TABLE)
    assert all(np.array_equal(blocks[k], own[k]) for k in own)  # its own fit, not retargeted
    assert motion_task.read_info(staged)["kind"] == "held_out"
    assert stage_motion(ws, None, ID, f"{ID}:test", None)[0] == key  # content-addressed: same motion, same key
    assert stage_motion(ws, None, ID, f"{ID}:test", 5)[0] != key

    # another identity's held-out clips (a copy of this one's artifacts under a second name) are retargeted
    for stage in ("ingest", "smplx_fit"):
        shutil.copytree(ws.artifact_dir(stage, ID), ws.artifact_dir(stage, "other"))
    _, other = stage_motion(ws, None, ID, "other:test", None)  # type: ignore[arg-type]
    info = motion_task.read_info(other)
    assert info["kind"] == "other_identity" and info["frames"] == 19
    _, moved = smplx_table.read(other / smplx_table.TABLE)
    assert np.allclose(moved["body_pose"], own["body_pose"], atol=1e-5)  # the same person: the pose carries over

    # a motion file (this project's own fit format)
    path = tmp_path / "dance.parquet"
    motion_task.write(path, own)
    _, staged_file = stage_motion(ws, None, ID, str(path), None)  # type: ignore[arg-type]
    assert motion_task.read_info(staged_file)["kind"] == "file"
    with pytest.raises(InputError, match="no such file"):
        stage_motion(ws, None, ID, str(tmp_path / "missing.npz"), None)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="has no smplx_fit yet"):
        stage_motion(ws, None, ID, "nobody:test", None)  # type: ignore[arg-type]


def test_training_commands_run_the_flows(ws: Workspace) -> None:
    done = _cli(ws, "finetune", ID)
    assert done.returncode == 0, done.stderr
    assert f"finetune[{ID}]: ran" in done.stdout and "body: 2 steps (from 0)" in done.stdout
    # then the evaluation protocol: the held-out clips rendered, scored, reported
    for stage in ("render_body", "face", "assemble", "metrics"):
        assert f"{stage}[{ID}/" in done.stdout, done.stdout
    assert f"report: {ws.root / 'data/reports' / ID / 'report.html'}" in done.stdout
    assert "fid not computed" in done.stdout
    assert f"{ID} model v1 (new" in done.stdout and f"git tag {ID}-v1" in done.stdout
    again = _cli(ws, "finetune", ID)
    assert again.returncode == 0 and f"finetune[{ID}]: cached" in again.stdout, again.stdout + again.stderr
    bad = _cli(ws, "finetune", "Not A Name")
    assert bad.returncode != 0 and "invalid identity name" in bad.stderr


def test_metrics_of_a_held_out_render_without_weights_say_why(ws: Workspace, tmp_path: Path) -> None:
    import torch

    from models import fid

    blocks, _ = _held_out(ws)
    subject = _render(ws, blocks, kind="held_out")
    result = runner.execute(ws, "metrics", subject)
    art = ws.artifact_dir("metrics", subject)
    data = json.loads((art / "metrics.json").read_text())
    assert data["fid"] == {"value": None, "note": data["fid"]["note"]}
    assert data["fid"]["note"].startswith("not computed: no Inception weights")
    assert data["fvd"]["note"].startswith("not computed: no I3D weights")
    assert "OpenPose" in data["detector"] and "0.1 of the frame side" in data["hand_outlier_rule"]
    for part in ("face", "body", "hand"):
        row = data[f"lmd_{part}"]
        assert (row["value"] is None and row["note"].startswith("not computed")) or row["value"] >= 0
    assert set(data["detection_rate_generated"]) == {"body", "face", "left_hand", "right_hand"}
    assert data["flicker"]["value"] >= 0 and data["flicker"]["change_real"] > 0
    assert len((art / "lmd_per_frame.csv").read_text().splitlines()) == 1 + 19
    assert result.summary["ground_truth"] is True
    # SSIM inside the person and the nearest-training-frame baseline, scored the same way
    assert -1 <= data["ssim_person"]["value"] <= 1 and data["ssim_person"]["frames"] == 19
    assert -1 <= data["baseline_ssim_person"]["value"] <= 1
    assert data["baseline_lmd_body"]["value"] >= 0 and set(data["baseline_detection_rate"]) == {
        "body", "face", "left_hand", "right_hand"}
    rows = list(csv.DictReader((art / "nearest.csv").read_text().splitlines()))
    assert [int(r["frame"]) for r in rows] == list(range(19))
    ingest = ws.artifact_dir("ingest", ID)
    train_clips = {c["name"] for c in json.loads((ingest / "meta.json").read_text())["clips"]
                   if c["split"] == "train"}
    assert {r["train_clip"] for r in rows} <= train_clips
    side = read_rgb(art / "nearest" / "000000.png").shape[0]
    for r in rows[:3]:  # each baseline frame is the named training frame, at the render's size
        copied = read_rgb(art / "nearest" / f"{int(r['frame']):06d}.png")
        source = read_rgb(ingest / "frames" / r["train_clip"] / f"{int(r['train_frame']):06d}.jpg", side)
        assert np.array_equal(copied, source)
    assert sorted(p.name for p in (art / "nearest").iterdir()) == [f"{t:06d}.png" for t in range(19)]

    # with a (small, random) Inception network saved to disk, FID is a number from the same loading code
    weights = tmp_path / "inception.pth"
    torch.manual_seed(0)
    torch.save(fid.InceptionV3Pool(width=0.125).state_dict(), weights)
    scored = runner.execute(ws, "metrics", subject, overrides={"inception_weights": str(weights)})
    assert scored.summary["fid"] is not None and scored.summary["fid"] >= 0
    assert any(i.get("param") == "metrics.inception_weights" for i in read_manifest(art)["inputs"])


def test_metrics_of_a_foreign_motion_are_not_computed(ws: Workspace, tmp_path: Path) -> None:
    blocks, _ = _held_out(ws)
    key, staged = motion_task.stage(ws.state / "motions", {k: v[:6] for k, v in blocks.items()},
                                    {"kind": "file"}, None)
    subject = render_subject(ID, key)
    runner.execute(ws, "motion", subject, external=staged)
    for stage in ("render_body", "face", "metrics"):
        runner.execute(ws, stage, subject)
    data = json.loads((ws.artifact_dir("metrics", subject) / "metrics.json").read_text())
    assert all(data[k]["note"].startswith("not computed: no ground truth") for k in ("fid", "fvd", "lmd_body"))


def _dvc(ws: Workspace, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=ws.root, capture_output=True, text=True)


def test_evaluate_writes_a_self_contained_report_that_dvc_reads(ws: Workspace) -> None:
    import re

    import cv2

    first = _cli(ws, "evaluate", ID)
    assert first.returncode == 0, first.stderr
    report = ws.root / "data" / "reports" / ID
    assert f"report: {report / 'report.html'}" in first.stdout
    page = (report / "report.html").read_text()
    # self-contained: every image is embedded, nothing is fetched
    assert not re.search(r"(src|href)=\"(https?:|//)", page) and "<link" not in page and "<script" not in page
    test_clips = [c for c in json.loads((ws.artifact_dir("ingest", ID) / "meta.json").read_text())["clips"]
                  if c["split"] == "test"]
    rows = sum(min(3, c["frames"]) for c in test_clips)
    assert page.count('src="data:image/jpeg;base64,') == 5 * rows  # … | nearest training frame
    assert "<svg" in page and "35.91" in page and "53.38" in page and "OpenPose" in page
    assert "not computed: no Inception weights" in page and "not computed: no I3D weights" in page
    assert "pictures are noise" in page  # the tiny profile says so
    sheet = cv2.imread(str(report / "contact_sheet.png"))
    assert sheet.shape == (22 + rows * (22 + 192), 5 * 192, 3)
    assert "nearest training frame" in page and "SSIM in the person" in page
    # time per stage from the ledger: the rows of the runs that made these artifacts. The fixture built the
    # identity without flows (no ledger rows); `anchor finetune` above ran finetune and the evaluation render.
    assert read_manifest(report)["summary"]["stages_timed"] == 6  # finetune, motion, render_body, face, ...
    assert page.count("not in this workspace&#39;s ledger") == 8  # source … render_mesh, pretrain
    scored = json.loads((report / "metrics.json").read_text())
    assert scored["fid"] is None and scored["fvd"] is None and scored["frames"] == 19
    assert scored["flicker"] > 0 and set(scored["detection_rate"]) == {"body", "left_hand", "right_hand", "face"}
    fit = (report / "plots" / "fit_error_body_pct.csv").read_text().splitlines()
    assert fit[0] == "frame,body_pct" and len(fit) > 20
    assert sorted(p.name for p in (report / "plots").iterdir()) == [
        "fit_error_body_pct.csv", "fit_error_face_pct.csv", "fit_error_hands_pct.csv", "lmd_body_px.csv",
        "lmd_face_px.csv"]

    again = _cli(ws, "evaluate", ID)
    assert again.returncode == 0 and f"report[{ID}]: cached" in again.stdout, again.stdout + again.stderr
    # recorded in DVC: up to date, and `dvc metrics show` / `dvc plots show` read it
    status = _dvc(ws, "status", f"report@{ID}")
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout + status.stderr
    shown = json.loads(_dvc(ws, "metrics", "show", "--json").stdout)
    metrics_file = f"data/reports/{ID}/metrics.json"
    workspace = next(iter(shown.values()))  # keyed "" before the first git commit, "workspace" after
    assert workspace["data"][metrics_file]["data"]["flicker"] == scored["flicker"]
    plots = json.loads(_dvc(ws, "plots", "show", "--json").stdout)["data"]
    assert f"data/reports/{ID}/contact_sheet.png" in plots and f"data/reports/{ID}/plots/lmd_face_px.csv" in plots

    # a second version of the identity (another render seed): `dvc metrics diff` compares the two
    subprocess.run(["git", "add", "dvc.lock", "dvc.yaml", "params.yaml", "identities.yaml"], cwd=ws.root,
                   check=True, capture_output=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "--allow-empty", "-qm", "v1"],
                   cwd=ws.root, check=True, capture_output=True)
    params = yaml.safe_load((ws.root / "params.yaml").read_text())
    params["render_body"]["seed"] = 7
    (ws.root / "params.yaml").write_text(yaml.safe_dump(params))
    try:
        second = _cli(ws, "evaluate", ID)
        assert second.returncode == 0, second.stderr
        diff = json.loads(_dvc(ws, "metrics", "diff", "--json").stdout)
        changed = diff[metrics_file]
        assert changed["flicker"]["old"] == scored["flicker"] and changed["flicker"]["new"] != scored["flicker"]
    finally:
        params["render_body"]["seed"] = 0
        (ws.root / "params.yaml").write_text(yaml.safe_dump(params))


def test_report_is_made_by_evaluate_not_stage_run(ws: Workspace) -> None:
    done = _cli(ws, "stage", "run", "report", ID)
    assert done.returncode != 0 and f"report is made by `anchor evaluate {ID}`" in done.stderr


def test_audit_names_a_flipped_byte_with_its_artifact_and_stage(ws: Workspace) -> None:
    clean = _cli(ws, "audit", ID)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "0 problem(s)" in clean.stdout
    frame = next((ws.artifact_dir("ingest", ID) / "frames").rglob("*.jpg"))
    original = frame.read_bytes()
    frame.write_bytes(original[:100] + bytes([original[100] ^ 1]) + original[101:])
    try:
        found = _cli(ws, "audit", ID, "--json")
        assert found.returncode == 1, found.stdout + found.stderr
        findings = json.loads(found.stdout)["findings"]
        where = f"data/identities/{ID}/ingest"
        assert {(f["path"], f["stage"], f["owner"], f["check"]) for f in findings} == {
            (where, "ingest", ID, "manifest"), (where, "ingest", ID, "dvc.lock")}
        shown = _cli(ws, "audit")  # every identity
        assert shown.returncode == 1 and f"{where}: content differs from its manifest" in shown.stderr
    finally:
        frame.write_bytes(original)
    assert _cli(ws, "audit", ID).returncode == 0


def test_lineage_of_a_copy_outside_the_workspace_is_found_by_content(ws: Workspace, tmp_path: Path) -> None:
    out = tmp_path / "delivery" / "spot.mp4"
    done = _cli(ws, "render", ID, "--motion", f"{ID}:test", "--frames", "8", "--out", str(out))
    assert done.returncode == 0, done.stderr
    traced = _cli(ws, "lineage", str(out), "--json")
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
    refused = _cli(ws, "lineage", str(stranger))
    assert refused.returncode != 0 and "no render there made a file with its content" in refused.stderr


def test_each_new_model_is_a_version_and_older_renders_go_stale(ws: Workspace) -> None:
    def status() -> dict:
        done = _cli(ws, "status", ID, "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)[0]

    def finetune_steps(n: int) -> subprocess.CompletedProcess[str]:
        params = yaml.safe_load((ws.root / "params.yaml").read_text())
        params["finetune"]["steps"]["tiny"] = n
        (ws.root / "params.yaml").write_text(yaml.safe_dump(params))
        return _cli(ws, "finetune", ID, "--no-evaluate")

    first = status()
    assert first["current_version"] == 1 and [v["version"] for v in first["versions"]] == [1]
    # renders made by v1 with today's render params are current (a --seed/--no-face choice is not staleness)
    assert any(not r["stale"] and r["model_version"] == 1 and r["why"] == [] for r in first["renders"])
    tags = subprocess.run(["git", "tag"], cwd=ws.root, capture_output=True, text=True).stdout.split()
    assert f"{ID}-v1" in tags

    newer = finetune_steps(3)
    assert newer.returncode == 0 and f"{ID} model v2 (new" in newer.stdout, newer.stdout + newer.stderr
    second = status()
    assert second["current_version"] == 2
    # every earlier render is stale now; those v1 made say so (others were made before versioning, by hash)
    assert all(r["stale"] and any(w.startswith("made by model ") and w.endswith(", now v2") for w in r["why"])
               for r in second["renders"])
    by_v1 = [r for r in second["renders"] if r["model_version"] == 1]
    assert by_v1 and all("made by model v1, now v2" in r["why"] for r in by_v1)
    assert f"{ID}-v2" in subprocess.run(["git", "tag"], cwd=ws.root, capture_output=True, text=True).stdout
    lock_v2 = subprocess.run(["git", "show", f"{ID}-v2:dvc.lock"], cwd=ws.root, capture_output=True, text=True)
    assert second["current_model"] not in subprocess.run(["git", "show", f"{ID}-v1:versions.yaml"], cwd=ws.root,
                                                         capture_output=True, text=True).stdout
    assert lock_v2.returncode == 0 and f"finetune@{ID}" in lock_v2.stdout

    back = finetune_steps(2)  # the old params again: the same weights, so the same version, nothing new
    assert back.returncode == 0 and f"{ID} model v1 (unchanged" in back.stdout, back.stdout + back.stderr
    assert status()["current_version"] == 1


def _set_param(root: Path, section: str, key: str, value: object) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params[section][key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params))


@pytest.mark.usefixtures("prefect_harness")
def test_a_scheduled_rerender_served_and_triggered_through_prefect_redoes_exactly_the_stale_renders(
        ws: Workspace, tmp_path: Path) -> None:
    import os
    import shutil
    import signal

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    w = Workspace(copy_workspace(ws.root, tmp_path / "ws"))
    shutil.rmtree(w.data / "renders")
    blocks, _ = _held_out(w)
    short = {k: v[:6] for k, v in blocks.items()}
    seeded = {"render_body": {"seed": 5}, "face": {"seed": 5}}
    stale = _render(w, short, kind="old", overrides=seeded)  # made with crf 18 and a --seed of its own
    _set_param(w.root, "assemble", "crf", 30)
    fresh = _render(w, short, kind="new")  # made with today's params: current
    before = {s: {st: read_manifest(w.artifact_dir(st, s)) for st in ("render_body", "face", "assemble")}
              for s in (stale, fresh)}

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    made = subprocess.run([sys.executable, "-m", "cli.main", "-w", str(w.root), "schedule", "rerender", "--cron",
                           "0 3 * * *"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    assert yaml.safe_load((w.root / "schedules.yaml").read_text())["rerender"]["cron"] == "0 3 * * *"
    from flows.rerender import deployment_name

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(f"rerender/{deployment_name(w)}")
        assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
        assert deployment.parameters == {"workspace": str(w.root), "identity": None}
        serving = subprocess.Popen([sys.executable, "-m", "cli.main", "-w", str(w.root), "serve"], cwd=ROOT, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            run = client.create_flow_run_from_deployment(deployment.id)  # "run now", as the UI's button does
            deadline = time.monotonic() + 600
            while not (state := client.read_flow_run(run.id).state).is_final():
                assert serving.poll() is None, serving.communicate()[1][-2000:]
                assert time.monotonic() < deadline, "the triggered run never finished"
                time.sleep(1.0)
        finally:
            os.killpg(serving.pid, signal.SIGTERM)
            serving.communicate(timeout=60)
    assert state.is_completed(), state.message

    after = {s: {st: read_manifest(w.artifact_dir(st, s)) for st in ("render_body", "face", "assemble")}
             for s in (stale, fresh)}
    assert after[fresh] == before[fresh]  # current: not touched
    for stage in ("render_body", "face", "assemble"):  # stale: made again, under today's params
        assert after[stale][stage]["finished_at"] > before[stale][stage]["finished_at"]
    assert after[stale]["assemble"]["params"]["crf"] == 30
    # with the --seed it was made with, not today's default
    assert after[stale]["render_body"]["params"]["seed"] == after[stale]["face"]["params"]["seed"] == 5
    from flows.versions import renders

    assert not any(r["stale"] for r in renders(w, ID))


def test_pulling_an_old_version_reproduces_its_video_byte_for_byte(ws: Workspace, tmp_path: Path) -> None:
    import shutil

    from flows.versions import current_model, versions

    def render(out: Path) -> bytes:
        done = _cli(ws, "render", ID, "--motion", f"{ID}:test", "--frames", "6", "--seed", "11", "--out", str(out))
        assert done.returncode == 0, done.stderr
        return out.read_bytes()

    table = versions(ws)[ID]
    assert current_model(ws, ID) == table[0]["finetune"]  # v1 (the version test went back to it)
    first = render(tmp_path / "v1.mp4")
    assert _cli(ws, "push", ID).returncode == 0
    _set_param(ws.root, "finetune", "steps", {**FEW["steps"], "tiny": 3})
    assert _cli(ws, "finetune", ID, "--no-evaluate").returncode == 0
    assert current_model(ws, ID) == table[1]["finetune"]  # v2 again
    assert _cli(ws, "push", ID).returncode == 0

    checkout = subprocess.run(["git", "checkout", f"{ID}-v1", "--", "dvc.lock"], cwd=ws.root, capture_output=True,
                              text=True)
    assert checkout.returncode == 0, checkout.stderr
    pulled = _cli(ws, "pull", ID)
    assert pulled.returncode == 0, pulled.stderr
    assert current_model(ws, ID) == table[0]["finetune"]
    shutil.rmtree(ws.data / "renders" / ID)  # nothing cached: the render is made again from the pulled weights
    assert render(tmp_path / "v1-again.mp4") == first
