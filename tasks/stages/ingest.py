"""ingest: any video → constant 30 fps, one stable square crop around the person, 300-frame clips, train/test split.

Two decoding passes keep memory flat whatever the length: the first tracks the person on small frames to choose
the crop once for the whole video (so it never jitters), the second cuts and writes the frames.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import av
import numpy as np
from pydantic import Field

from core.artifacts import write_json
from core.errors import InputError, StageError
from core.progress import NullProgress, Progress
from core.section import Section
from core.stage import Stage
from tasks import video as vio
from tasks.frames import META, frame_name, write_jpeg
from tasks.mp import solutions
from tasks.stages.source import source_file
from tasks.workers import Reporter, run_parallel


class IngestParams(Section):
    fps: int = Field(30, ge=1, le=120, description="constant output frame rate")
    resolution: int = Field(512, ge=64, le=2048, description="side of the square crop, pixels")
    clip_frames: int = Field(300, ge=8, le=3000, description="frames per clip")
    train_seconds: float = Field(60.0, gt=0, description="the first this many seconds train, the rest is test")
    short_test_fraction: float = Field(0.3, gt=0, lt=1, description="test share kept when the video is not "
                                       "longer than train_seconds")
    crop_margin: float = Field(0.15, ge=0, le=1, description="margin around the person track, share of its size")
    track_stride: int = Field(5, ge=1, le=60, description="detect the person every this many frames for the crop")
    track_resolution: int = Field(256, ge=96, le=1024, description="longest side of frames given to the tracker")
    min_person_fraction: float = Field(0.25, gt=0, le=1, description="share of tracked frames that must show a "
                                       "person, else the video is refused")
    jpeg_quality: int = Field(95, ge=50, le=100)


def describe(s: dict[str, Any]) -> str:
    return (f"{s['frames']} frames, clips train {s['clips']['train']} / test {s['clips']['test']}, "
            f"crop {s['crop']['side']} px")


STAGE = Stage(
    "ingest", flow="onboard", inputs=("source",), params=IngestParams, describe=describe,
    outputs=("frames/", "meta.json", "audio.wav?"),
    description="constant 30 fps, stable square crop, clips, train/test split, audio")

UPPER_BODY = range(0, 25)  # MediaPipe pose: face, shoulders, arms, hands, hips (legs may be out of frame)
NOSE, L_SHOULDER, R_SHOULDER = 0, 11, 12


def _person_box(landmarks: Any, width: int, height: int) -> tuple[float, float, float, float] | None:
    pts = [(lm.x * width, lm.y * height) for i, lm in enumerate(landmarks.landmark)
           if i in UPPER_BODY and lm.visibility > 0.5]
    if len(pts) < 3:
        return None
    xy = np.array(pts)
    x0, y0 = xy.min(0)
    x1, y1 = xy.max(0)
    lm = landmarks.landmark
    shoulder_w = abs(lm[L_SHOULDER].x - lm[R_SHOULDER].x) * width
    y0 = min(y0, lm[NOSE].y * height - 0.45 * shoulder_w)  # the crown is above the highest landmark
    return float(x0), float(y0), float(x1), float(y1)


def _track(job: tuple[Path, vio.VideoInfo, IngestParams], report: Reporter) -> dict[str, Any]:
    video, info, params = job
    scale = params.track_resolution / max(info.width, info.height)
    size = (max(2, round(info.width * scale)) // 2 * 2, max(2, round(info.height * scale)) // 2 * 2)
    boxes: list[tuple[float, float, float, float]] = []
    sampled = 0
    with solutions().pose.Pose(static_image_mode=False, model_complexity=1, min_detection_confidence=0.5) as pose:
        for k, img in vio.cfr_frames(video, params.fps, size):
            if k % params.track_stride:
                continue
            report(params.track_stride)
            sampled += 1
            res = pose.process(img)
            if res.pose_landmarks is not None:
                box = _person_box(res.pose_landmarks, info.width, info.height)
                if box is not None:
                    boxes.append(box)
    return {"boxes": boxes, "sampled": sampled}


def track_person(video: Path, info: vio.VideoInfo, params: IngestParams, progress: Progress) -> dict[str, Any]:
    """Person boxes (source pixels) on every `track_stride`-th frame; refuses a video without a person."""
    progress.start("ingest: track person", vio.frame_count(info, params.fps))
    (found,) = run_parallel(_track, [(video, info, params)], 1, progress)
    boxes, sampled = found["boxes"], found["sampled"]
    rate = len(boxes) / max(1, sampled)
    if rate < params.min_person_fraction:
        raise StageError(
            f"no person found in {video.name}: a person was seen in {len(boxes)} of {sampled} sampled frames "
            f"({rate:.0%}; ingest.min_person_fraction = {params.min_person_fraction:.0%})")
    return {"boxes": np.array(boxes), "sampled": sampled, "detected": len(boxes), "rate": rate}


def sample_frames(video: Path, longest: int, most: int) -> list[np.ndarray]:
    """`most` small RGB frames at evenly spaced times (the keyframe at or before each): a fixed amount of decoding
    and memory whatever the video's length or codec (an all-intra file is all keyframes)."""
    info = vio.probe(video)
    picked = []
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        tb = float(stream.time_base)
        for k in range(most):
            t = info.start + info.duration * (k + 0.5) / most
            container.seek(int(t / tb), stream=stream, backward=True, any_frame=False)
            frame = next(container.decode(stream), None)
            if frame is None:
                continue
            scale = longest / max(frame.width, frame.height)
            picked.append(frame.reformat(width=max(2, round(frame.width * scale)) // 2 * 2,
                                         height=max(2, round(frame.height * scale)) // 2 * 2,
                                         format="rgb24").to_ndarray())
    return picked


def _keyframes_with_person(job: tuple[Path, int, int], report: Reporter) -> tuple[int, int]:
    video, longest, most = job
    picked = sample_frames(video, longest, most)
    with solutions().pose.Pose(static_image_mode=True, model_complexity=1) as pose:
        found = sum(pose.process(img).pose_landmarks is not None for img in picked)
    report(1)
    return found, len(picked)


def check_person(video: Path, params: IngestParams) -> None:
    """Refuse, before anything is written, a video that shows nobody (cheap: a dozen frames, seeked to)."""
    found, looked = run_parallel(_keyframes_with_person, [(video, params.track_resolution, 12)], 1, NullProgress())[0]
    if looked and not found:
        raise InputError(f"{video}: no person found (none of {looked} sampled keyframes shows one)")


def choose_crop(boxes: np.ndarray, width: int, height: int, margin: float) -> tuple[int, int, int]:
    """One square (x, y, side) for the whole video from a median-smoothed track of person boxes."""
    if len(boxes) >= 5:
        padded = np.pad(boxes, ((2, 2), (0, 0)), mode="edge")
        boxes = np.stack([np.median(padded[i:i + 5], axis=0) for i in range(len(boxes))])
    x0, y0 = np.percentile(boxes[:, 0], 5), np.percentile(boxes[:, 1], 5)
    x1, y1 = np.percentile(boxes[:, 2], 95), np.percentile(boxes[:, 3], 95)
    w, h = x1 - x0, y1 - y0
    side = max(w, h) * (1 + 2 * margin)
    side = int(min(round(side), width, height))
    cx = (x0 + x1) / 2
    # when the person is taller than the square can be, keep the head and hands in and let the legs go
    cy = (y0 + y1) / 2 if side >= h * (1 + 2 * margin) else y0 - margin * h + side / 2
    x = int(np.clip(round(cx - side / 2), 0, width - side))
    y = int(np.clip(round(cy - side / 2), 0, height - side))
    return x, y, side


def split_clips(n: int, fps: int, params: IngestParams) -> tuple[list[dict[str, Any]], str | None]:
    if n < 2:
        raise StageError(f"video too short: {n} frame(s) at {fps} fps; need at least 2 for a train/test split")
    note = None
    if n / fps > params.train_seconds:
        n_train = max(1, min(n - 1, round(params.train_seconds * fps)))
    else:
        n_train = max(1, min(n - 1, n - round(n * params.short_test_fraction)))
        note = (f"video is {n / fps:.1f} s, not longer than ingest.train_seconds = {params.train_seconds:g} s: "
                f"the last {n - n_train} frames ({(n - n_train) / n:.0%}) are kept as test")
    clips = []
    for split, start, stop in (("train", 0, n_train), ("test", n_train, n)):
        for i, s in enumerate(range(start, stop, params.clip_frames)):
            length = min(params.clip_frames, stop - s)
            clips.append({"name": f"{split}_{i:03d}", "split": split, "start": s, "frames": length,
                          "start_s": round(s / fps, 6)})
    return clips, note


def run(inputs: dict[str, Path], out: Path, params: IngestParams, progress: Progress) -> dict[str, Any]:
    video = source_file(inputs["source"])
    info = vio.probe(video)
    n = vio.frame_count(info, params.fps)
    track = track_person(video, info, params, progress)
    x, y, side = choose_crop(track["boxes"], info.width, info.height, params.crop_margin)
    clips, note = split_clips(n, params.fps, params)

    # Scale the whole frame in the decoder so the crop comes out at the target resolution directly.
    res = params.resolution
    f = res / side
    scaled = (max(res, round(info.width * f)), max(res, round(info.height * f)))
    sx = min(round(x * f), scaled[0] - res)
    sy = min(round(y * f), scaled[1] - res)
    where = {}
    for clip in clips:
        (out / "frames" / clip["name"]).mkdir(parents=True)
        for i in range(clip["frames"]):
            where[clip["start"] + i] = out / "frames" / clip["name"] / frame_name(i)

    progress.start("ingest: crop frames", n)
    written = 0
    pending: list[Future[None]] = []
    with ThreadPoolExecutor(max_workers=2) as pool:
        for k, img in vio.cfr_frames(video, params.fps, scaled):
            crop = np.ascontiguousarray(img[sy:sy + res, sx:sx + res])
            pending.append(pool.submit(write_jpeg, where[k], crop, params.jpeg_quality))
            written += 1
            if len(pending) >= 16:
                pending.pop(0).result()
            progress.advance()
        for fut in pending:
            fut.result()
    if written != n:
        raise StageError(f"{video.name}: decoded {written} frames, expected {n}: the file may be corrupt")

    audio = vio.extract_audio(video, out / "audio.wav", info.start, n / params.fps)
    meta = {
        "fps": params.fps,
        "resolution": res,
        "frames": n,
        "duration_s": round(n / params.fps, 6),
        "source": {"width": info.width, "height": info.height, "rotation": info.rotation, "codec": info.codec,
                   "duration_s": round(info.duration, 6)},
        "crop": {"x": x, "y": y, "side": side, "upscaled": side < res},
        "track": {"sampled": track["sampled"], "detected": track["detected"], "rate": round(track["rate"], 4)},
        "clips": clips,
        "audio": audio,
        "note": note,
    }


    write_json(out / META, meta)
    return {
        "frames": n,
        "clips": {"train": sum(c["split"] == "train" for c in clips), "test": sum(c["split"] == "test" for c in clips)},
        "crop": meta["crop"],
        "person_rate": meta["track"]["rate"],
        "audio": audio is not None,
        "note": note,
    }
