"""keypoints: MediaPipe Holistic (bundled models, tracking mode) on every frame → one Parquet row per frame.

Coordinates are crop pixels: x, y in [0, resolution), z on the same scale (MediaPipe's convention, relative
depth). `left_hand` is the person's left hand, as MediaPipe names it. A part not found in a frame is null.

Holistic finds each hand through a region predicted from the pose and loses fast-moving hands; where it misses
one, the Hands solution looks again (whole frame, then a zoomed region at the pose's wrist). The
`*_hand_source` columns say which model found each hand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from core.progress import Progress
from core.section import Section
from core.stage import Stage
from tasks.frames import clip_frame_paths, read_meta, read_rgb
from tasks.mp import solutions
from tasks.workers import MEDIAPIPE_JOBS_PER_PROCESS, Reporter, run_parallel


class KeypointsParams(Section):
    model_complexity: Literal[1] = Field(1, description="MediaPipe pose model; 0 and 2 need downloads, so only 1")
    refine_face_landmarks: bool = Field(True, description="478 face points with irises instead of 468")
    min_detection_confidence: float = Field(0.5, ge=0, le=1)
    min_tracking_confidence: float = Field(0.5, ge=0, le=1)
    workers: int = Field(2, ge=1, le=64, description="processes, one clip each at a time")


def describe(s: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.1%}" for k, v in s["detection_rate"].items())


STAGE = Stage(
    "keypoints", flow="onboard", inputs=("ingest",), params=KeypointsParams, resource="cpu", describe=describe,
    outputs=("keypoints.parquet",),
    description="MediaPipe Holistic body 33, hands 2x21, face 478 per frame (Parquet)")

TABLE = "keypoints.parquet"
PARTS = {"body": (33, 4), "left_hand": (21, 3), "right_hand": (21, 3), "face": (478, 3)}
SCHEMA = pa.schema([
    ("clip", pa.string()),
    ("split", pa.string()),
    ("frame", pa.int32()),
    ("index", pa.int32()),
    *[(part, pa.list_(pa.float32())) for part in PARTS],
    ("left_hand_source", pa.string()),
    ("right_hand_source", pa.string()),
])
HANDS = {"left_hand": (13, 15, 19), "right_hand": (14, 16, 20)}  # pose elbow, wrist, index knuckle
ROI = 256  # side of the zoomed wrist region given to the hand model


def _points(landmarks: Any, size: int, with_visibility: bool) -> list[float] | None:
    if landmarks is None:
        return None
    rows = [(lm.x * size, lm.y * size, lm.z * size, lm.visibility) if with_visibility
            else (lm.x * size, lm.y * size, lm.z * size) for lm in landmarks.landmark]
    return np.asarray(rows, np.float32).ravel().tolist()


def _hand_array(landmarks: Any, scale: float, x0: float = 0.0, y0: float = 0.0) -> np.ndarray:
    return np.array([(lm.x * scale + x0, lm.y * scale + y0, lm.z * scale) for lm in landmarks.landmark], np.float32)


class _HandRecovery:
    """Second look for hands Holistic missed, matched to the pose's wrist so left and right cannot swap."""

    def __init__(self, hands_module: Any, size: int) -> None:
        self.size = size
        self.reach = 0.12 * size  # a detection's wrist must lie this close to the pose's wrist
        self.frame = hands_module.Hands(static_image_mode=False, max_num_hands=2, model_complexity=1,
                                        min_detection_confidence=0.3, min_tracking_confidence=0.3)
        self.zoom = hands_module.Hands(static_image_mode=True, max_num_hands=1, model_complexity=1,
                                       min_detection_confidence=0.3)

    def close(self) -> None:
        self.frame.close()
        self.zoom.close()

    def __call__(self, img: np.ndarray, body: np.ndarray, part: str, whole: list[np.ndarray] | None
                 ) -> tuple[np.ndarray | None, str | None, list[np.ndarray]]:
        if whole is None:
            res = self.frame.process(img)
            whole = [_hand_array(lm, self.size) for lm in (res.multi_hand_landmarks or [])]
        elbow, wrist, knuckle = (body[i, :2] for i in HANDS[part])
        near = [h for h in whole if np.linalg.norm(h[0, :2] - wrist) < self.reach]
        if near:
            return min(near, key=lambda h: np.linalg.norm(h[0, :2] - wrist)), "hands", whole
        centre = wrist + (knuckle - wrist) * 0.6
        half = max(0.1 * self.size, 1.2 * float(np.linalg.norm(wrist - elbow)))
        x0, y0 = centre - half
        k = ROI / (2 * half)
        warp = np.array([[k, 0, -x0 * k], [0, k, -y0 * k]], np.float64)
        roi = cv2.warpAffine(img, warp, (ROI, ROI), flags=cv2.INTER_LINEAR)
        res = self.zoom.process(roi)
        if res.multi_hand_landmarks:
            hand = _hand_array(res.multi_hand_landmarks[0], ROI / k, float(x0), float(y0))
            if np.linalg.norm(hand[0, :2] - wrist) < self.reach:
                return hand, "hands_roi", whole
        return None, None, whole


def detect_clip(job: tuple[dict[str, Any], list[str], int, dict[str, Any]], report: Reporter) -> list[dict[str, Any]]:
    """One clip's rows: job = (clip, frame paths, crop side, this stage's params as a dict). Runs in a
    `tasks.workers` process (MediaPipe)."""
    clip, paths, size, p = job
    rows = []
    sol = solutions()
    recover = _HandRecovery(sol.hands, size)
    with sol.holistic.Holistic(
        static_image_mode=False, model_complexity=p["model_complexity"],
        refine_face_landmarks=p["refine_face_landmarks"], min_detection_confidence=p["min_detection_confidence"],
        min_tracking_confidence=p["min_tracking_confidence"],
    ) as holistic:
        for i, path in enumerate(paths):
            img = read_rgb(Path(path))
            res = holistic.process(img)
            row = {
                "clip": clip["name"], "split": clip["split"], "frame": i, "index": clip["start"] + i,
                "body": _points(res.pose_landmarks, size, True),
                "left_hand": _points(res.left_hand_landmarks, size, False),
                "right_hand": _points(res.right_hand_landmarks, size, False),
                "face": _points(res.face_landmarks, size, False),
            }
            whole = None
            for part in HANDS:
                row[f"{part}_source"] = "holistic" if row[part] is not None else None
                if row[part] is None and row["body"] is not None:
                    body = np.asarray(row["body"], np.float32).reshape(33, 4)
                    hand, source, whole = recover(img, body, part, whole)
                    if hand is not None:
                        row[part], row[f"{part}_source"] = hand.ravel().tolist(), source
            rows.append(row)
            report()
    recover.close()
    return rows


def clip_table(job: tuple[dict[str, Any], list[str], int, dict[str, Any]], report: Reporter) -> pa.Table:
    """One clip's rows as an Arrow table: what crosses from the worker is float32 columns (about 7 KB a frame), not
    Python lists of floats (about 50 KB), so a long video's landmarks stay small until they are written."""
    return pa.Table.from_pylist(detect_clip(job, report), schema=SCHEMA)


def detection_rates(table: pa.Table) -> dict[str, float]:
    n = max(1, table.num_rows)
    return {part: round(1 - table.column(part).null_count / n, 4) for part in PARTS}


def run(inputs: dict[str, Path], out: Path, params: KeypointsParams, progress: Progress) -> dict[str, Any]:
    ingest = inputs["ingest"]
    meta = read_meta(ingest)
    jobs = [(clip, [str(p) for p in clip_frame_paths(ingest, clip)], meta["resolution"], params.model_dump())
            for clip in meta["clips"]]
    progress.start("keypoints: MediaPipe Holistic", meta["frames"])
    table = pa.concat_tables(run_parallel(clip_table, jobs, params.workers, progress,
                                          jobs_per_process=MEDIAPIPE_JOBS_PER_PROCESS)).combine_chunks()
    pq.write_table(table, out / TABLE, compression="zstd")
    per_split = {split: detection_rates(table.filter(pa.compute.equal(table["split"], split)))
                 for split in ("train", "test")}
    sources = {part: table.column(f"{part}_source").value_counts().to_pylist() for part in HANDS}
    return {"frames": table.num_rows, "detection_rate": detection_rates(table), "detection_rate_by_split": per_split,
            "face_points": 478 if params.refine_face_landmarks else 468,
            "hand_sources": {part: {str(v["values"]): v["counts"] for v in vc} for part, vc in sources.items()}}


def load(keypoints_dir: Path) -> pa.Table:
    return pq.read_table(keypoints_dir / TABLE)
