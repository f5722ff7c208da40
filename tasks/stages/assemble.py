"""assemble: the finished video. H.264 at the motion's 30 fps, one frame per motion frame, the driving audio muxed
when the motion came with some (a held-out clip or a driving video). PyAV's bundled FFmpeg: no system ffmpeg.

Frames come from the face stage where it redid the face, else from render_body. render.json records what shaped
the video: the identity's model version, the motion's hash and every params value of the render stages.
"""

from __future__ import annotations

import json
import wave
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import av
import cv2
import numpy as np
from pydantic import Field

from core.artifacts import read_manifest
from core.hashing import sha256_file
from core.progress import Progress
from core.section import Section
from core.stage import Stage
from models.motion_io import FIT_FPS
from tasks.frames import read_rgb
from tasks.stages import face, hands, motion

VIDEO = "video.mp4"
RECORD = "render.json"


class AssembleParams(Section):
    crf: int = Field(18, ge=0, le=51, description="H.264 quality (lower = better, larger)")
    preset: Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow"] = "medium"
    audio: bool = Field(True, description="mux the driving audio when the motion has some")


def describe(s: dict[str, Any]) -> str:
    return (f"{s['frames']} frames at {s['fps']} fps, audio {'yes' if s['audio'] else 'no'}, "
            f"{s['faces_enhanced']} faces enhanced; model {str(s['model_version'])[:12]}, "
            f"motion {str(s['motion_hash'])[:12]}")


STAGE = Stage(
    "assemble", flow="render", scope="render", inputs=("motion", "render_body", "face", "hands"), params=AssembleParams,
    in_dvc=False, describe=describe, outputs=(VIDEO, RECORD),
    description="H.264 mp4 at 30 fps with the driving audio; render.json says what shaped it")
FPS = int(FIT_FPS)
# The same frames must give the same bytes (audit, byte-identical re-renders). One encoder thread, and no
# macroblock-tree rate control: with mbtree on, x264 gave different bytes for the same frames from one run to the
# next at 64-192 px, depending on what the process had allocated before (measured: up to 8 outcomes in 30 runs; with
# mbtree=0, one in 40 at every size tried). It costs a few percent of bitrate at the same CRF.
X264_OPTIONS = {"threads": "1", "x264-params": "mbtree=0"}


def _audio(container: av.container.OutputContainer, wav: Path) -> tuple[Any, np.ndarray, int, str]:
    with wave.open(str(wav), "rb") as src:
        rate, channels = src.getframerate(), src.getnchannels()
        pcm = np.frombuffer(src.readframes(src.getnframes()), "<i2").reshape(-1, channels)
    layout = "stereo" if channels == 2 else "mono"
    stream = container.add_stream("aac", rate=rate)
    stream.layout = layout
    return stream, pcm, rate, layout


def encode(frames: Sequence[Any], out: Path, params: AssembleParams, wav: Path | None, progress: Progress,
           read: Callable[[Any], np.ndarray] = read_rgb) -> int:
    """Frames (PNG paths, or anything `read` makes an RGB image of, in order) → H.264 mp4; returns the number of
    video frames written."""
    first = read(frames[0])
    h, w = first.shape[:2]
    with av.open(str(out), "w", format="mp4") as container:
        video = container.add_stream("libx264", rate=FPS)
        video.width, video.height, video.pix_fmt = w, h, "yuv420p"
        video.time_base = Fraction(1, FPS)
        video.options = {"crf": str(params.crf), "preset": params.preset, **X264_OPTIONS}
        audio = _audio(container, wav) if wav is not None else None
        progress.start("encoding video", len(frames))
        for i, path in enumerate(frames):
            # RGB → YUV 4:2:0 (BT.601, video range) by OpenCV, one deterministic conversion whatever the threads
            yuv = cv2.cvtColor(read(path), cv2.COLOR_RGB2YUV_I420)
            frame = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
            frame.pts = i
            for packet in video.encode(frame):
                container.mux(packet)
            progress.advance(1)
        for packet in video.encode():
            container.mux(packet)
        if audio is not None:
            stream, pcm, rate, layout = audio
            chunk = 1024
            for start in range(0, len(pcm), chunk):
                part = np.ascontiguousarray(pcm[start:start + chunk].T if layout == "stereo"
                                            else pcm[start:start + chunk].reshape(1, -1))
                af = av.AudioFrame.from_ndarray(part, format="s16p", layout=layout)
                af.sample_rate, af.pts = rate, start
                for packet in stream.encode(af):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    return len(frames)


def run(inputs: dict[str, Path], out: Path, params: AssembleParams, progress: Progress) -> dict[str, Any]:
    info = motion.read_info(inputs["motion"])
    n = int(info["frames"])
    frames = hands.final_frames(inputs["render_body"], inputs["face"], inputs["hands"], n)
    face_dir = inputs["face"] / face.FRAMES
    wav = inputs["motion"] / motion.AUDIO
    use_audio = params.audio and wav.is_file()
    encode(frames, out / VIDEO, params, wav if use_audio else None, progress)

    body_manifest = read_manifest(inputs["render_body"]) or {}
    face_manifest = read_manifest(inputs["face"]) or {}
    motion_manifest = read_manifest(inputs["motion"]) or {}
    model = {i["stage"]: i["output_hash"] for m in (body_manifest, face_manifest) for i in m.get("inputs", [])
             if i.get("stage") in ("finetune", "smplx_fit")}
    record = {
        "identity": body_manifest.get("identity", "").split("/")[0],
        "model_version": model.get("finetune"),
        "motion": {"hash": motion_manifest.get("output_hash"), **info,
                   **{k: v for k, v in (motion_manifest.get("summary") or {}).items() if k in motion.DESCRIBED}},
        "params": {"render_body": body_manifest.get("params"), "face": face_manifest.get("params"),
                   "hands": (read_manifest(inputs["hands"]) or {}).get("params"),
                   "assemble": params.model_dump(mode="json")},
        "frames": n,
        "fps": FPS,
        "audio": use_audio,
        "faces_enhanced": sum(1 for p in frames if (face_dir / p.name).is_file()),
        "video_sha256": sha256_file(out / VIDEO),
    }
    (out / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return {k: record[k] for k in ("identity", "model_version", "frames", "fps", "audio", "faces_enhanced",
                                   "video_sha256")} | {"motion_hash": record["motion"]["hash"]}
