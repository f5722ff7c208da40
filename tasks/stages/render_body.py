"""render_body: the identity's body SGDM driven by a motion, over its whole length (paper Algorithm 1).

Mesh conditions are rendered once, exactly as for training (the identity's camera and shape, render_mesh's
settings, scaled to the checkpoint's resolution) and written beside the frames; every denoising window reads its
own from disk, so memory holds only the latent array however long the motion. After the last step, frames are
decoded window by window and written as PNGs for the face and assemble stages.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import cv2
import numpy as np
from pydantic import Field

from core.errors import StageError
from core.progress import Progress
from core.stage import Stage
from models.raster import MeshRasterizer
from tasks import smplx_table
from tasks.base_weights import quiet
from tasks.denoising import WindowParams, torch_dtype
from tasks.devices import Compute
from tasks.frames import ImageFiles, frame_name, read_meta, read_rgb, write_png
from tasks.stages.render_mesh import pose_chunks

FRAMES = "frames"
COND = "cond"


class RenderBodyParams(WindowParams):
    """Algorithm 1 over the whole motion. Paper defaults: window 16, overlap 4, 20 DDIM steps, CFG 3.5, W_c 2
    (CFG 1 and W_c 1 on the cpu profile)."""

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
    strength: dict[str, float] = Field(
        {"tiny": 1.0, "cpu": 0.25, "sd15": 1.0}, description="with a checkpoint that has a predictor (finetune."
        "predictor_steps): how far the predictor's frame is noised before the SGDM refines it, per profile (0 = the "
        "prediction as it is, 1 = from pure noise as without one; the share of `steps` that run; cpu: SSIM in the "
        "person 0.692 / 0.695 / 0.689 / 0.676 at 0 / 0.25 / 0.5 / 1 on the seated clip's held-out frames)")
    reference_frame: int = Field(0, ge=0, description="index of the identity's training frame used as reference "
                                 "(the SGDM's; a predictor starts from the frame it keeps, finetune."
                                 "predictor_reference)")
    seed: int = Field(0, ge=0)


def describe(s: dict[str, Any]) -> str:
    text = f"{s['frames']} frames at {s['resolution']} px, {s['frame_evals_per_step']} frame evaluations per step"
    if s.get("predictor"):  # summaries of renders before the predictor lack the key
        text += (f"; predicted, then refined in {s['denoising_steps']} denoising steps" if s["denoising_steps"]
                 else "; predicted, no denoising step")
    return text


STAGE = Stage(
    "render_body", flow="render", scope="render", inputs=("motion", "finetune", "smplx_fit", "ingest"),
    params=RenderBodyParams, reads=("render_mesh",), body_model=True, resource="gpu", device=True,
    in_dvc=False, describe=describe, outputs=(f"{FRAMES}/", f"{COND}/"),
    description="batch-overlapped temporal denoising over the whole motion (Algorithm 1)")


def camera(fit_dir: Path, settings: SimpleNamespace) -> tuple[np.ndarray, int, np.ndarray]:
    """(betas (1, 10), render side, K): the identity's camera at render_mesh's resolution, as in training."""
    from models import body

    ident = smplx_table.read_identity(fit_dir / smplx_table.IDENTITY)
    cam = ident["camera"]
    side = settings.render_mesh.resolution or int(cam["size"])
    return np.asarray(ident["betas"], np.float32)[None], side, body.intrinsics(cam["focal"] * side / cam["size"], side)


def training_frames(ingest_dir: Path) -> list[Path]:
    meta = read_meta(ingest_dir)
    return [ingest_dir / "frames" / c["name"] / frame_name(i)
            for c in meta["clips"] if c["split"] == "train" for i in range(c["frames"])]


def reference_path(ingest_dir: Path, index: int) -> Path:
    frames = training_frames(ingest_dir)
    if not frames:
        raise StageError(f"{ingest_dir}: the identity has no training frames to take a reference from")
    if index >= len(frames):
        raise StageError(f"render_body.reference_frame = {index}, but the identity has {len(frames)} training "
                         f"frames")
    return frames[index]


def render_conditions(out: Path, model_file: Path, betas: np.ndarray, blocks: dict[str, np.ndarray], K: np.ndarray,
                      side: int, res: int, ambient: float, progress: Progress) -> None:
    """One condition PNG per motion frame at the model's resolution."""
    from models import body

    model = body.load(model_file)
    n = len(blocks["transl"])
    progress.start("rendering mesh conditions", n)
    with MeshRasterizer(model.faces.astype(np.int64), side, ambient=ambient) as mesh:
        for idx, verts, _ in pose_chunks(model, betas, blocks, np.arange(n)):
            for i, v in zip(idx, verts, strict=True):
                img = mesh.render(v, K)
                if side != res:
                    img = cv2.resize(img, (res, res), interpolation=cv2.INTER_AREA)
                write_png(out / frame_name(int(i), "png"), img)
            progress.advance(len(idx))


def run(inputs: dict[str, Path], out: Path, params: RenderBodyParams, progress: Progress, *,
        settings: SimpleNamespace, compute: Compute) -> dict[str, Any]:
    import torch

    from models import overlap

    quiet()
    _, blocks = smplx_table.read(inputs["motion"] / smplx_table.TABLE)
    n = len(blocks["transl"])
    betas, side, K = camera(inputs["smplx_fit"], settings)
    pipe = load_pipeline(inputs["finetune"] / "body", params, settings.profile, compute)
    res = pipe.output_resolution  # conditions at the output's side: the refiner reads them there, the SGDM halved
    (out / COND).mkdir()
    (out / FRAMES).mkdir()
    render_conditions(out / COND, inputs["body_model"], betas, blocks, K, side, res, settings.render_mesh.ambient,
                      progress)
    ref = reference_path(inputs["ingest"], params.reference_frame)

    def write(first: int, frames: np.ndarray) -> None:
        for k, img in enumerate(frames):
            write_png(out / FRAMES / frame_name(first + k, "png"), img)
        progress.advance(len(frames))

    def on_step(step: int, steps: int) -> None:
        progress.advance(1)
        if step == steps:
            progress.start("decoding frames", n)

    steps, strength = params.steps[settings.profile], params.strength[settings.profile]
    run_steps = pipe.denoising_steps(steps, strength)
    if run_steps:
        progress.start(f"denoising {n} frames", run_steps)
    else:
        progress.start("predicting frames", n)
    pipe(ImageFiles([out / COND / frame_name(i, "png") for i in range(n)]), read_rgb(ref),
         steps=steps, guidance=params.guidance[settings.profile], strength=strength,
         control_scale=params.control_scale[settings.profile], window=params.window, overlap_frames=params.overlap,
         generator=torch.Generator().manual_seed(params.seed), noise=params.noise,
         callback=on_step, output=write, max_latent_bytes=compute.max_latent_bytes, spill_dir=out)
    return {"frames": n, "resolution": res, "reference": str(ref.relative_to(inputs["ingest"])),
            "predictor": pipe.predictor is not None and run_steps < steps, "denoising_steps": run_steps,
            "windows": len(overlap.windows(n, params.window, params.overlap)),
            "frame_evals_per_step": overlap.evaluations_per_step(n, params.window, params.overlap),
            "device": compute.device.type, "dtype": str(pipe.dtype).removeprefix("torch."),
            "scheduler": params.scheduler[settings.profile]}


def load_pipeline(checkpoint: Path, params: Any, profile: str, compute: Compute) -> Any:
    """A checkpoint's pipeline on the task's device, in the profile's dtype (float32 on a CPU, where half precision
    is slow or missing), with the sampler the params name and the zero motion modules skipped."""
    import torch

    from models.sgdm_pipeline import SGDMPipeline

    dtype = torch_dtype(params.dtype[profile]) if compute.device.type != "cpu" else torch.float32
    pipe = SGDMPipeline.from_pretrained(checkpoint, torch_dtype=dtype).to(compute.device)
    pipe.sgdm.eval().skip_identity_temporal()
    pipe.vae.eval()
    pipe.image_encoder.eval()
    for part in (pipe.refiner, pipe.predictor):
        if part is not None:
            part.eval()
    pipe.use_scheduler(params.scheduler[profile])
    return pipe
