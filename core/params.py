"""params.yaml: every knob, one section per stage, validated on load.

A section's values (and their hash) go into the cache key of its stage, so only the stages whose section changed
are recomputed.
"""

from __future__ import annotations

from collections.abc import Callable
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
    lock_wait_s: float = Field(3600.0, ge=0, description="how long a run waits for another run writing the same "
                               "artifact before it stops with a message (0 = stop at once)")


class ExecutionParams(Section):
    engine: Literal["threads", "dask"] = Field("threads", description="where stage tasks run: threads of this "
                                               "process, or Dask workers through prefect-dask")
    threads: int | None = Field(None, ge=1, le=256, description="threads engine: most stage tasks at once "
                                "(empty = Prefect's default)")
    dask_address: str | None = Field(None, description="dask engine: a running scheduler (tcp://host:8786); empty = "
                                     "a local cluster for the run")
    dask_workers: int = Field(2, ge=1, le=256, description="dask engine: worker processes of the local cluster")
    limits: dict[str, int] = Field({"gpu": 1, "cpu": 2}, description="most tasks at once per resource tag "
                                   "(Prefect tag concurrency limits anchor-<tag>; a tag left out has none)")
    retries: int = Field(2, ge=0, le=20, description="retries of a stage that failed on a transient I/O error")
    retry_delay_s: float = Field(2.0, ge=0, le=3600, description="seconds between those retries")

    @model_validator(mode="after")
    def _limits(self) -> ExecutionParams:
        bad = [k for k, v in self.limits.items() if v < 1 or not k.replace("-", "").isalnum()]
        if bad:
            raise ValueError(f"limits: tag names are letters, digits and '-', limits >= 1 (bad: {', '.join(bad)})")
        return self


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


PROFILES = ("tiny", "cpu", "sd15")


def _check_profiles(name: str, table: dict[str, float], ok: Callable[[float], bool], rule: str) -> None:
    """A table keyed by profile: one value for each, every value passing `ok` (`rule` says what it asks)."""
    missing = [p for p in PROFILES if p not in table]
    unknown = [p for p in table if p not in PROFILES]
    if missing or unknown:
        raise ValueError(f"{name} needs one value per profile ({', '.join(PROFILES)}); "
                         f"missing {missing}, unknown {unknown}")
    if not all(ok(v) for v in table.values()):
        raise ValueError(f"{name}: {rule}, got {table}")


class _Windows(Section):
    """Algorithm 1's window layout, shared by the body and face denoising."""

    window: int = Field(16, ge=1, le=128, description="frames per denoising window")
    overlap: int = Field(4, ge=0, le=127, description="frames shared by neighbouring windows")

    @model_validator(mode="after")
    def _overlap(self) -> _Windows:
        if self.overlap >= self.window:
            raise ValueError(f"overlap ({self.overlap}) must be smaller than window ({self.window})")
        for name, low, high in (("guidance", 1, 20), ("control_scale", 0, 10)):
            if hasattr(self, name):
                _check_profiles(name, getattr(self, name), lambda v, lo=low, hi=high: lo <= v <= hi,
                                f"scales must be between {low} and {high}")
        return self


class RenderBodyParams(_Windows):
    """Algorithm 1 over the whole motion. Paper defaults: window 16, overlap 4, 20 DDIM steps, CFG 3.5, W_c 2
    (CFG 1 and W_c 1 on the cpu profile)."""

    steps: int = Field(20, ge=1, le=1000, description="DDIM steps")
    guidance: dict[str, float] = Field(
        {"tiny": 3.5, "cpu": 1.0, "sd15": 3.5}, description="classifier-free guidance scale on the reference image, "
        "per profile (1 = the conditional branch only, half the cost: cpu's model learns one person, whose "
        "reference adds little)")
    control_scale: dict[str, float] = Field(
        {"tiny": 2.0, "cpu": 1.0, "sd15": 2.0}, description="W_c, weight of the mesh branch, per profile (training "
        "uses 1; cpu's model, learnt from nothing, is driven off its training range at 2: dark blocks, more flicker)")
    noise: Literal["independent", "shared"] = Field(
        "independent", description="initial noise per frame: independent (default: training noised every frame "
        "independently, and so were the frozen motion modules) or shared, one draw for all frames as the official "
        "code does (steadier backgrounds, can stick textures in place)")
    reference_frame: int = Field(0, ge=0, description="index of the identity's training frame used as reference")
    seed: int = Field(0, ge=0)


class FaceParams(_Windows):
    """Algorithm 2: crop the generated face, inpaint it with the Face SGDM, blend it back."""

    enabled: bool = Field(True, description="false: frames pass through unchanged (`anchor render --no-face`)")
    steps: int = Field(20, ge=1, le=1000)
    guidance: dict[str, float] = Field({"tiny": 3.5, "cpu": 1.0, "sd15": 3.5}, description="per profile")
    control_scale: dict[str, float] = Field({"tiny": 2.0, "cpu": 1.0, "sd15": 2.0}, description="per profile")
    feather: float = Field(0.06, ge=0, le=0.5, description="blend edge width, share of the face crop side")
    seed: int = Field(0, ge=0)


class AssembleParams(Section):
    crf: int = Field(18, ge=0, le=51, description="H.264 quality (lower = better, larger)")
    preset: Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow"] = "medium"
    audio: bool = Field(True, description="mux the driving audio when the motion has some")


class MetricsParams(Section):
    """Scores of a render against the real frames of the same motion (paper Table I, DESIGN §7)."""

    inception_weights: str | None = Field(None, description="local FID Inception-v3 weights (pytorch-fid's "
                                          "pt_inception-2015-12-05-6726825d.pth); empty = FID not computed")
    i3d_weights: str | None = Field(None, description="local TorchScript I3D for FVD (i3d_torchscript.pt); empty = "
                                    "FVD not computed")
    hand_outlier: float = Field(0.1, gt=0, le=1, description="a hand whose mean landmark distance exceeds this "
                                "share of the frame side counts as a detector failure and is left out of LMD hand")
    workers: int = Field(1, ge=1, le=64, description="MediaPipe processes")


class ReportParams(Section):
    """The per-identity report (data/reports/<identity>/): what a person opens after onboarding and training."""

    frames_per_clip: int = Field(3, ge=1, le=12, description="sample frames shown per held-out clip in the grid")
    thumbnail: int = Field(192, ge=64, le=512, description="side of each image in the grid and contact sheet, px")


class ModelsParams(Section):
    sd15: str | None = Field(None, description="local Stable Diffusion 1.5 folder (unet/, vae/, scheduler/); "
                             "profile sd15 only")
    sd15_inpaint: str | None = Field(None, description="local SD 1.5 inpainting folder (unet/ with 9 inputs)")
    image_encoder: str | None = Field(None, description="local CLIP vision encoder folder (transformers)")
    motion_adapter: str | None = Field(None, description="local AnimateDiff motion adapter folder (diffusers)")


PER_PROFILE = ("steps", "face_steps", "lr", "resolution", "face_resolution", "ema")


class TrainParams(Section):
    """Shared by pretrain and finetune; numbers keyed by profile so one file serves every machine."""

    steps: dict[str, int] = Field({"tiny": 30, "cpu": 0, "sd15": 300000}, description="body model steps (cpu: "
                                  "nothing shared to learn before the identity, so its pretrain only initialises)")
    face_steps: dict[str, int] = Field({"tiny": 30, "cpu": 0, "sd15": 300000}, description="face model steps")
    lr: dict[str, float] = Field({"tiny": 1e-3, "cpu": 2e-4, "sd15": 1e-5})
    resolution: dict[str, int] = Field({"tiny": 64, "cpu": 256, "sd15": 512}, description="body frames, px")
    face_resolution: dict[str, int] = Field({"tiny": 64, "cpu": 128, "sd15": 256}, description="face crops, px")
    ema: dict[str, float] = Field({"tiny": 0.0, "cpu": 0.995, "sd15": 0.0}, description="decay of the weight "
                                  "average kept as the result (0 = the last weights)")
    video_length: int = Field(4, ge=1, le=32, description="frames per training clip (paper: 4)")
    batch_size: int = Field(1, ge=1, le=256)
    grad_accum: int = Field(1, ge=1, le=1024)
    warmup: int = Field(0, ge=0, description="linear learning-rate warm-up steps")
    ref_drop: float = Field(0.1, ge=0, le=1, description="share of samples trained without the reference image, "
                            "so classifier-free guidance has a trained unconditional branch")
    perturbed_share: float = Field(0.5, ge=0, le=1, description="share of samples conditioned on a perturbed mesh")
    save_every: int = Field(100, ge=1, description="steps between resumable training states")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="autocast on GPUs")
    gradient_checkpointing: bool = False
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _profiles(self) -> TrainParams:
        for name in PER_PROFILE:
            if name == "ema":
                _check_profiles(name, self.ema, lambda v: 0 <= v < 1, "decays must be in [0, 1)")
            else:
                _check_profiles(name, getattr(self, name), lambda v: v >= 0, "values must not be negative")
        return self

    def for_profile(self, profile: str) -> dict[str, float]:
        return {n: getattr(self, n)[profile] for n in PER_PROFILE}


class PretrainParams(TrainParams):
    pass


class FinetuneParams(TrainParams):
    steps: dict[str, int] = Field({"tiny": 30, "cpu": 3000, "sd15": 50000}, description="body model steps")
    face_steps: dict[str, int] = Field({"tiny": 30, "cpu": 1200, "sd15": 80000}, description="face model steps")


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    profile: Literal["tiny", "cpu", "sd15"] = Field("cpu", description="model profile: cpu learns one person "
                                                    "from scratch on a laptop CPU; sd15 needs local SD 1.5 "
                                                    "weights and a GPU; tiny proves the plumbing in seconds")
    storage: StorageParams = StorageParams()
    execution: ExecutionParams = ExecutionParams()
    ingest: IngestParams = IngestParams()
    keypoints: KeypointsParams = KeypointsParams()
    matting: MattingParams = MattingParams()
    body_model: BodyModelParams = BodyModelParams()
    smplx_fit: SmplxFitParams = SmplxFitParams()
    perturb: PerturbParams = PerturbParams()
    render_mesh: RenderMeshParams = RenderMeshParams()
    models: ModelsParams = ModelsParams()
    pretrain: PretrainParams = PretrainParams()
    finetune: FinetuneParams = FinetuneParams()
    render_body: RenderBodyParams = RenderBodyParams()
    face: FaceParams = FaceParams()
    assemble: AssembleParams = AssembleParams()
    metrics: MetricsParams = MetricsParams()
    report: ReportParams = ReportParams()

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
