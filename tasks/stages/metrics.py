"""metrics: a render scored against the real frames of the same motion (paper Table I).

Ground truth exists when the render follows the identity's own held-out clips: the real frames are the ingest
crops of those clips, their landmarks the keypoints stage's. For any other motion every row says why it was not
computed. FID and FVD run the standard networks from local weight files named in params.yaml; without them the
row says "not computed: …", never a number. LMD uses MediaPipe Holistic (the paper used OpenPose) on the generated
frames, compared with the real frames' landmarks in crop pixels, over the real landmarks inside the frame: outside
it MediaPipe guesses (the legs below a seated anchor's crop), there is nothing in the picture to compare, and the
paper's OpenPose reports no point there; how many were left out is reported. Flicker compares frame-to-frame
change; SSIM is taken inside the real frame's person matte, where a model has to get the person right, and in a
square around each hand the real frame shows (`squares.hand_box`), where fingers are drawn or not.

A model must beat copying: the baseline replaces every held-out frame by the training frame whose body and hand
keypoints are nearest, and is scored by the same detector and the same formulas (`baseline_*` rows); its frames
are kept in nearest/ for the report's grid.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pydantic import Field

from core.artifacts import read_manifest
from core.progress import Progress
from core.section import Section
from core.stage import Stage
from models import scores, squares
from tasks.devices import Compute
from tasks.frames import clip_frame_paths, frame_name, read_meta, read_rgb, write_png
from tasks.stages import hands, keypoints, motion, render_body
from tasks.workers import run_parallel

RESULT = "metrics.json"
PER_FRAME = "lmd_per_frame.csv"
NEAREST = "nearest"  # the baseline's frames, one PNG per render frame
NEAREST_TABLE = "nearest.csv"  # which training frame each one copies, and both SSIMs per frame
SIDE_BY_SIDE = "side_by_side.mp4"  # real | mesh condition | generated | nearest training frame, with the audio
PANELS = ("real", "mesh condition", "generated", "nearest training frame")
SCORES = ("fid", "fvd", "lmd_face", "lmd_body", "lmd_hand", "flicker", "ssim_person", "hand_ssim", "face_ssim",
          "baseline_lmd_body", "baseline_ssim_person", "baseline_hand_ssim", "baseline_face_ssim")
FACE_MARGIN = 1.1  # the face's square: the real face landmarks' longer extent times this
HANDS = ("left_hand", "right_hand")
PARTS = {"face": ("face", 478), "body": ("body", 33), "hand": (("left_hand", "right_hand"), 21)}


class MetricsParams(Section):
    """Scores of a render against the real frames of the same motion (paper Table I)."""

    inception_weights: str | None = Field(None, description="local FID Inception-v3 weights (pytorch-fid's "
                                          "pt_inception-2015-12-05-6726825d.pth); empty = FID not computed")
    i3d_weights: str | None = Field(None, description="local TorchScript I3D for FVD (i3d_torchscript.pt); empty = "
                                    "FVD not computed")
    hand_outlier: float = Field(0.1, gt=0, le=1, description="a hand whose mean landmark distance exceeds this "
                                "share of the frame side counts as a detector failure and is left out of LMD hand")
    workers: int = Field(1, ge=1, le=64, description="MediaPipe processes")
    max_frames: int = Field(1800, ge=2, le=1_000_000, description="most held-out frames scored; a longer hold-out "
                            "is scored on this many frames evenly spaced over it (and as many clips for FVD), said in "
                            "the report")


def describe(s: dict[str, Any]) -> str:
    if not s.get("ground_truth"):
        return "no ground truth for this motion"
    return ", ".join(f"{k} {v:.4g}" for k, v in s.items() if isinstance(v, int | float) and not isinstance(v, bool))


STAGE = Stage(
    "metrics", flow="evaluate", scope="render",
    inputs=("motion", "render_body", "face", "hands", "ingest", "keypoints", "matting"), params=MetricsParams,
    weights=("inception_weights", "i3d_weights"), resource="cpu", device="part", in_dvc=False, describe=describe,
    outputs=(RESULT, f"{PER_FRAME}?", f"{NEAREST}/?", f"{NEAREST_TABLE}?", f"{SIDE_BY_SIDE}?"),
    description="FID, FVD, landmark distance face/body/hand, flicker against the real frames")


def real_frames(ingest: Path, n: int) -> list[Path]:
    clips = sorted((c for c in read_meta(ingest)["clips"] if c["split"] == "test"), key=lambda c: c["start"])
    return [p for c in clips for p in clip_frame_paths(ingest, c)][:n]


def sample(n: int, most: int) -> list[int]:
    """All of range(n), or `most` of it evenly spaced (first and last included)."""
    if n <= most:
        return list(range(n))
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, most)})


def points_of(rows: list[Any], part: str, k: int) -> np.ndarray:
    """(T, k, 2) from keypoint rows (flat lists, 3 or 4 values per point), NaN where the part was not found."""
    out = np.full((len(rows), k, 2), np.nan)
    for t, row in enumerate(rows):
        value = row[part] if isinstance(row, dict) else row
        if value is not None:
            arr = np.asarray(value, np.float64)
            out[t] = arr.reshape(k, -1)[:, :2]
    return out


def in_frame(points: np.ndarray, side: int) -> np.ndarray:
    """`points` with those outside the frame [0, side)² set to NaN: there is nothing in the picture to compare."""
    with np.errstate(invalid="ignore"):
        outside = ((points < 0) | (points >= side)).any(-1)
    return np.where(outside[..., None], np.nan, points)


def _found(points: np.ndarray) -> int:
    return int(np.isfinite(points).all(-1).sum())


def _real_landmarks(keypoints_dir: Path, ingest: Path, picks: list[int]) -> list[dict[str, Any]]:
    """The keypoints stage's rows of the picked held-out frames (render order), nothing else read into Python."""
    table = keypoints.load(keypoints_dir)
    order = {c["name"]: c["start"] for c in read_meta(ingest)["clips"] if c["split"] == "test"}
    clips, frames = table.column("clip").to_pylist(), table.column("frame").to_pylist()
    held = sorted((i for i, c in enumerate(clips) if c in order), key=lambda i: (order[clips[i]], frames[i]))
    return table.take([held[t] for t in picks]).to_pylist()


def landmark_scores(generated: list[dict[str, Any]], real: list[dict[str, Any]], side: int, hand_outlier: float
                    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """LMD per part (mean px at the crop side, and % of it) over the real points inside the frame, and per frame for
    the plot."""
    out: dict[str, Any] = {}
    per_frame: list[dict[str, Any]] = [{"frame": t} for t in range(len(real))]
    for name, (part, k) in PARTS.items():
        seen = {p: points_of(real, p, k) for p in (part if name == "hand" else (part,))}
        inside = {p: in_frame(v, side) for p, v in seen.items()}
        outside = sum(_found(seen[p]) - _found(inside[p]) for p in seen)
        if name == "hand":
            results = [scores.landmark_distance(points_of(generated, p, k), inside[p], outlier=hand_outlier * side)
                       for p in part]
            pts = sum(r["points"] for r in results)
            mean = sum(r["mean_px"] * r["points"] for r in results if r["points"]) / pts if pts else float("nan")
            res = {"mean_px": mean, "points": pts, "frames": sum(r["frames"] for r in results),
                   "dropped_frames": sum(r["dropped_frames"] for r in results)}
        else:
            g, r = points_of(generated, part, k), inside[part]
            res = scores.landmark_distance(g, r)
            d = np.linalg.norm(g - r, axis=-1)
            for t in range(len(real)):
                row_ok = np.isfinite(d[t])
                per_frame[t][f"lmd_{name}_px"] = round(float(d[t][row_ok].mean()), 4) if row_ok.any() else ""
        value = res["mean_px"]
        out[f"lmd_{name}"] = ({"value": round(value, 4), "pct": round(100 * value / side, 4), "frames": res["frames"],
                               "real_points_outside_frame": outside,
                               **({"dropped_frames": res["dropped_frames"]} if name == "hand" else {})}
                              if np.isfinite(value) else {"value": None,
                                                          "note": f"not computed: no {name} found in both videos"})
    return out, per_frame


def _pose(rows: list[Any], side: int) -> np.ndarray:
    """(T, 75, 2): the 33 body and 2 × 21 hand points the baseline matches on, those inside the frame."""
    return in_frame(np.concatenate([points_of(rows, "body", 33), points_of(rows, "left_hand", 21),
                                     points_of(rows, "right_hand", 21)], axis=1), side)


def training_poses(keypoints_dir: Path, ingest: Path) -> tuple[list[dict[str, Any]], list[Path]]:
    """The training frames' keypoint rows and image paths, in one order."""
    clips = {c["name"]: c for c in read_meta(ingest)["clips"] if c["split"] == "train"}
    rows = sorted((r for r in keypoints.load(keypoints_dir).to_pylist() if r["clip"] in clips),
                  key=lambda r: (clips[r["clip"]]["start"], r["frame"]))
    paths = {name: clip_frame_paths(ingest, clip) for name, clip in clips.items()}
    return rows, [paths[r["clip"]][r["frame"]] for r in rows]


def person_masks(matting: Path, ingest: Path, picks: list[int], size: int) -> Iterator[np.ndarray]:
    """The picked held-out frames' alpha mattes in [0, 1] at `size`, in render order, one at a time."""
    clips = sorted((c for c in read_meta(ingest)["clips"] if c["split"] == "test"), key=lambda c: c["start"])
    paths = [matting / "alpha" / c["name"] / frame_name(i, "png") for c in clips for i in range(c["frames"])]
    for t in picks:
        alpha = cv2.imread(str(paths[t]), cv2.IMREAD_GRAYSCALE)
        if alpha is None:
            raise FileNotFoundError(f"metrics: no person matte {paths[t]}")
        yield cv2.resize(alpha, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255


def detect_landmarks(paths: list[Path], side: int, detector: dict[str, Any], workers: int, progress: Progress,
                     label: str = "metrics: landmarks on generated frames") -> list[dict[str, Any]]:
    """The keypoints stage's detector, with the settings that found the real landmarks, on other frames."""
    job = ({"name": "generated", "split": "test", "start": 0}, [str(p) for p in paths], side, detector)
    progress.start(label, len(paths))
    return run_parallel(keypoints.detect_clip, [job], workers, progress)[0]


def _rates(rows: list[dict[str, Any]]) -> dict[str, float]:
    return {part: round(sum(r[part] is not None for r in rows) / max(len(rows), 1), 4)
            for part in ("body", "face", "left_hand", "right_hand")}


def hand_rate_ratio(generated: dict[str, float], real: dict[str, float]) -> float | None:
    """Share of frames where MediaPipe finds each hand, generated over real, capped at 1 (a model that invents
    hands is not better than the truth), the lower of the two hands (a hand never found in the real frames does not
    count); None when neither is."""
    ratios = [min(generated[h] / real[h], 1.0) for h in HANDS if real.get(h)]
    return round(min(ratios), 4) if ratios else None


class _Panels:
    """The side-by-side frames, made one at a time when the encoder asks: `picks` in order, each a row of the
    four panels at the render's side with their names."""

    def __init__(self, picks: list[int], sources: list[Any], side: int) -> None:
        self.picks, self.sources, self.side = picks, sources, side

    def __len__(self) -> int:
        return len(self.picks)

    def __getitem__(self, k: int) -> np.ndarray:
        t = self.picks[k]
        row = np.concatenate([read(t) for read in self.sources], axis=1)
        for i, name in enumerate(PANELS):
            cv2.putText(row, name, (i * self.side + 4, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (255, 255, 255), 1,
                        cv2.LINE_AA)
        return row


def side_by_side(out: Path, picks: list[int], sources: list[Any], side: int, wav: Path | None,
                 progress: Progress) -> None:
    """real | mesh condition | generated | nearest training frame as one H.264 video (the assemble stage's
    encoder), with the motion's audio when every frame is there to keep it in step."""
    from tasks.stages import assemble

    params = assemble.AssembleParams(crf=23, preset="veryfast")
    assemble.encode(_Panels(picks, sources, side), out, params, wav, progress, read=lambda image: image)


def _not(reason: str) -> dict[str, Any]:
    return {"value": None, "note": f"not computed: {reason}"}


def run(inputs: dict[str, Path], out: Path, params: MetricsParams, progress: Progress, *,
        compute: Compute) -> dict[str, Any]:
    from models import fid, fvd

    info = motion.read_info(inputs["motion"])
    n = int(info["frames"])
    gen_paths = hands.final_frames(inputs["render_body"], inputs["face"], inputs["hands"], n)
    result: dict[str, Any] = {"frames": n, "motion": info.get("source"), "detector": "MediaPipe Holistic "
                              "(the paper used OpenPose)", "hand_outlier_rule": f"a hand whose mean distance exceeds "
                              f"{params.hand_outlier:g} of the frame side is a detector failure and left out"}
    if info.get("kind") != "held_out":
        reason = "no ground truth: the motion is not the identity's own held-out clips"
        for key in SCORES:
            result[key] = _not(reason)
        (out / RESULT).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        return {"ground_truth": False}

    side = int(read_meta(inputs["ingest"])["resolution"])
    real_paths = real_frames(inputs["ingest"], n)
    res = read_rgb(gen_paths[0]).shape[0]
    picks = sample(n, params.max_frames)  # every frame, or evenly spaced ones for a very long hold-out
    if len(picks) < n:
        result["sampled"] = (f"{len(picks)} of {n} frames evenly spaced (metrics.max_frames); flicker on the pairs "
                             f"they start, FVD on {fvd.CLIP_LENGTH}-frame clips spread the same way")

    def gen_image(t: int) -> np.ndarray:
        return read_rgb(gen_paths[t])

    def real_image(t: int) -> np.ndarray:
        return read_rgb(real_paths[t], res)  # the real frame at the render's size

    real_lm = _real_landmarks(inputs["keypoints"], inputs["ingest"], picks)
    detector = (read_manifest(inputs["keypoints"]) or {}).get("params") or keypoints.KeypointsParams().model_dump()
    generated_lm = detect_landmarks([gen_paths[t] for t in picks], side, detector, params.workers, progress)
    lmd, per_frame = landmark_scores(generated_lm, real_lm, side, params.hand_outlier)
    for row, t in zip(per_frame, picks, strict=True):
        row["frame"] = t
    result.update(lmd)
    result["detection_rate_generated"] = _rates(generated_lm)
    result["detection_rate_real"] = _rates(real_lm)
    result["hand_rate_ratio"] = hand_rate_ratio(result["detection_rate_generated"], result["detection_rate_real"])
    del generated_lm

    # the baseline: copy the training frame whose keypoints are nearest, scored exactly like the model
    train_rows, train_paths = training_poses(inputs["keypoints"], inputs["ingest"])
    chosen = scores.nearest_frames(_pose(real_lm, side), _pose(train_rows, side))
    (out / NEAREST).mkdir()
    nn_paths = {t: out / NEAREST / frame_name(t, "png") for t in picks}
    for t, i in zip(picks, chosen, strict=True):
        write_png(nn_paths[t], read_rgb(train_paths[max(int(i), 0)], res))  # no real pose: the first frame
    nn_lm = detect_landmarks([nn_paths[t] for t in picks], side, detector, params.workers, progress,
                             "metrics: landmarks on the baseline's frames")
    nn_lmd, _ = landmark_scores(nn_lm, real_lm, side, params.hand_outlier)
    result.update({f"baseline_{k}": v for k, v in nn_lmd.items()})
    result["baseline_detection_rate"] = _rates(nn_lm)
    result["baseline_hand_rate_ratio"] = hand_rate_ratio(result["baseline_detection_rate"],
                                                         result["detection_rate_real"])
    result["baseline"] = ("each held-out frame replaced by the training frame whose body and hand keypoints are "
                          "nearest (mean distance over the points inside the frame found in both, among the "
                          "training frames sharing the most of them)")
    scale = res / side  # landmarks at the crop side, pictures at the render's
    hand_boxes = [[box for h in HANDS if (box := squares.hand_box(points_of([row], h, 21)[0] * scale, res))]
                  for row in real_lm]
    face_boxes = [squares.hand_box(points_of([row], "face", PARTS["face"][1])[0] * scale, res, FACE_MARGIN)
                  for row in real_lm]  # the same rule as a hand's: where the face is, judged on its own
    del nn_lm, real_lm

    progress.start("metrics: SSIM inside the person, around its hands and its face", len(picks))
    ssim_g, ssim_nn, hand_g, hand_nn, face_g, face_nn = [], [], [], [], [], []
    with open(out / NEAREST_TABLE, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["frame", "train_clip", "train_frame", "ssim_person_generated", "ssim_person_nearest"])
        masks = person_masks(inputs["matting"], inputs["ingest"], picks, res)
        for t, i, mask, boxes, face in zip(picks, chosen, masks, hand_boxes, face_boxes, strict=True):
            real, generated, nearest = real_image(t), gen_image(t), read_rgb(nn_paths[t])
            g_map, nn_map = scores.ssim_map(generated, real), scores.ssim_map(nearest, real)
            ssim_g.append(scores.mean_in_mask(g_map, mask))
            ssim_nn.append(scores.mean_in_mask(nn_map, mask))
            hand_g.extend(scores.mean_in_box(g_map, box) for box in boxes)
            hand_nn.extend(scores.mean_in_box(nn_map, box) for box in boxes)
            if face is not None:
                face_g.append(scores.mean_in_box(g_map, face))
                face_nn.append(scores.mean_in_box(nn_map, face))
            row = train_rows[max(int(i), 0)]
            writer.writerow([t, row["clip"], row["frame"], round(ssim_g[-1], 5), round(ssim_nn[-1], 5)])
            progress.advance(1)
    for key, values in (("ssim_person", ssim_g), ("baseline_ssim_person", ssim_nn)):
        ok = [v for v in values if np.isfinite(v)]
        result[key] = {"value": round(float(np.mean(ok)), 4), "frames": len(ok)} if ok else \
            _not("no person in the real frames' mattes")
    for key, values in (("hand_ssim", hand_g), ("baseline_hand_ssim", hand_nn)):
        result[key] = {"value": round(float(np.mean(values)), 4), "crops": len(values)} if values else \
            _not("no hand with half its landmarks inside the real frames")
    for key, values in (("face_ssim", face_g), ("baseline_face_ssim", face_nn)):
        result[key] = {"value": round(float(np.mean(values)), 4), "frames": len(values)} if values else \
            _not("no face with half its landmarks inside the real frames")
    pairs = [t for t in picks if t + 1 < n]
    flick = scores.flicker_of_pairs((gen_image(t), gen_image(t + 1), real_image(t), real_image(t + 1))
                                    for t in pairs) if pairs else None
    result["flicker"] = ({"value": round(flick["flicker"], 6), "change_generated": round(flick["change_generated"], 6),
                          "change_real": round(flick["change_real"], 6)} if flick else _not("one frame"))

    # the only models of this stage: a GPU is claimed for them alone, and only when their weights are set
    progress.start("metrics: FID / FVD", 2)
    if params.inception_weights is None:
        result["fid"] = _not("no Inception weights (set metrics.inception_weights to pytorch-fid's file)")
    else:
        with compute.held() as device:
            net = fid.load_inception(inputs["inception_weights"]).to(device)
            g = fid.inception_features(net, (gen_image(t) for t in picks))
            r = fid.inception_features(net, (real_image(t) for t in picks))
            del net
        result["fid"] = {"value": round(fid.frechet_distance(*fid.statistics(g), *fid.statistics(r)), 4),
                         "frames": len(picks)}
    progress.advance(1)
    starts = [s * fvd.CLIP_LENGTH for s in sample(n // fvd.CLIP_LENGTH, max(2, params.max_frames // fvd.CLIP_LENGTH))]
    if params.i3d_weights is None:
        result["fvd"] = _not("no I3D weights (set metrics.i3d_weights to the TorchScript I3D file)")
    elif len(starts) < 2:
        result["fvd"] = _not(f"{n} frames make fewer than two {fvd.CLIP_LENGTH}-frame clips")
    else:
        def clips(read: Any) -> Iterator[np.ndarray]:
            for s0 in starts:
                yield np.stack([read(t) for t in range(s0, s0 + fvd.CLIP_LENGTH)])

        with compute.held() as device:
            net = fvd.load_i3d(inputs["i3d_weights"]).to(device)
            g, r = fvd.i3d_features(net, clips(gen_image)), fvd.i3d_features(net, clips(real_image))
            del net
        result["fvd"] = {"value": round(fvd.fvd(g, r), 4), "clips": len(g)}
    progress.advance(1)

    wav = inputs["motion"] / motion.AUDIO
    cond_dir = inputs["render_body"] / render_body.COND
    side_by_side(out / SIDE_BY_SIDE, picks, [real_image, lambda t: read_rgb(cond_dir / frame_name(t, "png"), res),
                                             gen_image, lambda t: read_rgb(nn_paths[t])],
                 res, wav if wav.is_file() and len(picks) == n else None, progress)

    (out / RESULT).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    with open(out / PER_FRAME, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["frame", "lmd_face_px", "lmd_body_px"])
        writer.writeheader()
        writer.writerows(per_frame)
    return {k: (v.get("value") if isinstance(v, dict) else v) for k, v in result.items()
            if k in SCORES} | {"ground_truth": True}

