"""params.yaml: every knob, one section per stage, validated on load.

A section's values (and their hash) go into the cache key of its stage, so only the stages whose section changed
are recomputed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from core.errors import ParamsError
from core.hashing import hash_obj


class Section(BaseModel):
    # strict: YAML already gives native types, so `true` for a number or "5" for an int is a mistake to report
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    def digest(self) -> str:
        return hash_obj(self.model_dump(mode="json"))


class StorageParams(Section):
    remote: str = Field(".anchor/dvc-remote", description="DVC remote: a local directory (relative to the "
                        "workspace) or a URL such as s3://bucket/anchors")


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


class KeypointsParams(Section):
    model_complexity: Literal[1] = Field(1, description="MediaPipe pose model; 0 and 2 need downloads, so only 1")
    refine_face_landmarks: bool = Field(True, description="478 face points with irises instead of 468")
    min_detection_confidence: float = Field(0.5, ge=0, le=1)
    min_tracking_confidence: float = Field(0.5, ge=0, le=1)
    workers: int = Field(2, ge=1, le=64, description="processes, one clip each at a time")


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


class BodyModelParams(Section):
    path: str | None = Field(None, description="real SMPL-X files (SMPLX_NEUTRAL.npz/.pkl, or a folder holding "
                             "one); empty = the license-free mannequin the project generates")


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
    seed: int = Field(0, ge=0)


class PerturbParams(Section):
    copies: int = Field(1, ge=0, le=16, description="perturbed versions of each training clip")
    sigma_transl: float = Field(0.01, ge=0, le=1, description="per-frame position noise, metres (paper §V-C6)")
    sigma_pose: float = Field(0.0, ge=0, le=1, description="optional per-frame body pose noise, radians")
    seed: int = Field(0, ge=0)


class RenderMeshParams(Section):
    resolution: int | None = Field(None, ge=32, le=2048, description="body condition side; empty = the ingest "
                                   "crop side")
    face_size: Literal[256, 512] = Field(256, description="side of the aligned face crop")
    ambient: float = Field(0.3, ge=0, le=1)
    max_face_yaw: float = Field(75.0, gt=0, le=180, description="degrees; a head turned further away is marked "
                                "as having no visible face")
    png_level: int = Field(1, ge=0, le=9, description="PNG compression level (speed over size)")
    workers: int = Field(2, ge=1, le=64, description="threads encoding images")


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    profile: Literal["tiny", "cpu", "sd15"] = Field("tiny", description="model profile (DESIGN §6)")
    storage: StorageParams = StorageParams()
    ingest: IngestParams = IngestParams()
    keypoints: KeypointsParams = KeypointsParams()
    matting: MattingParams = MattingParams()
    body_model: BodyModelParams = BodyModelParams()
    smplx_fit: SmplxFitParams = SmplxFitParams()
    perturb: PerturbParams = PerturbParams()
    render_mesh: RenderMeshParams = RenderMeshParams()

    def section(self, name: str) -> Section:
        value = getattr(self, name)
        if not isinstance(value, Section):
            raise KeyError(name)
        return value


def _field_names(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            break
        model = field.annotation
    return sorted(model.model_fields)


def _one_line(err: ValidationError, source: str) -> str:
    e = err.errors()[0]
    loc = tuple(e["loc"])
    key = ".".join(str(p) for p in loc) or "(top level)"
    value = e.get("input")
    if e["type"] == "extra_forbidden":
        allowed = ", ".join(_field_names(Params, loc[:-1]))
        return f"{source}: unknown key {key} (= {value!r}); allowed here: {allowed}"
    msg = e["msg"].removeprefix("Value error, ")
    if isinstance(value, dict):
        return f"{source}: {key}: {msg}"
    return f"{source}: {key} = {value!r}: {msg}"


def parse_params(data: Any, source: str = "params.yaml") -> Params:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    try:
        return Params.model_validate(data)
    except ValidationError as err:
        raise ParamsError(_one_line(err, source)) from None


def load_params(path: Path) -> Params:
    if not path.is_file():
        raise ParamsError(f"{path}: not found (run `anchor init` to create a workspace)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "cannot be parsed"
        raise ParamsError(f"{path.name}: not valid YAML{where}: {problem}") from None
    return parse_params(data, path.name)


def default_params_yaml() -> str:
    """params.yaml with every default and its description, as `anchor init` writes it."""
    lines = ["# Every knob of the pipeline, one section per stage (DESIGN §4). Validated on load.",
             "# A stage reruns when its own section changes; nothing else does.", ""]
    defaults = Params()
    for name, field in Params.model_fields.items():
        value = getattr(defaults, name)
        if isinstance(value, Section):
            lines.append(f"{name}:")
            for sub, sfield in type(value).model_fields.items():
                dumped = yaml.safe_dump({sub: getattr(value, sub)}, default_flow_style=True, width=10_000)
                text = dumped.strip()[1:-1]
                comment = f"  # {sfield.description}" if sfield.description else ""
                lines.append(f"  {text}{comment}")
        else:
            comment = f"  # {field.description}" if field.description else ""
            lines.append(f"{name}: {value}{comment}")
        lines.append("")
    return "\n".join(lines)
