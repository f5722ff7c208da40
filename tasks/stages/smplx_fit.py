"""smplx_fit: SMPL-X parameters for every frame, fitted to the keypoints of all clips in one optimisation.

One shape and one camera for the identity, everything else per frame. The manifest's summary is the fit report:
reprojection error per part (median and 90th percentile, pixels and % of the crop) and the jitter of the fitted
points against the raw detections'.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import Field

from core.errors import StageError
from core.progress import Progress
from core.section import Section
from core.stage import Stage
from tasks import smplx_table
from tasks.frames import read_meta
from tasks.stages import keypoints

if TYPE_CHECKING:
    from models import fitting


class SmplxFitParams(Section):
    focal_ratio: float = Field(1.5, gt=0.2, le=20, description="camera focal length as a multiple of the crop side "
                               "(one camera per identity)")
    iterations: int = Field(400, ge=1, le=20000, description="optimiser steps over the whole sequence")
    lr: float = Field(0.03, gt=0, le=1)
    smoothness: float = Field(60.0, ge=0, description="weight of the second differences of projected points")
    hand_smoothness: float = Field(0.5, ge=0, description="share of `smoothness` for hand points (fingers move "
                                   "fast)")
    pose_prior: float = Field(2e-3, ge=0)
    hand_prior: float = Field(2e-3, ge=0)
    shape_prior: float = Field(1e-3, ge=0)
    expression_prior: float = Field(1e-3, ge=0)
    min_visibility: float = Field(0.3, ge=0, le=1, description="body keypoints below this MediaPipe visibility "
                                  "are ignored")
    threads: int = Field(1, ge=1, le=256, description="torch CPU threads; more is faster on an idle machine but "
                         "stalls badly when other work shares the cores")
    chunk_frames: int = Field(300, ge=8, le=100_000, description="frames per forward/backward pass of the fit; the "
                              "gradient is summed over passes, so memory stays flat however long the video")
    seed: int = Field(0, ge=0)


def describe(s: dict[str, Any]) -> str:
    errs = ", ".join(f"{k} {v:.1f}%" for k, v in (s.get("error_pct") or {}).items() if v is not None)
    return f"median error {errs}; jitter x{s.get('jitter_ratio')} of detections"


ERRORS = "fit_error.csv"  # per frame, for the report's plot (DVC plots format: one row per frame)

STAGE = Stage(
    "smplx_fit", flow="onboard", inputs=("ingest", "keypoints"), params=SmplxFitParams, resource="cpu",
    body_model=True, describe=describe, outputs=(smplx_table.TABLE, smplx_table.IDENTITY, ERRORS),
    description="SMPL-X fitted to the keypoints of every clip at once: one shape, one camera")


def _stack(column: list[Any], shape: tuple[int, int]) -> np.ndarray:
    empty = np.full(shape, np.nan, np.float32)
    return np.stack([np.asarray(v, np.float32).reshape(shape) if v is not None else empty for v in column])


def report(projected: np.ndarray, targets: fitting.Targets, segs: list[tuple[int, int]], size: int
           ) -> dict[str, Any]:
    from models import fitting

    ok = targets.conf > 0
    err = np.linalg.norm(projected - targets.xy, axis=-1)
    out: dict[str, Any] = {"error_px": {}, "error_pct": {}, "error_p90_px": {}, "error_p90_pct": {}}
    for k, part in enumerate(fitting.PARTS):
        e = err[:, targets.part == k][ok[:, targets.part == k]]
        med = float(np.median(e)) if len(e) else None
        p90 = float(np.percentile(e, 90)) if len(e) else None
        out["error_px"][part] = None if med is None else round(med, 3)
        out["error_p90_px"][part] = None if p90 is None else round(p90, 3)
        out["error_pct"][part] = None if med is None else round(100 * med / size, 3)
        out["error_p90_pct"][part] = None if p90 is None else round(100 * p90 / size, 3)
    jf, jd = fitting.jitter(projected, ok, segs), fitting.jitter(targets.xy, ok, segs)
    out["jitter_fit_px"], out["jitter_detections_px"] = round(jf, 4), round(jd, 4)
    out["jitter_ratio"] = round(jf / jd, 4) if jd > 0 else None
    return out



def write_errors(path: Path, projected: np.ndarray, targets: fitting.Targets, keys: dict[str, np.ndarray],
                 size: int) -> None:
    """Median reprojection error per part and frame, % of the crop; empty where a part was not detected."""
    from models import fitting

    ok = targets.conf > 0
    err = np.linalg.norm(projected - targets.xy, axis=-1)
    columns = {}
    for k, part in enumerate(fitting.PARTS):
        sel = targets.part == k
        e = np.where(ok[:, sel], err[:, sel], np.nan)
        with np.errstate(all="ignore"):
            columns[part] = np.nanmedian(np.where(np.isnan(e).all(1, keepdims=True), 0, e), axis=1) * 100 / size
        columns[part][~ok[:, sel].any(1)] = np.nan
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "clip", "frame", *(f"{p}_pct" for p in fitting.PARTS)])
        for i in range(len(err)):
            writer.writerow([i, keys["clip"][i], int(keys["frame"][i]),
                             *("" if np.isnan(columns[p][i]) else round(float(columns[p][i]), 4)
                               for p in fitting.PARTS)])


def run(inputs: dict[str, Path], out: Path, params: SmplxFitParams, progress: Progress) -> dict[str, Any]:
    import torch

    from models import body, fitting

    meta = read_meta(inputs["ingest"])
    size = int(meta["resolution"])
    tab = keypoints.load(inputs["keypoints"]).to_pandas()
    order = {c["name"]: i for i, c in enumerate(meta["clips"])}
    tab = tab.sort_values(["clip", "frame"], key=lambda s: s.map(order) if s.name == "clip" else s,
                          kind="stable").reset_index(drop=True)
    if tab.empty:
        raise StageError("smplx_fit: the keypoints table is empty")
    targets = fitting.targets_from_keypoints(
        _stack(tab["body"].tolist(), (33, 4)), _stack(tab["left_hand"].tolist(), (21, 3)),
        _stack(tab["right_hand"].tolist(), (21, 3)), _stack(tab["face"].tolist(), (478, 3)),
        min_visibility=params.min_visibility)
    if not (targets.conf > 0).any():
        raise StageError("smplx_fit: no body, hand or face keypoints in any frame; nothing to fit")
    segs = [(a, b) for a, b, _ in smplx_table.segments(tab["clip"].to_numpy())]

    torch.set_num_threads(params.threads)
    model = body.load(inputs["body_model"])
    sparse = body.SparseBody(model)
    cfg = fitting.FitConfig(focal=params.focal_ratio * size, size=size, iterations=params.iterations, lr=params.lr,
                            w_smooth=params.smoothness, hand_smooth=params.hand_smoothness,
                            w_pose=params.pose_prior, w_hand=params.hand_prior,
                            w_shape=params.shape_prior, w_expr=params.expression_prior, seed=params.seed,
                            chunk=params.chunk_frames)
    total = cfg.iterations + max(cfg.iterations // 4, 1)
    progress.start(f"fitting SMPL-X to {len(tab)} frames", total)
    last = [0]

    def tick(done: int, _total: int) -> None:
        progress.advance(done - last[0])
        last[0] = done

    t0 = time.perf_counter()
    result = fitting.fit(sparse, targets, segs, cfg, body.hands_mean(inputs["body_model"]), tick)
    seconds = time.perf_counter() - t0

    keys = {"clip": tab["clip"].to_numpy(), "split": tab["split"].to_numpy(), "frame": tab["frame"].to_numpy()}
    t = len(tab)
    smplx_table.write(out / smplx_table.TABLE, keys, {k: result[k] for k in smplx_table.BLOCKS})
    focal = cfg.focal
    smplx_table.write_identity(out / smplx_table.IDENTITY, {
        "betas": [round(float(b), 6) for b in result["betas"][0]],
        "camera": {"focal": focal, "cx": size / 2, "cy": size / 2, "size": size},
        "fps": meta.get("fps", 30),
        "axes": "OpenCV camera coordinates: x right, y down, z forward; camera at the origin",
    })
    summary = report(result["projected"], targets, segs, size)
    write_errors(out / ERRORS, result["projected"], targets, keys, size)
    summary.update({"frames": t, "clips": len(segs), "fit_seconds": round(seconds, 3),
                    "fit_fps": round(t / seconds, 2) if seconds > 0 else None,
                    "betas": [round(float(b), 4) for b in result["betas"][0]], "focal_px": focal})
    return summary
