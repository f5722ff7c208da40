"""The follow stage: a render scored against the motion it was asked to follow, where no ground truth exists."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from core.artifacts import read_manifest
from core.progress import NullProgress
from core.workspace import Workspace
from tasks import runner
from tasks.registry import artifact_dir
from tasks.stages import follow, metrics
from tasks.stages import motion as motion_task
from tasks.stages.keypoints import KeypointsParams
from tests.conftest import ONBOARDED_ID, copy_workspace, render

ID = ONBOARDED_ID


def _score(ws: Workspace, frames: list[Path], blocks: dict[str, np.ndarray]) -> dict:
    figures, _, _ = follow.score(frames, blocks, artifact_dir(ws, "smplx_fit", ID), runner.body_model_path(ws),
                                 KeypointsParams().model_dump(), 0.1, 1, NullProgress())
    return figures


@pytest.mark.slow
def test_the_real_frames_follow_their_own_fit_and_played_backwards_they_do_not(onboarded: Path) -> None:
    """The held-out clip's own frames against its own fitted motion: the landmarks MediaPipe finds are where the
    motion's joints project (as far off as the fit itself is), and the lips part as the fitted jaw opens. A
    projection off by an axis, a scale, a camera or a hand swapped fails the first; the same frames backwards (the
    right person, the wrong pose at each moment) must score worse on every count."""
    ws = Workspace(onboarded)
    fit, ingest = artifact_dir(ws, "smplx_fit", ID), artifact_dir(ws, "ingest", ID)
    blocks, _ = motion_task.held_out(fit, ingest)
    frames = metrics.real_frames(ingest, len(blocks["transl"]))
    forward = _score(ws, frames, blocks)
    backward = _score(ws, frames[::-1], blocks)
    fit_error = read_manifest(fit)["summary"]["error_p90_pct"]  # the fit's own error: 90% of its points closer
    assert forward["frames"] == 19
    assert forward["follow_lmd_body_pct"] < fit_error["body"], (forward, fit_error)
    assert forward["follow_lmd_hand_pct"] < fit_error["hands"], (forward, fit_error)
    assert forward["hands_found"] > 0.5
    assert forward["face_found"] == 1.0 and forward["follow_mouth_corr"] > 0.6  # measured: 0.87
    # backwards (a seated body moves little in 0.6 s; the hands and the mouth do)
    assert backward["follow_lmd_body_pct"] > 1.4 * forward["follow_lmd_body_pct"]  # measured: 1.56 → 2.76
    assert backward["follow_lmd_hand_pct"] > 3 * forward["follow_lmd_hand_pct"]  # 0.86 → 6.87
    assert backward["follow_mouth_corr"] < forward["follow_mouth_corr"] - 0.5  # 0.87 → -0.55


def test_the_mouth_opening_is_the_lip_gap_over_the_eye_corners_distance() -> None:
    face = np.zeros((478, 3))
    face[follow.EYE_R, :2], face[follow.EYE_L, :2] = (40, 50), (90, 50)
    rows = []
    for gap in (0.0, 5.0, 10.0):
        f = face.copy()
        f[follow.UPPER_LIP, :2], f[follow.LOWER_LIP, :2] = (65, 80), (65, 80 + gap)
        rows.append({"face": f.ravel().tolist()})
    rows.append({"face": None})
    opening = follow.mouth_opening(rows)
    np.testing.assert_allclose(opening[:3], [0.0, 0.1, 0.2])
    assert np.isnan(opening[3])


def test_hands_found_counts_only_frames_where_the_motion_holds_the_hand_inside_the_frame() -> None:
    inside, outside = [10.0, 10.0] * 21, [-5.0, 10.0] * 21
    expected = [{"left_hand": inside, "right_hand": outside}, {"left_hand": inside, "right_hand": inside},
                {"left_hand": outside, "right_hand": outside}]
    generated = [{"left_hand": [1.0] * 63, "right_hand": None}, {"left_hand": None, "right_hand": [1.0] * 63},
                 {"left_hand": [1.0] * 63, "right_hand": [1.0] * 63}]
    assert follow.hands_found(generated, expected, 64) == 0.6667  # 2 of the 3 hands held inside
    assert follow.hands_found(generated, expected[2:], 64) is None


@pytest.mark.slow
def test_a_render_without_ground_truth_is_scored_on_evenly_spaced_frames_into_its_files_and_summary(
        trained: Path, tmp_path: Path) -> None:
    """A render of an imported motion (no real frames to compare with): the follow stage scores `follow.max_frames`
    of its frames, spread over it, and its figures reach follow.json, the per-frame table and the stage summary."""
    ws = Workspace(copy_workspace(trained, tmp_path / "ws", {"follow": {"max_frames": 6}}))
    blocks, _ = motion_task.held_out(artifact_dir(ws, "smplx_fit", ID), artifact_dir(ws, "ingest", ID))
    subject = render(ws, blocks, kind="imported")
    runner.execute(ws, "follow", subject)
    art = artifact_dir(ws, "follow", subject)
    data = json.loads((art / follow.RESULT).read_text())
    summary = read_manifest(art)["summary"]
    assert data["frames"] == summary["frames"] == 6 and summary["render_frames"] == 19
    for key in ("follow_lmd_body_pct", "follow_lmd_hand_pct", "hands_found", "follow_mouth_corr", "face_found"):
        assert summary[key] == data[key]
    with open(art / follow.PER_FRAME) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["frame"]) for r in rows] == metrics.sample(19, 6)
    jaw = blocks["jaw_pose"][metrics.sample(19, 6), 0]
    assert [float(r["jaw_angle"]) for r in rows] == pytest.approx(jaw, abs=1e-5)
