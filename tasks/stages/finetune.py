"""finetune: from the pretrained checkpoints, one identity's full frames (foreground and background), body and face
(stage 2), its hand model (the hand stage's, learnt from nothing on its own hand crops) and its face detail model
(the face stage's, likewise on its face crops). Each run is a new version
of the identity's models, a DVC output of this stage."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from pydantic import Field, model_validator

from core.progress import Progress
from core.stage import Stage
from tasks.devices import Compute
from tasks.train_params import TrainParams, describe

if TYPE_CHECKING:
    from models.parts import BasePaths


class FinetuneParams(TrainParams):
    """Stage 2 on one identity; the cascade's refiner and the predictor (the cpu profile's) learn here, on the
    identity's frames."""

    steps: dict[str, int] = Field({"tiny": 30, "cpu": 1700, "sd15": 50000}, description="body model steps")
    face_steps: dict[str, int] = Field({"tiny": 30, "cpu": 600, "sd15": 80000}, description="face model steps")
    refiner_steps: dict[str, int] = Field(
        {"tiny": 0, "cpu": 500, "sd15": 0}, description="steps of the 2× refiner learnt on the identity's frames "
        "(0 = none: the body SGDM renders at `resolution`; else the SGDM renders at half of it and the refiner makes "
        "the rest; cpu: the SGDM's 32 × 32 latent grid is sharp at 128 px, blocky at 256)")
    refiner_lr: float = Field(1e-3, gt=0, le=1, description="the refiner's learning rate (cosine decay to a tenth)")
    predictor_steps: dict[str, int] = Field(
        {"tiny": 0, "cpu": 1500, "sd15": 0}, description="steps of the predictor learnt on the identity's frames "
        "(0 = none: the SGDM samples from noise; else it refines the predictor's frame from `render_body.strength`; "
        "cpu: a model learnt from nothing in minutes samples a blurred mean, a regressor learns the mean in ~2.5 "
        "minutes)")
    predictor_lr: float = Field(3e-4, gt=0, le=1, description="the predictor's and the hand model's learning rate "
                                "(cosine decay to a tenth)")
    predictor_ssim: float = Field(0.5, ge=0, description="weight of 1 − SSIM beside L1 in the predictor's and the "
                                  "hand model's loss")
    hand_steps: dict[str, int] = Field(
        {"tiny": 10, "cpu": 600, "sd15": 600}, description="steps of the hand model learnt on the identity's hand "
        "crops (render_mesh.hand_size), which the hands stage redraws the body's hands with (0 = none: hands stay "
        "as the body drew them; seated clip, ~670 crops at 64 px: 600 steps found more hands and scored higher "
        "SSIM than 2,400)")
    face_detail_steps: dict[str, int] = Field(
        {"tiny": 10, "cpu": 1200, "sd15": 0}, description="steps of the face detail model learnt on the identity's "
        "face crops (render_mesh's jaw-coloured `face_jaw/` at face_resolution), which the face stage redraws the "
        "body's face with where `face.redraw` says so (0 = none: the Face SGDM inpaints; cpu: a Face SGDM learnt in "
        "minutes draws a blurred face, docs/cpu-profile.md)")
    predictor_reference: int = Field(0, ge=0, description="index of the identity's training frame the predictor "
                                     "learns against and keeps in the checkpoint (every prediction starts from it)")

    @model_validator(mode="after")
    def _cascade(self) -> FinetuneParams:
        odd = [p for p, n in self.refiner_steps.items() if n and self.resolution[p] % 8]
        if odd:
            raise ValueError(f"resolution of {', '.join(odd)}: with a refiner the body model renders at half the "
                             f"side, so the side must be a multiple of 8, got {self.resolution}")
        return self


STAGE = Stage(
    "finetune", flow="finetune", inputs=("ingest", "render_mesh", "pretrain"), params=FinetuneParams,
    reads=("models",), base_weights=True, home="checkpoints", resource="gpu", device=True,
    resumable=True, encodings=True, describe=describe, outputs=("body/", "face/", "hand/?", "face_detail/?"),
    description="stage 2: the identity's own body and face SGDMs from the pretrained ones, its hand and face "
    "detail models")


def run(inputs: dict[str, Path], out: Path, params: FinetuneParams, progress: Progress, *,
        settings: SimpleNamespace, base: BasePaths, scratch: Path, encoded: Path, compute: Compute) -> dict[str, Any]:
    from tasks.training import train_face_detail, train_hands, train_models

    sources = [("identity", inputs["ingest"], inputs["render_mesh"], inputs["ingest"])]
    summary = train_models(sources, settings, params, base, out, scratch, encoded, progress, compute,
                           start=inputs["pretrain"])
    prof = params.for_profile(settings.profile)
    if steps := int(prof["hand_steps"]):
        progress.start("training the hand model", steps)
        summary["hand"] = train_hands(inputs["ingest"], inputs["render_mesh"], steps, params, compute.device,
                                      scratch / "hand", out, lambda: progress.advance(1),
                                      save_every=int(prof["save_every"]))
    if steps := int(prof["face_detail_steps"]):
        progress.start("training the face detail model", steps)
        summary["face_detail"] = train_face_detail(inputs["ingest"], inputs["render_mesh"],
                                                   int(prof["face_resolution"]), steps, params, compute.device,
                                                   scratch / "face_detail", out, lambda: progress.advance(1),
                                                   save_every=int(prof["save_every"]))
    return summary
