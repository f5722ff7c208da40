"""Video I/O shared by the stages: probing, constant-frame-rate decoding, audio extraction (PyAV, no system ffmpeg)."""

from __future__ import annotations

import math
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from core.errors import InputError


@dataclass(frozen=True)
class VideoInfo:
    width: int  # after rotation
    height: int
    rotation: int  # degrees counter-clockwise to display upright
    start: float  # seconds, first frame time
    duration: float  # seconds, first frame to end of the last
    packets: int
    codec: str
    has_audio: bool


def _rotate(img: np.ndarray, rotation: int) -> np.ndarray:
    k = (rotation // 90) % 4
    return np.ascontiguousarray(np.rot90(img, k)) if k else img


def probe(path: Path) -> VideoInfo:
    """Check that `path` is a whole, decodable video; every problem becomes one InputError line.

    Demuxing every packet (no decoding) is cheap and catches files cut short after their header.
    """
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InputError(f"{path}: no video stream")
            stream = container.streams.video[0]
            first = next(container.decode(stream), None)
            if first is None:
                raise InputError(f"{path}: no decodable video frame")
            rotation = int(getattr(first, "rotation", 0) or 0)
            tb = float(stream.time_base)
            declared = stream.frames or 0
            container.seek(0)
            count, first_pts, last_end = 0, None, 0.0
            for packet in container.demux(stream):
                if packet.pts is None or packet.size == 0:
                    continue
                count += 1
                t = packet.pts * tb
                first_pts = t if first_pts is None else min(first_pts, t)
                last_end = max(last_end, t + (packet.duration or 0) * tb)
            has_audio = bool(container.streams.audio)
            codec = stream.codec_context.name
            w, h = first.width, first.height
    except InputError:
        raise
    except (av.FFmpegError, OSError, StopIteration) as exc:
        raise InputError(f"{path}: not a readable video ({exc.__class__.__name__}: {_short(exc)})") from None
    if count == 0 or first_pts is None:
        raise InputError(f"{path}: no video frames")
    if declared and count < 0.99 * declared:
        raise InputError(f"{path}: truncated or corrupt: {count} of {declared} declared video frames present")
    if rotation % 180:
        w, h = h, w
    return VideoInfo(w, h, rotation, first_pts, last_end - first_pts, count, codec, has_audio)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:160] if text else "unknown error"


def cfr_frames(path: Path, fps: int, size: tuple[int, int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (index, RGB frame) at a constant `fps`, whatever the source's rate or timing.

    Output frame k shows the source frame on screen at time k/fps (the latest one that started by then), so
    variable-frame-rate sources keep their duration to within one frame. `size` = (w, h) after rotation, to
    let the decoder scale cheaply.
    """
    info = probe(path)
    n_out = max(1, round(info.duration * fps))
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        tb = float(stream.time_base)
        k = 0
        held = None  # the decoded frame currently on screen

        def convert(frame: av.VideoFrame) -> np.ndarray:
            if size is None:
                img = frame.to_ndarray(format="rgb24")
            else:
                w, h = size if info.rotation % 180 == 0 else (size[1], size[0])
                img = frame.reformat(width=w, height=h, format="rgb24").to_ndarray()
            return _rotate(img, info.rotation)

        held_img = None
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            t = frame.pts * tb - info.start
            # emit the held frame for every output time before this frame starts
            while held is not None and k < n_out and k / fps < t - 1e-6:
                if held_img is None:
                    held_img = convert(held)
                yield k, held_img
                k += 1
            held, held_img = frame, None
        while held is not None and k < n_out:
            if held_img is None:
                held_img = convert(held)
            yield k, held_img
            k += 1


def frame_count(info: VideoInfo, fps: int) -> int:
    return max(1, round(info.duration * fps))


def extract_audio(path: Path, out: Path, video_start: float, seconds: float) -> dict | None:
    """Write the first audio stream as 16-bit PCM WAV aligned to the video's first frame; None if silent film."""
    with av.open(str(path)) as container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        rate = stream.rate or 48000
        layout = "stereo" if (stream.channels or 1) >= 2 else "mono"
        channels = 2 if layout == "stereo" else 1
        resampler = av.AudioResampler(format="s16", layout=layout, rate=rate)
        chunks: list[np.ndarray] = []
        start = None
        for frame in container.decode(stream):
            if start is None and frame.pts is not None:
                start = frame.pts * float(stream.time_base)
            for rf in resampler.resample(frame):
                chunks.append(rf.to_ndarray().reshape(-1, channels))
        for rf in resampler.resample(None):
            chunks.append(rf.to_ndarray().reshape(-1, channels))
    pcm = np.concatenate(chunks) if chunks else np.zeros((0, channels), np.int16)
    offset = round(((start or 0.0) - video_start) * rate)
    if offset > 0:
        pcm = np.concatenate([np.zeros((offset, channels), np.int16), pcm])
    elif offset < 0:
        pcm = pcm[-offset:]
    total = math.floor(seconds * rate + 0.5)
    pcm = pcm[:total] if len(pcm) >= total else np.concatenate(
        [pcm, np.zeros((total - len(pcm), channels), np.int16)])
    with wave.open(str(out), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.ascontiguousarray(pcm, dtype="<i2").tobytes())
    return {"file": out.name, "sample_rate": rate, "channels": channels, "seconds": round(total / rate, 6)}
