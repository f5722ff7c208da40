"""follow: every render scored against its own motion — did the picture do what the motion asked?

Most renders have no ground truth (an imported motion, speech, another person's video), but every render has the
motion it was asked to follow. MediaPipe Holistic (the keypoints stage's detector and settings) runs on the final
frames, and what it finds is compared with the motion itself: the motion's SMPL-X joints projected with the
identity's camera (the points the fit matched to MediaPipe's, `models.fitting.BODY_MAP` and `HAND_MAP`) give the
body and hand landmark distances, as % of the frame side (`follow_lmd_body_pct`, `follow_lmd_hand_pct`, the
formulas of the metrics stage); the share of frames where a hand the motion holds inside the frame is found
(`hands_found`); and the mouth opening measured on the frames (inner lips apart over the eye corners' distance)
correlated with the motion's jaw (`follow_mouth_corr`). A long render is scored on `follow.max_frames` frames spread
evenly over it.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from pydantic import Field

from core.progress import Progress
from core.section import Section
from core.stage import Stage
from tasks import smplx_table
from tasks.stages import hands, metrics

RESULT = "follow.json"
PER_FRAME = "follow_per_frame.csv"
UPPER_LIP, LOWER_LIP, EYE_R, EYE_L = 13, 14, 33, 263  # MediaPipe face mesh: inner lips, outer eye corners
CHUNK = 64  # frames posed at a time


class FollowParams(Section):
    """How every render is scored against its own motion."""

    max_frames: int = Field(300, ge=2, le=1_000_000, description="most frames of a render scored, evenly spaced")
    workers: int = Field(1, ge=1, le=64, description="MediaPipe processes")


def describe(s: dict[str, Any]) -> str:
    def fmt(key: str, unit: str = "") -> str:
        v = s.get(key)
        return "—" if v is None else f"{v:.3g}{unit}"

    return (f"{s['frames']} frames scored against the motion: body {fmt('follow_lmd_body_pct', '%')}, hands "
            f"{fmt('follow_lmd_hand_pct', '%')}, hands found {fmt('hands_found')}, mouth "
            f"{fmt('follow_mouth_corr')}")


STAGE = Stage(
    "follow", flow="render", scope="render", inputs=("motion", "render_body", "face", "hands", "smplx_fit"),
    params=FollowParams, reads=("keypoints", "metrics"), body_model=True, resource="cpu", in_dvc=False,
    describe=describe, outputs=(RESULT, PER_FRAME),
    description="the render against its own motion: landmark distance body/hands, hands found, mouth vs jaw")


def motion_landmarks(body_model: Path, fit_dir: Path, blocks: dict[str, np.ndarray], side: int
                     ) -> list[dict[str, Any]]:
    """The motion's body and hand points where MediaPipe would put them, in pixels of a `side` crop (the identity's
    camera), as keypoint rows (NaN where MediaPipe has a point the body model has no counterpart for)."""
    import torch

    from models import body, fitting

    ident = smplx_table.read_identity(fit_dir / smplx_table.IDENTITY)
    cam = ident["camera"]
    focal = cam["focal"] * side / cam["size"]
    sparse = body.SparseBody(body.load(body_model))
    betas = torch.tensor(ident["betas"], dtype=torch.float32)[None]
    n = len(blocks["transl"])
    maps = {"body": (fitting.BODY_MAP, 33), "left_hand": (fitting.HAND_MAP["left_hand"], 21),
            "right_hand": (fitting.HAND_MAP["right_hand"], 21)}
    rows: list[dict[str, Any]] = []
    for a in range(0, n, CHUNK):
        part = {k: torch.from_numpy(np.asarray(v[a:a + CHUNK], np.float32)) for k, v in blocks.items()}
        with torch.no_grad():
            out = sparse(betas, part["expression"], body.full_pose(part), part["transl"])
            uv = body.project(out.points, focal, (side / 2, side / 2)).numpy().astype(np.float64)
        for t in range(len(uv)):
            row: dict[str, Any] = {"face": None}  # the face is compared by its mouth alone (mouth_opening)
            for name, (mapping, k) in maps.items():
                pts = np.full((k, 2), np.nan)
                for mp, point, _ in mapping:
                    pts[mp] = uv[t, point]
                row[name] = pts.ravel().tolist()
            rows.append(row)
    return rows


def mouth_opening(rows: list[dict[str, Any]]) -> np.ndarray:
    """Per row: the inner lips' distance over the outer eye corners' (NaN where no face was found)."""
    out = np.full(len(rows), np.nan)
    for t, row in enumerate(rows):
        if row.get("face") is None:
            continue
        pts = np.asarray(row["face"], np.float64).reshape(-1, 3)[:, :2]
        eyes = np.linalg.norm(pts[EYE_L] - pts[EYE_R])
        if eyes > 0:
            out[t] = np.linalg.norm(pts[LOWER_LIP] - pts[UPPER_LIP]) / eyes
    return out


def hands_found(generated: list[dict[str, Any]], expected: list[dict[str, Any]], side: int) -> float | None:
    """Of the frames where the motion holds a hand inside the frame, the share where MediaPipe finds that hand."""
    asked = found = 0
    for part in ("left_hand", "right_hand"):
        wrist = metrics.in_frame(metrics.points_of(expected, part, 21), side)[:, 0]
        inside = np.isfinite(wrist).all(-1)
        asked += int(inside.sum())
        found += sum(1 for t in np.flatnonzero(inside) if generated[t][part] is not None)
    return round(found / asked, 4) if asked else None


def _corr(a: np.ndarray, b: np.ndarray) -> float | None:
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or a[ok].std() == 0 or b[ok].std() == 0:
        return None
    return round(float(np.corrcoef(a[ok], b[ok])[0, 1]), 4)


def score(frames: list[Path], blocks: dict[str, np.ndarray], fit_dir: Path, body_model: Path,
          detector: dict[str, Any], hand_outlier: float, workers: int, progress: Progress
          ) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """Frames against the motion they were asked to follow (one SMPL-X row each): (figures, the landmark scores as
    the metrics stage gives them, per-frame rows)."""
    from models.speech import jaw_angle

    side = int(smplx_table.read_identity(fit_dir / smplx_table.IDENTITY)["camera"]["size"])  # the fit's crop
    generated = metrics.detect_landmarks(frames, side, detector, workers, progress, "follow: landmarks on the render")
    expected = motion_landmarks(body_model, fit_dir, blocks, side)
    lmd, per_frame = metrics.landmark_scores(generated, expected, side, hand_outlier)
    del lmd["lmd_face"]  # the motion has no face points in MediaPipe's mesh: the face is judged by its mouth
    opening, jaw = mouth_opening(generated), jaw_angle(blocks["jaw_pose"])
    for row, o, j in zip(per_frame, opening, jaw, strict=True):
        row.update({"mouth_opening": "" if np.isnan(o) else round(float(o), 5), "jaw_angle": round(float(j), 5)})
    figures = {"frames": len(frames), "follow_lmd_body_pct": lmd["lmd_body"].get("pct"),
               "follow_lmd_hand_pct": lmd["lmd_hand"].get("pct"), "hands_found": hands_found(generated, expected, side),
               "face_found": round(float(np.isfinite(opening).mean()), 4), "follow_mouth_corr": _corr(opening, jaw)}
    return figures, lmd, per_frame


def run(inputs: dict[str, Path], out: Path, params: FollowParams, progress: Progress, *,
        settings: SimpleNamespace) -> dict[str, Any]:
    _, blocks = smplx_table.read(inputs["motion"] / smplx_table.TABLE)
    n = len(blocks["transl"])
    picks = metrics.sample(n, params.max_frames)
    frames = hands.final_frames(inputs["render_body"], inputs["face"], inputs["hands"], n)
    figures, lmd, per_frame = score([frames[t] for t in picks], {k: v[picks] for k, v in blocks.items()},
                                    inputs["smplx_fit"], inputs["body_model"], settings.keypoints.model_dump(),
                                    settings.metrics.hand_outlier, params.workers, progress)
    summary = {**figures, "render_frames": n}
    (out / RESULT).write_text(json.dumps({**summary, "landmarks": lmd, "detector": "MediaPipe Holistic, the "
                                          "keypoints stage's settings"}, indent=2, sort_keys=True) + "\n")
    with open(out / PER_FRAME, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["frame", "lmd_body_px", "mouth_opening", "jaw_angle"])
        for t, row in zip(picks, per_frame, strict=True):
            writer.writerow([t, row.get("lmd_body_px", ""), row["mouth_opening"], row["jaw_angle"]])
    return summary
