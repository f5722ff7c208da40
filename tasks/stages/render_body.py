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
import torch
from pydantic import Field

from core.errors import StageError
from core.progress import Progress
from core.stage import Stage
from models import body, overlap, pipeline
from models.parts import BasePaths, load_image_encoder, load_scheduler, load_vae
from models.raster import MeshRasterizer
from models.sgdm import SGDM
from tasks import smplx_table
from tasks.base_weights import quiet
from tasks.denoising import WindowParams
from tasks.frames import frame_name, read_meta, read_rgb, write_png
from tasks.stages.render_mesh import pose_chunks
from tasks.training import trained_resolution

FRAMES = "frames"
COND = "cond"


class RenderBodyParams(WindowParams):
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


def describe(s: dict[str, Any]) -> str:
    return f"{s['frames']} frames at {s['resolution']} px, {s['frame_evals_per_step']} frame evaluations per step"


STAGE = Stage(
    "render_body", flow="render", scope="render", inputs=("motion", "finetune", "smplx_fit", "ingest"),
    params=RenderBodyParams, reads=("models", "render_mesh"), body_model=True, base_weights=True, resource="gpu",
    in_dvc=False, describe=describe, outputs=(f"{FRAMES}/", f"{COND}/"),
    description="batch-overlapped temporal denoising over the whole motion (Algorithm 1)")


def camera(fit_dir: Path, settings: SimpleNamespace) -> tuple[np.ndarray, int, np.ndarray]:
    """(betas (1, 10), render side, K): the identity's camera at render_mesh's resolution, as in training."""
    ident = smplx_table.read_identity(fit_dir / smplx_table.IDENTITY)
    cam = ident["camera"]
    side = settings.render_mesh.resolution or int(cam["size"])
    return np.asarray(ident["betas"], np.float32)[None], side, body.intrinsics(cam["focal"] * side / cam["size"], side)


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """RGB uint8 images → (1, 3, F, H, W) in [0, 1]."""
    return torch.from_numpy(np.stack(images)).permute(3, 0, 1, 2)[None].float() / 255


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
        settings: SimpleNamespace, base: BasePaths) -> dict[str, Any]:
    quiet()
    _, blocks = smplx_table.read(inputs["motion"] / smplx_table.TABLE)
    n = len(blocks["transl"])
    betas, side, K = camera(inputs["smplx_fit"], settings)
    checkpoint = inputs["finetune"] / "body"
    res = trained_resolution(checkpoint)
    (out / COND).mkdir()
    (out / FRAMES).mkdir()
    render_conditions(out / COND, inputs["body_model"], betas, blocks, K, side, res, settings.render_mesh.ambient,
                      progress)

    model = SGDM.from_pretrained(checkpoint).eval()
    model.skip_identity_temporal()
    vae, encoder, scheduler = load_vae(base).eval(), load_image_encoder(base).eval(), load_scheduler(base)
    ref = reference_path(inputs["ingest"], params.reference_frame)
    tokens = pipeline.encode_reference(encoder, to_tensor([read_rgb(ref, res)])[:, :, 0])

    def predict(x: torch.Tensor, t: torch.Tensor, w: slice) -> torch.Tensor:
        cond = to_tensor([read_rgb(out / COND / frame_name(i, "png")) for i in range(w.start, w.stop)])
        return pipeline.predict_noise(model, x, t, tokens, cond, params.guidance[settings.profile],
                                      params.control_scale[settings.profile])

    f = pipeline.vae_factor(vae)
    gen = torch.Generator().manual_seed(params.seed)
    latents = pipeline.initial_latents((1, vae.config.latent_channels, n, res // f, res // f), gen,
                                       shared=params.noise == "shared")
    scheduler.set_timesteps(params.steps)
    latents = latents * scheduler.init_noise_sigma
    progress.start(f"denoising {n} frames", params.steps)
    latents = overlap.denoise(predict, latents, scheduler, params.window, params.overlap,
                              on_step=lambda _i: progress.advance(1))

    progress.start("decoding frames", n)
    for w in overlap.windows(n, params.window, 0):
        frames = pipeline.decode_latents(vae, latents[:, :, w])[0]  # (3, F, H, W)
        for k, img in enumerate((frames.permute(1, 2, 3, 0) * 255).round().to(torch.uint8).numpy()):
            write_png(out / FRAMES / frame_name(w.start + k, "png"), img)
        progress.advance(w.stop - w.start)
    return {"frames": n, "resolution": res, "reference": str(ref.relative_to(inputs["ingest"])),
            "windows": len(overlap.windows(n, params.window, params.overlap)),
            "frame_evals_per_step": overlap.evaluations_per_step(n, params.window, params.overlap)}
