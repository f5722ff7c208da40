"""source: the video as given, copied into the workspace so the identity is reproducible and auditable from it."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

from core.progress import Progress
from core.stage import Stage
from tasks import video as vio

_CHUNK = 1 << 20


def describe(s: dict[str, Any]) -> str:
    return f"{s['original_name']}, sha256 {s['source_sha256'][:12]}"


STAGE = Stage(
    "source", flow="onboard", external="video", in_dvc=False, outputs=("video.*",), describe=describe,
    description="the video as given, copied in and hashed (tracked with `dvc add`)")


def run(inputs: dict[str, Path], out: Path, params: None, progress: Progress, *, video: Path) -> dict[str, Any]:
    info = vio.probe(video)
    suffix = video.suffix.lower() if video.suffix and len(video.suffix) <= 6 else ".mp4"
    target = out / f"video{suffix}"
    digest = hashlib.sha256()
    size = video.stat().st_size
    progress.start("source: copy", max(1, size // _CHUNK))
    with open(video, "rb") as src, open(target, "wb") as dst:
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            dst.write(chunk)
            progress.advance()
    shutil.copystat(video, target, follow_symlinks=True)
    return {
        "file": target.name,
        "source_sha256": digest.hexdigest(),
        "original_name": video.name,
        "bytes": size,
        "codec": info.codec,
        "width": info.width,
        "height": info.height,
        "rotation": info.rotation,
        "duration_s": round(info.duration, 4),
        "has_audio": info.has_audio,
    }


def source_file(source_dir: Path) -> Path:
    files = sorted(source_dir.glob("video.*"))
    if len(files) != 1:
        raise FileNotFoundError(f"{source_dir}: expected exactly one video.* file")
    return files[0]
