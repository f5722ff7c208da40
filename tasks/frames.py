"""The on-disk form of frames shared by stages: one JPEG per frame, one directory per clip."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, overload

import cv2
import numpy as np

META = "meta.json"
HANDS = "hands.parquet"  # render_mesh's hand squares per frame, read by training (named here: cheap to import)
HAND = "hand"  # the hand model's folder in a finetune checkpoint, written by training, read by the hands stage
FACE_JAW = "face_jaw"  # render_mesh's face crops with the jaw coloured: the face detail model's condition
FACE_DETAIL = "face_detail"  # the face detail model's folder in a finetune checkpoint, read by the face stage


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


def read_rgb(path: Path, size: int | None = None) -> np.ndarray:
    """RGB uint8; resized to size × size with INTER_AREA (as the training data is) when `size` is given."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise OSError(f"cannot read image {path}")
    if size is not None and img.shape[:2] != (size, size):
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def write_png(path: Path, rgb: np.ndarray) -> None:
    """Lossless RGB frame (fast compression: these are intermediate frames)."""
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 1]):
        raise OSError(f"cannot write {path}")


def read_meta(ingest_dir: Path) -> dict[str, Any]:
    return json.loads((ingest_dir / META).read_text())


def clip_frame_paths(ingest_dir: Path, clip: dict[str, Any]) -> list[Path]:
    return [ingest_dir / "frames" / clip["name"] / frame_name(i) for i in range(clip["frames"])]


class ImageFiles(Sequence[np.ndarray]):
    """Images read from disk only when asked for (a pipeline reads one window at a time): RGB, or grayscale."""

    def __init__(self, paths: list[Path], gray: bool = False, transform: Callable[[int, np.ndarray], np.ndarray]
                 | None = None) -> None:
        self.paths, self.gray, self.transform = paths, gray, transform

    def __len__(self) -> int:
        return len(self.paths)

    @overload
    def __getitem__(self, i: int) -> np.ndarray: ...

    @overload
    def __getitem__(self, i: slice) -> list[np.ndarray]: ...

    def __getitem__(self, i: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if self.gray:
            img = cv2.imread(str(self.paths[i]), cv2.IMREAD_GRAYSCALE)
            if img is None:
                raise OSError(f"cannot read image {self.paths[i]}")
        else:
            img = read_rgb(self.paths[i])
        return self.transform(i, img) if self.transform else img
