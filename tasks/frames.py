"""The on-disk form of frames shared by stages: one JPEG per frame, one directory per clip."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np

META = "meta.json"


def frame_name(index: int, ext: str = "jpg") -> str:
    return f"{index:06d}.{ext}"


def write_jpeg(path: Path, rgb: np.ndarray, quality: int) -> None:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise OSError(f"cannot encode {path}")
    path.write_bytes(buf.tobytes())


def write_png_gray(path: Path, gray: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", gray, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise OSError(f"cannot encode {path}")
    path.write_bytes(buf.tobytes())


def read_rgb(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise OSError(f"cannot read image {path}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_meta(ingest_dir: Path) -> dict[str, Any]:
    return json.loads((ingest_dir / META).read_text())


def clip_frame_paths(ingest_dir: Path, clip: dict[str, Any]) -> list[Path]:
    return [ingest_dir / "frames" / clip["name"] / frame_name(i) for i in range(clip["frames"])]
