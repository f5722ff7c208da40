"""The training commands and the evaluation flow: finetune, held-out render, metrics, the report DVC reads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from core.artifacts import read_manifest
from core.workspace import Workspace
from tasks.registry import artifact_dir
from tests.conftest import FEW, ONBOARDED_ID, anchor, cli, copy_workspace, set_param

pytestmark = pytest.mark.slow
ID = ONBOARDED_ID


@pytest.fixture
def ws(tmp_path: Path, trained: Path) -> Workspace:
    """A private copy of the trained identity for each test: none depends on what another one left."""
    return Workspace(copy_workspace(trained, tmp_path / "ws"))


def _dvc(ws: Workspace, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=ws.root, capture_output=True, text=True)


def test_training_commands_run_the_flows(ws: Workspace) -> None:
    # the template's finetune was made under the same cache key: taken as it is, not trained again
    cached = cli(ws.root, "finetune", ID, "--no-evaluate")
    assert cached.returncode == 0 and f"finetune[{ID}]: cached" in cached.stdout, cached.stdout + cached.stderr
    set_param(ws.root, "finetune", "steps", {**FEW["steps"], "tiny": 3})
    done = anchor(ws.root, "finetune", ID, "--no-evaluate")  # the evaluation it would run: the next test
    assert done.returncode == 0, done.stderr
    assert f"finetune[{ID}]: ran" in done.stdout and "body: 3 steps (from 0)" in done.stdout
    assert "render_body[" not in done.stdout and "report: " not in done.stdout
    assert f"{ID} model v2 (new" in done.stdout and f"git tag {ID}-v2" in done.stdout
    again = anchor(ws.root, "finetune", ID, "--no-evaluate")
    assert again.returncode == 0 and f"finetune[{ID}]: cached" in again.stdout, again.stdout + again.stderr
    bad = anchor(ws.root, "finetune", "Not A Name")
    assert bad.returncode != 0 and "invalid identity name" in bad.stderr


def test_finetune_evaluates_and_writes_a_self_contained_report_that_dvc_reads(ws: Workspace) -> None:
    import re

    import cv2

    first = anchor(ws.root, "finetune", ID)  # the model is cached; then the evaluation protocol runs
    assert first.returncode == 0, first.stderr
    assert f"finetune[{ID}]: cached" in first.stdout, first.stdout
    # the held-out clips rendered, scored, reported
    for stage in ("render_body", "face", "hands", "assemble", "metrics"):
        assert f"{stage}[{ID}/" in first.stdout, first.stdout
    assert "fid not computed" in first.stdout
    report = ws.root / "data" / "reports" / ID
    assert f"report: {report / 'report.html'}" in first.stdout
    page = (report / "report.html").read_text()
    # self-contained: every image is embedded, nothing is fetched
    assert not re.search(r"(src|href)=\"(https?:|//)", page) and "<link" not in page and "<script" not in page
    test_clips = [c for c in json.loads((artifact_dir(ws, "ingest", ID) / "meta.json").read_text())["clips"]
                  if c["split"] == "test"]
    rows = sum(min(3, c["frames"]) for c in test_clips)
    # … | nearest training frame; then four held-out frames of the real and the speech-driven mesh
    assert page.count('src="data:image/jpeg;base64,') == 5 * rows + 2 * 4
    assert "<svg" in page and "35.91" in page and "53.38" in page and "OpenPose" in page
    assert "not computed: no Inception weights" in page and "not computed: no I3D weights" in page
    assert "pictures are noise" in page  # the tiny profile says so
    # the held-out clips side by side, embedded: real | mesh | generated | nearest, every frame, with the audio
    import base64

    import av

    videos = re.findall(r'<video controls preload="metadata" style="width:100%" src="data:video/mp4;base64,([^"]+)"',
                        page)
    assert len(videos) == 1
    (ws.root / "side.mp4").write_bytes(base64.b64decode(videos[0]))
    with av.open(str(ws.root / "side.mp4")) as container:
        assert [s.type for s in container.streams] == ["video", "audio"]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    side = json.loads((artifact_dir(ws, "finetune", ID) / "body" / "model_index.json").read_text())["output_resolution"]
    assert len(frames) == 19 and frames[0].shape == (side, 4 * side, 3)
    assert (next(ws.root.glob(f"data/renders/{ID}/*/metrics/side_by_side.mp4"))).read_bytes() == \
        base64.b64decode(videos[0])
    # its own held-out motion is inside its own framing; the face stage's check is counted, every shown face once
    assert re.search(r"head or shoulders outside the training frames' framing in\s+0\.0 %", page), page
    check = read_manifest(next(ws.root.glob(f"data/renders/{ID}/*/face")))["summary"]["face_check"]
    assert sum(check[k] for k in ("agreed", "aligned", "skipped", "no_face_found")) == 19
    assert re.search(rf"{check['agreed']} crops agreed with the face the body drew, {check['aligned']}\s+moved onto "
                     rf"it, {check['skipped']} left alone, {check['no_face_found']} without a\s+face found "
                     rf"\({check['no_face_redone']} redone where the identity's skin was, {check['no_face_left']} "
                     rf"left as the body drew them\)", page)
    sheet = cv2.imread(str(report / "contact_sheet.png"))
    assert sheet.shape == (22 + rows * (22 + 192), 5 * 192, 3)
    assert "nearest training frame" in page and "SSIM in the person" in page
    # the hand stage's counts, as its summary says them
    from tasks.stages import hands
    done = read_manifest(next(ws.root.glob(f"data/renders/{ID}/*/hands")))["summary"]
    assert done["redone"] > 0 and f"<tr><th>hands</th><td>{hands.describe(done)}</td></tr>" in page
    # time per stage from the manifests of the artifacts shown: the identity's ten and the evaluation render's seven
    assert read_manifest(report)["summary"]["stages_timed"] == 17
    times = page[page.index("Time per stage"):]
    for stage in ("source", "smplx_fit", "pretrain", "finetune", "render_body", "metrics"):
        assert f"<tr><td>{stage}</td>" in times
    scored = json.loads((report / "metrics.json").read_text())
    assert scored["fid"] is None and scored["fvd"] is None and scored["frames"] == 19
    assert scored["render_fps"] > 0 and f"Rendered at {scored['render_fps']} frames/s" in page
    metrics_file = json.loads(next(ws.root.glob(f"data/renders/{ID}/*/metrics/metrics.json")).read_text())
    real_hands = [metrics_file["detection_rate_real"][h] for h in ("left_hand", "right_hand")]
    assert scored["hand_rate_ratio"] == metrics_file["hand_rate_ratio"]
    assert (scored["hand_rate_ratio"] is None) == (not any(real_hands))
    # the evaluation render scored against its own motion too, as every render is: its figures reach the report
    followed = read_manifest(next(ws.root.glob(f"data/renders/{ID}/*/follow")))["summary"]
    assert scored["follow"] == {k: followed[k] for k in ("follow_lmd_body_pct", "follow_lmd_hand_pct", "hands_found",
                                                         "follow_mouth_corr")}
    assert "from where the motion's joints project" in page and followed["frames"] == 8  # follow.max_frames
    # the held-out audio through the speech model, against the real held-out motion
    spoken = page[page.index("Speech-driven motion"):page.index("Time per stage")]
    assert "jaw correlation" in spoken and spoken.count("<svg") == 1
    from tasks import registry, runner
    from tasks.stages import motion as motion_task
    from tasks.stages import speech as speech_task

    fit, ingest = artifact_dir(ws, "smplx_fit", ID), artifact_dir(ws, "ingest", ID)
    real, audio = speech_task.held_out_audio(ingest, fit)
    expected = speech_task.compare(artifact_dir(ws, "speech", ID), real, audio,
                                   motion_task.reference(fit, runner.body_model_path(ws)).joints,
                                   registry.params(ws).render_body.seed)
    for key in ("jaw_corr", "jaw_corr_loudness", "beat_consistency", "beat_consistency_real", "seam_jerk_ratio"):
        assert scored["speech"][key] == expected[key], key
    assert f"<td class=\"n\">{expected['jaw_corr']}</td>" in spoken
    assert scored["flicker"] > 0 and set(scored["detection_rate"]) == {"body", "left_hand", "right_hand", "face"}
    fit = (report / "plots" / "fit_error_body_pct.csv").read_text().splitlines()
    assert fit[0] == "frame,body_pct" and len(fit) > 20
    assert sorted(p.name for p in (report / "plots").iterdir()) == [
        "fit_error_body_pct.csv", "fit_error_face_pct.csv", "fit_error_hands_pct.csv", "lmd_body_px.csv",
        "lmd_face_px.csv"]

    again = anchor(ws.root, "evaluate", ID)
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

    # a second evaluation (scored on 10 of the 19 frames: the render is taken as it is, only metrics and the report
    # run again): `dvc metrics diff` compares the two
    subprocess.run(["git", "add", "dvc.lock", "dvc.yaml", "params.yaml", "identities.yaml"], cwd=ws.root,
                   check=True, capture_output=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "--allow-empty", "-qm", "v1"],
                   cwd=ws.root, check=True, capture_output=True)
    params = yaml.safe_load((ws.root / "params.yaml").read_text())
    params["metrics"]["max_frames"] = 10
    (ws.root / "params.yaml").write_text(yaml.safe_dump(params))
    second = anchor(ws.root, "evaluate", ID)
    assert second.returncode == 0, second.stderr
    for stage in ("render_body", "face", "hands", "assemble"):
        assert re.search(rf"{stage}\[{ID}/\w+\]: cached", second.stdout), second.stdout
    diff = json.loads(_dvc(ws, "metrics", "diff", "--json").stdout)
    changed = diff[metrics_file]
    assert changed["flicker"]["old"] == scored["flicker"] and changed["flicker"]["new"] != scored["flicker"]


def test_report_is_made_by_evaluate_not_stage_run(ws: Workspace) -> None:
    done = anchor(ws.root, "stage", "run", "report", ID)
    assert done.returncode != 0 and f"report is made by `anchor evaluate {ID}`" in done.stderr
