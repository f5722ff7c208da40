"""matting: a temporally smoothed alpha matte per frame, and the foreground on black that pretraining uses.

Backends: MediaPipe selfie segmentation (bundled, the default) or Robust Video Matting from a local TorchScript
file (`matting.rvm_weights`), loaded with torch.jit so no third-party model code is needed.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from core.errors import StageError
from core.progress import Progress
from core.section import Section
from core.stage import Stage
from tasks.frames import clip_frame_paths, frame_name, read_meta, read_rgb, write_jpeg, write_png_gray
from tasks.workers import MEDIAPIPE_JOBS_PER_PROCESS, Reporter, run_parallel


class MattingParams(Section):
    backend: Literal["auto", "selfie", "rvm"] = Field("auto", description="auto = rvm when rvm_weights is set, "
                                                      "else MediaPipe selfie segmentation")
    rvm_weights: str | None = Field(None, description="local Robust Video Matting TorchScript file")
    rvm_downsample_ratio: float = Field(0.4, gt=0, le=1)
    selfie_model: Literal[0, 1] = Field(0, description="0 general (256x256), 1 landscape (144x256)")
    temporal_window: int = Field(5, ge=1, le=31, description="frames averaged, centred, to smooth alpha (odd)")
    jpeg_quality: int = Field(95, ge=50, le=100)
    workers: int = Field(2, ge=1, le=64)

    @model_validator(mode="after")
    def _check(self) -> MattingParams:
        if self.temporal_window % 2 == 0:
            raise ValueError(f"temporal_window = {self.temporal_window}: must be odd")
        if self.backend == "rvm" and not self.rvm_weights:
            raise ValueError("backend = 'rvm' needs rvm_weights (a local TorchScript file)")
        return self


def describe(s: dict[str, Any]) -> str:
    return f"{s['backend']}, {s['frames']} frames"


STAGE = Stage(
    "matting", flow="onboard", inputs=("ingest",), params=MattingParams, resource="cpu", weights=("rvm_weights",),
    describe=describe, outputs=("alpha/", "foreground/"),
    description="temporally smoothed alpha and foreground on black")


class _Selfie:
    def __init__(self, model: int) -> None:
        from tasks.mp import solutions

        self._seg = solutions().selfie_segmentation.SelfieSegmentation(model_selection=model)

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        return np.clip(self._seg.process(rgb).segmentation_mask, 0.0, 1.0).astype(np.float32)


class _RVM:
    """Recurrent: its hidden state carries across the frames of a clip."""

    def __init__(self, weights: str, downsample_ratio: float) -> None:
        import torch

        torch.set_num_threads(1)
        self._torch = torch
        self._model = torch.jit.load(weights, map_location="cpu").eval()
        self._rec: list[Any] = [None] * 4
        self._ratio = downsample_ratio

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        torch = self._torch
        src = torch.from_numpy(rgb).permute(2, 0, 1)[None].float().div(255)
        with torch.no_grad():
            _fgr, pha, *self._rec = self._model(src, *self._rec, self._ratio)
        return pha[0, 0].clamp(0, 1).numpy().astype(np.float32)


def _clip(job: tuple[dict[str, Any], list[str], str, dict[str, Any]], report: Reporter) -> dict[str, Any]:
    clip, paths, out, p = job
    model = _RVM(p["rvm_weights"], p["rvm_downsample_ratio"]) if p["backend"] == "rvm" else _Selfie(p["selfie_model"])
    alpha_dir = Path(out) / "alpha" / clip["name"]
    fg_dir = Path(out) / "foreground" / clip["name"]
    alpha_dir.mkdir(parents=True)
    fg_dir.mkdir(parents=True)
    half = p["temporal_window"] // 2
    buf: deque[tuple[np.ndarray, np.ndarray]] = deque()  # (frame, raw mask) for indices start..start+len-1
    start = 0
    coverage = []

    def emit(center: int) -> None:
        lo, hi = max(start, center - half), min(start + len(buf) - 1, center + half)
        alpha = np.mean([buf[i - start][1] for i in range(lo, hi + 1)], axis=0)
        a8 = np.round(alpha * 255).astype(np.uint8)
        frame = buf[center - start][0]
        write_png_gray(alpha_dir / frame_name(center, "png"), a8)
        fg = (frame.astype(np.uint16) * a8[..., None] + 127) // 255
        write_jpeg(fg_dir / frame_name(center), fg.astype(np.uint8), p["jpeg_quality"])
        coverage.append(float(a8.mean()) / 255)
        report()

    n = len(paths)
    next_out = 0
    for i, path in enumerate(paths):
        rgb = read_rgb(Path(path))
        buf.append((rgb, model(rgb)))
        while next_out <= i - half:  # the window around next_out is complete
            emit(next_out)
            next_out += 1
            while next_out - half > start:  # drop what no later window needs
                buf.popleft()
                start += 1
    while next_out < n:
        emit(next_out)
        next_out += 1
    return {"clip": clip["name"], "coverage": round(float(np.mean(coverage)) if coverage else 0.0, 4)}


def run(inputs: dict[str, Path], out: Path, params: MattingParams, progress: Progress) -> dict[str, Any]:
    ingest = inputs["ingest"]
    meta = read_meta(ingest)
    p = params.model_dump()
    if p["backend"] == "auto":
        p["backend"] = "rvm" if params.rvm_weights else "selfie"
    if p["backend"] == "rvm":
        weights = inputs.get("rvm_weights")
        if weights is None or not weights.is_file():
            raise StageError(f"matting.rvm_weights: no such file: {params.rvm_weights}")
        p["rvm_weights"] = str(weights)
    jobs = [(clip, [str(x) for x in clip_frame_paths(ingest, clip)], str(out), p) for clip in meta["clips"]]
    progress.start(f"matting: {p['backend']}", meta["frames"])
    results = run_parallel(_clip, jobs, params.workers, progress, jobs_per_process=MEDIAPIPE_JOBS_PER_PROCESS)
    return {"backend": p["backend"], "frames": meta["frames"],
            "person_coverage": {r["clip"]: r["coverage"] for r in results}}
