"""The metrics stage on renders of a trained tiny identity: what it computes, and says it cannot."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from core.artifacts import read_manifest
from core.workspace import Workspace, render_subject
from tasks import runner
from tasks.frames import read_rgb
from tasks.registry import artifact_dir
from tasks.stages import metrics
from tasks.stages import motion as motion_task
from tests.conftest import ONBOARDED_ID, copy_workspace, held_out, render, set_param

slow = pytest.mark.slow  # on a trained (or onboarded) identity; the unit tests below are not
ID = ONBOARDED_ID


def _inception_weights(path: Path) -> Path:
    """A small random FID Inception network saved as the metrics stage loads one, its batch-norm statistics taken
    from a batch of random images (left at their defaults, a random network's features shrink to ~1e-7 and every
    FID rounds to 0)."""
    import torch

    from models import fid

    torch.manual_seed(0)
    net = fid.InceptionV3Pool(width=0.125)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    with torch.no_grad():
        net.train()(torch.rand(8, 3, 64, 64))
    torch.save(net.eval().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory, trained: Path) -> Workspace:
    return Workspace(copy_workspace(trained, tmp_path_factory.mktemp("ws") / "ws"))


@slow
def test_metrics_of_a_held_out_render_without_weights_say_why(ws: Workspace, tmp_path: Path) -> None:


    import torch

    blocks, _ = held_out(ws)
    subject = render(ws, blocks, kind="held_out")
    # without FID/FVD weights the stage runs no model and claims no GPU: asked for CUDA on a machine without one,
    # it still runs (a claim would stop it: "no CUDA device")
    set_param(ws.root, "execution", "device", "cpu" if torch.cuda.is_available() else "cuda")
    try:
        result = runner.execute(ws, "metrics", subject)
    finally:
        set_param(ws.root, "execution", "device", "auto")
    art = artifact_dir(ws, "metrics", subject)
    data = json.loads((art / "metrics.json").read_text())
    assert data["fid"] == {"value": None, "note": data["fid"]["note"]}
    assert data["fid"]["note"].startswith("not computed: no Inception weights")
    assert data["fvd"]["note"].startswith("not computed: no I3D weights")
    assert "OpenPose" in data["detector"] and "0.1 of the frame side" in data["hand_outlier_rule"]
    assert set(data["detection_rate_generated"]) == {"body", "face", "left_hand", "right_hand"}
    assert len((art / "lmd_per_frame.csv").read_text().splitlines()) == 1 + 19
    assert result.summary["ground_truth"] is True
    # the tiny profile's pictures are noise: they flicker where the real frames hardly change, and the nearest
    # real training frame (the person, in another pose) is far closer to the held-out frames, scored the same way
    assert data["flicker"]["value"] > 2 * data["flicker"]["change_real"] > 0
    assert data["ssim_person"]["frames"] == 19
    assert data["ssim_person"]["value"] < 0.5 < data["baseline_ssim_person"]["value"] < 1
    # around the hands too (the held-out frames show both in every frame): noise there, the nearest frame's hand
    # closer to the real one
    assert data["detection_rate_real"]["left_hand"] == data["detection_rate_real"]["right_hand"] == 1.0
    assert data["hand_ssim"]["crops"] == data["baseline_hand_ssim"]["crops"] == 2 * 19
    assert data["hand_ssim"]["value"] < data["baseline_hand_ssim"]["value"] < 1
    assert data["face_ssim"]["frames"] == data["baseline_face_ssim"]["frames"] == 19  # and around the face
    assert data["face_ssim"]["value"] < data["baseline_face_ssim"]["value"] < 1
    assert data["baseline_detection_rate"]["body"] == 1.0 and data["baseline_lmd_body"]["value"] < 5
    assert set(data["baseline_detection_rate"]) == {"body", "face", "left_hand", "right_hand"}
    rows = list(csv.DictReader((art / "nearest.csv").read_text().splitlines()))
    assert [int(r["frame"]) for r in rows] == list(range(19))
    ingest = artifact_dir(ws, "ingest", ID)
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
    weights = _inception_weights(tmp_path / "inception.pth")
    scored = runner.execute(ws, "metrics", subject, overrides={"inception_weights": str(weights)})
    assert scored.summary["fid"] > 1.0  # noise against the person (the real frames against themselves: ~0, below)
    assert any(i.get("param") == "metrics.inception_weights" for i in read_manifest(art)["inputs"])


@slow
def test_metrics_of_a_foreign_motion_are_not_computed(ws: Workspace, tmp_path: Path) -> None:
    blocks, _ = held_out(ws)
    key, staged = motion_task.stage(ws.state / "motions", {k: v[:6] for k, v in blocks.items()},
                                    {"kind": "file"}, None)
    subject = render_subject(ID, key)
    runner.execute(ws, "motion", subject, external=staged)
    for stage in ("render_body", "face", "hands", "metrics"):
        runner.execute(ws, stage, subject)
    data = json.loads((artifact_dir(ws, "metrics", subject) / "metrics.json").read_text())
    assert all(data[k]["note"].startswith("not computed: no ground truth") for k in ("fid", "fvd", "lmd_body"))


@slow
def test_the_real_frames_scored_as_if_generated_are_perfect_and_out_of_order_they_are_not(
        ws: Workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The held-out frames themselves in place of a render: the same detector sees the same landmarks (LMD ≈ 0),
    SSIM inside the person is 1, there is no flicker and FID is 0. A metric that is off by a frame, a scale or an
    axis fails. The same frames played backwards (the right person, the wrong pose at each moment) score worse on
    every count."""

    from tasks.stages import hands, metrics

    blocks, _ = held_out(ws)
    subject = render(ws, blocks, kind="held_out")
    real = metrics.real_frames(artifact_dir(ws, "ingest", ID), len(blocks["transl"]))
    weights = _inception_weights(tmp_path / "inception.pth")

    def score(frames: list, outlier: float) -> dict:
        monkeypatch.setattr(hands, "final_frames", lambda body, face_dir, hands_dir, n: frames[:n])
        runner.execute(ws, "metrics", subject, overrides={"hand_outlier": outlier,  # a cache key of its own
                                                          "inception_weights": str(weights)})
        return json.loads((artifact_dir(ws, "metrics", subject) / "metrics.json").read_text())

    data = score(real, 0.11)
    assert data["lmd_body"]["value"] < 0.5 and data["lmd_face"]["value"] < 0.5, (data["lmd_body"], data["lmd_face"])
    assert data["lmd_body"]["frames"] == 19
    assert data["ssim_person"]["value"] == pytest.approx(1.0, abs=1e-9)
    assert data["flicker"]["value"] == 0.0 and data["flicker"]["change_real"] > 0
    assert data["fid"]["value"] == pytest.approx(0.0, abs=1e-3)
    # the same hands found as in the real frames (both, in every frame): the ratio is 1, every hand square SSIM 1
    assert data["hand_rate_ratio"] == 1.0
    assert data["hand_ssim"]["value"] == pytest.approx(1.0, abs=1e-9) and data["hand_ssim"]["crops"] == 38
    assert data["face_ssim"]["value"] == pytest.approx(1.0, abs=1e-9) and data["face_ssim"]["frames"] == 19

    backwards = score(real[::-1], 0.12)
    assert backwards["lmd_body"]["value"] > 4 * max(data["lmd_body"]["value"], 0.1)
    assert backwards["lmd_face"]["value"] > data["lmd_face"]["value"]
    assert backwards["ssim_person"]["value"] < 0.95
    assert backwards["hand_ssim"]["value"] < 0.95
    assert backwards["face_ssim"]["value"] < 0.95
    assert backwards["flicker"]["value"] > 0.5 * backwards["flicker"]["change_real"]


@slow
def test_a_long_hold_out_is_scored_on_evenly_spaced_frames_and_says_so(ws: Workspace) -> None:
    blocks, _ = held_out(ws)
    subject = render(ws, blocks, kind="held_out")
    runner.execute(ws, "metrics", subject, overrides={"max_frames": 5})
    art = artifact_dir(ws, "metrics", subject)
    data = json.loads((art / "metrics.json").read_text())
    assert data["frames"] == 19 and data["sampled"].startswith("5 of 19 frames evenly spaced")
    assert data["ssim_person"]["frames"] == 5 and data["lmd_body"].get("frames", 0) <= 5
    rows = list(csv.DictReader((art / "lmd_per_frame.csv").read_text().splitlines()))
    assert [int(r["frame"]) for r in rows] == [0, 4, 9, 14, 18]
    assert sorted(p.name for p in (art / "nearest").iterdir()) == [f"{t:06d}.png" for t in (0, 4, 9, 14, 18)]
    # the side-by-side video holds the scored frames only, and so no audio (it would run out of step)
    import av

    with av.open(str(art / metrics.SIDE_BY_SIDE)) as container:
        assert [s.type for s in container.streams] == ["video"]
        assert sum(1 for _ in container.decode(video=0)) == 5


def test_hand_rate_ratio_is_the_lower_hand_over_the_real_rate() -> None:
    real = {"body": 1.0, "face": 1.0, "left_hand": 1.0, "right_hand": 0.8}
    assert metrics.hand_rate_ratio({"left_hand": 0.5, "right_hand": 0.8}, real) == 0.5
    assert metrics.hand_rate_ratio({"left_hand": 1.0, "right_hand": 0.4}, real) == 0.5
    # a hand the real frames never show does not count; neither shown: no ratio
    assert metrics.hand_rate_ratio({"left_hand": 0.9, "right_hand": 0.0}, {**real, "right_hand": 0.0}) == 0.9
    assert metrics.hand_rate_ratio({"left_hand": 0.3, "right_hand": 0.3}, {"left_hand": 0.0, "right_hand": 0.0}) \
        is None
    # more hands than the truth is no better than as many: capped at 1
    assert metrics.hand_rate_ratio({"left_hand": 1.0, "right_hand": 1.0}, {"left_hand": 0.5, "right_hand": 0.4}) == 1.0
    assert metrics.hand_rate_ratio({"left_hand": 1.0, "right_hand": 0.2}, {"left_hand": 0.5, "right_hand": 0.4}) == 0.5
