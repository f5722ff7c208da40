"""Audio in: any file with an audio stream (wav, mp3, m4a, flac, ogg, or a video's soundtrack) decoded with PyAV.

Decoding streams frame by frame into mono float32 at the speech model's rate, so ten minutes of audio stay ~60 MB;
a file that is not audio, has no audio stream or holds no samples is an `InputError` with one line.
"""

from __future__ import annotations

import wave
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import InputError
from models.speech import SAMPLE_RATE

AUDIO_SUFFIXES = {".wav", ".mp3", ".m4a", ".aac", ".flac", ".ogg", ".oga", ".opus", ".wma", ".aif", ".aiff"}


def is_audio(path: Path) -> bool:
    """An audio file by its suffix, or any container holding sound and no pictures (an audio-only .mp4/.webm)."""
    if path.suffix.lower() in AUDIO_SUFFIXES:
        return True
    if not path.is_file():
        return False
    import av

    try:
        with av.open(str(path)) as container:
            return bool(container.streams.audio) and not container.streams.video
    except (av.error.FFmpegError, OSError):
        return False


def _open_audio(path: Path) -> Any:
    """The container and its first audio stream, or the one-line reason there is none."""
    import av

    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as exc:
        raise InputError(f"{path}: not an audio or video file ({_reason(exc)})") from None
    if not container.streams.audio:
        container.close()
        raise InputError(f"{path}: no audio stream")
    return container


def decode(path: Path, rate: int = SAMPLE_RATE, max_seconds: float | None = None) -> np.ndarray:
    """The first audio stream of `path` as mono float32 samples at `rate`; refuses (before decoding it all) audio
    longer than `max_seconds`."""
    import av

    with _open_audio(path) as container:
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
        chunks: list[np.ndarray] = []
        total = 0
        limit = None if max_seconds is None else int(max_seconds * rate) + rate
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
                    total += len(chunks[-1])
                if limit is not None and total > limit:
                    raise InputError(f"{path}: audio longer than {max_seconds / 60:.0f} min (motion.max_frames)")
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
        except av.error.FFmpegError as exc:
            raise InputError(f"{path}: the audio cannot be decoded ({_reason(exc)})") from None
    samples = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    if len(samples) < rate // 30:
        raise InputError(f"{path}: the audio is empty (no samples)" if len(samples) == 0
                         else f"{path}: the audio is shorter than one video frame")
    return samples


def pcm16(samples: np.ndarray) -> np.ndarray:
    """float32 throughout (scaling by 2^15 is exact): no float64 copies of a long recording."""
    scaled = np.asarray(samples, np.float32) * np.float32(32768)
    np.round(scaled, out=scaled)
    np.clip(scaled, -32768, 32767, out=scaled)
    return scaled.astype("<i2")


def quantised(samples: np.ndarray) -> np.ndarray:
    """The samples exactly as `decode` reads them back from `write_wav`'s file, so motion made from either is the
    same."""
    return pcm16(samples).astype(np.float32) / np.float32(32768)


def check(path: Path) -> None:
    """Refuse, quickly, a file that is not audio or holds no samples (decodes only until one video frame's worth)."""
    import av

    with _open_audio(path) as container:
        got = 0
        try:
            for frame in container.decode(container.streams.audio[0]):
                got += frame.samples / (frame.sample_rate or 1)
                if got >= 1 / 30:
                    return
        except av.error.FFmpegError as exc:
            raise InputError(f"{path}: the audio cannot be decoded ({_reason(exc)})") from None
    raise InputError(f"{path}: the audio is empty (no samples)" if got == 0
                     else f"{path}: the audio is shorter than one video frame")


def write_wav(path: Path, samples: np.ndarray, rate: int = SAMPLE_RATE) -> None:
    """16-bit mono PCM, what the render muxes."""
    pcm = pcm16(samples)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


def _reason(exc: BaseException) -> str:
    return str(getattr(exc, "strerror", None) or exc).splitlines()[0]
