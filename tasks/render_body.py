"""render_body: the identity's body SGDM driven by a motion, over its whole length (paper Algorithm 1).

Mesh conditions are rendered once, exactly as for training (the identity's camera and shape, render_mesh's
settings, scaled to the checkpoint's resolution) and written beside the frames; every denoising window reads its
own from disk, so memory holds only the latent array however long the motion. After the last step, frames are
decoded window by window and written as PNGs for the face and assemble stages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from core.errors import StageError
from core.params import Params, RenderBodyParams
from core.progress import Progress
from models import body, overlap, pipeline
from models.base import BasePaths, load_image_encoder, load_scheduler, load_vae
from models.render import MeshRenderer
from models.sgdm import SGDM
from tasks import smplx_table
from tasks.base_models import quiet
from tasks.frames import frame_name, read_meta, read_rgb, write_png
from tasks.render_mesh import pose_chunks
from tasks.training import trained_resolution

FRAMES = "frames"
COND = "cond"


def camera(fit_dir: Path, settings: Params) -> tuple[np.ndarray, int, np.ndarray]:
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
    with MeshRenderer(model.faces.astype(np.int64), side, ambient=ambient) as mesh:
        for idx, verts, _ in pose_chunks(model, betas, blocks, np.arange(n)):
            for i, v in zip(idx, verts, strict=True):
                img = mesh.render(v, K)
                if side != res:
                    img = cv2.resize(img, (res, res), interpolation=cv2.INTER_AREA)
                write_png(out / frame_name(int(i), "png"), img)
            progress.advance(len(idx))


def run(inputs: dict[str, Path], out: Path, params: RenderBodyParams, progress: Progress, *, settings: Params,
        base: BasePaths) -> dict[str, Any]:
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
