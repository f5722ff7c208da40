"""The stage registry: the one source of truth for the DAG. dvc.yaml and the Prefect flows are built from it."""

from __future__ import annotations

from core.errors import InputError
from core.registry import StageSpec

_TRAINING = ("tasks.training", "tasks.training_data", "tasks.base_models", "models.sgdm", "models.base",
             "models.pipeline", "models.codec")

STAGES: dict[str, StageSpec] = {
    spec.name: spec
    for spec in (
        StageSpec("source", "tasks.source", external_input="video", in_dvc=False, helpers=("tasks.video",),
                  description="the video as given, copied in and hashed (tracked with `dvc add`)"),
        StageSpec("ingest", "tasks.ingest", inputs=("source",), params="ingest",
                  helpers=("tasks.video", "tasks.frames", "tasks.workers"),
                  description="constant 30 fps, stable square crop, clips, train/test split, audio"),
        StageSpec("keypoints", "tasks.keypoints", resource="cpu",
                  inputs=("ingest",), params="keypoints",
                  helpers=("tasks.frames", "tasks.workers"),
                  description="MediaPipe Holistic body 33, hands 2x21, face 478 per frame (Parquet)"),
        StageSpec("matting", "tasks.matting", resource="cpu",
                  inputs=("ingest",), params="matting",
                  helpers=("tasks.frames", "tasks.workers"), weight_params=("rvm_weights",),
                  description="temporally smoothed alpha and foreground on black"),
        StageSpec("smplx_fit", "tasks.smplx_fit", resource="cpu",
                  inputs=("ingest", "keypoints"), params="smplx_fit", body_model=True,
                  helpers=("models.body", "models.fitting", "tasks.smplx_table"),
                  description="SMPL-X fitted to the keypoints of every clip at once: one shape, one camera"),
        StageSpec("perturb", "tasks.perturb", inputs=("smplx_fit",), params="perturb",
                  helpers=("tasks.smplx_table",),
                  description="training augmentation: per-frame position (and pose) noise, seeded"),
        StageSpec("render_mesh", "tasks.render_mesh", inputs=("smplx_fit", "perturb"), params="render_mesh",
                  body_model=True, helpers=("models.body", "models.render", "models.face_align", "tasks.smplx_table"),
                  description="mesh condition images, aligned face crops, face transforms and masks"),
        StageSpec("pretrain", "tasks.pretrain", resource="gpu",
                  inputs=("ingest", "matting", "render_mesh"), params="pretrain",
                  shared=True, extra_params=("models",), base_models=True, helpers=_TRAINING,
                  description="stage 1: body and face SGDMs on every identity's foreground frames (motion frozen)"),
        StageSpec("finetune", "tasks.finetune", resource="gpu",
                  inputs=("ingest", "render_mesh", "pretrain"), params="finetune",
                  extra_params=("models",), base_models=True, helpers=_TRAINING,
                  description="stage 2: the identity's own body and face SGDMs from the pretrained ones"),
        # A render: one identity driven by one motion; owned by `<identity>/<motion key>` (data/renders/...).
        StageSpec("motion", "tasks.motion", external_input="motion", in_dvc=False, render=True,
                  helpers=("tasks.smplx_table",),
                  description="the motion a render follows (SMPL-X per frame, fitted to the identity) and its audio"),
        StageSpec("render_body", "tasks.render_body", resource="gpu",
                  inputs=("motion", "finetune", "smplx_fit", "ingest"),
                  params="render_body", in_dvc=False, render=True, body_model=True, base_models=True,
                  extra_params=("models", "render_mesh"),
                  helpers=(*_TRAINING, "models.overlap", "models.body", "models.render", "tasks.render_mesh",
                           "tasks.frames"),
                  description="batch-overlapped temporal denoising over the whole motion (Algorithm 1)"),
        StageSpec("face", "tasks.face", resource="gpu",
                  inputs=("motion", "render_body", "finetune", "smplx_fit", "ingest", "render_mesh"),
                  params="face", in_dvc=False, render=True, body_model=True, base_models=True,
                  extra_params=("models", "render_mesh"),
                  helpers=(*_TRAINING, "models.overlap", "models.body", "models.render", "models.face_align",
                           "tasks.render_mesh", "tasks.render_body", "tasks.frames"),
                  description="face crop → Face SGDM inpainting → feathered blend; hidden faces pass through"),
        StageSpec("assemble", "tasks.assemble", inputs=("motion", "render_body", "face"), params="assemble",
                  in_dvc=False, render=True, helpers=("tasks.motion", "tasks.face", "tasks.frames"),
                  description="H.264 mp4 at 30 fps with the driving audio; render.json says what shaped it"),
        StageSpec("metrics", "tasks.metrics", resource="gpu",
                  inputs=("motion", "render_body", "face", "ingest", "keypoints", "matting"),
                  params="metrics", in_dvc=False, render=True, weight_params=("inception_weights", "i3d_weights"),
                  helpers=("models.fid", "models.fvd", "models.scores", "tasks.keypoints", "tasks.face",
                           "tasks.frames"),
                  description="FID, FVD, landmark distance face/body/hand, flicker against the real frames"),
        # An identity's report: reads its artifacts and the render of its own held-out clips (`anchor evaluate`).
        StageSpec("report", "tasks.report",
                  inputs=("source", "ingest", "keypoints", "matting", "smplx_fit", "perturb", "render_mesh",
                          "finetune"),
                  params="report", external_input="evaluation", body_model=True,
                  extra_params=("models", "render_mesh", "render_body", "face", "assemble", "metrics"),
                  command="anchor evaluate {item}", dvc_outs=("report.html", "manifest.json"),
                  dvc_metrics=("metrics.json",), dvc_plots=("contact_sheet.png", "plots"),
                  helpers=("tasks.metrics", "tasks.face", "tasks.render_body", "tasks.frames", "tasks.keypoints",
                           "tasks.motion", "tasks.training", "core.ledger"),
                  description="the identity's HTML report: held-out renders scored, fit, detection, time per stage"),
    )
}


def get(name: str) -> StageSpec:
    try:
        return STAGES[name]
    except KeyError:
        raise InputError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}") from None


def downstream(name: str) -> list[str]:
    """Stages that depend on `name`, directly or not, in registry order."""
    hit = {name}
    for spec in STAGES.values():
        if hit.intersection(spec.inputs):
            hit.add(spec.name)
    return [s for s in STAGES if s in hit and s != name]
