"""face: the generated face redone by the Face SGDM (paper Algorithm 2): crop → inpaint → blend.

Per frame of the motion, the face transform comes from the mesh exactly as render_mesh makes it for training (five
projected landmarks, render_mesh's face_size), rescaled to the generated frame and the face model's resolution.
Runs of consecutive frames with a visible face are inpainted as videos with the same overlapped windows as the body
(the face model has the motion modules too), conditioned on the face mesh crop and the identity's own face as
reference, then pasted back through the inverse transform under a feathered face mask. Frames whose face is out
of view or turned away pass through unchanged, as do all frames when the stage is disabled. Only the frames it
changed are written; assemble takes the rest from render_body.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import Field

from core.errors import StageError
from core.progress import Progress
from core.stage import Stage
from models import body, face_align, overlap, pipeline
from models.parts import BasePaths, load_image_encoder, load_scheduler, load_vae
from models.raster import MeshRasterizer
from models.sgdm import SGDM
from tasks import smplx_table
from tasks.base_weights import quiet
from tasks.denoising import WindowParams
from tasks.frames import frame_name, read_meta, read_rgb, write_png
from tasks.stages import render_body
from tasks.stages.render_mesh import FACES, face_state, head_faces, pose_chunks
from tasks.training import trained_resolution

FRAMES = "frames"
COND = "cond"
MASK = "mask"
TABLE = "faces.parquet"


class FaceParams(WindowParams):
    """Algorithm 2: crop the generated face, inpaint it with the Face SGDM, blend it back."""

    enabled: bool = Field(True, description="false: frames pass through unchanged (`anchor render --no-face`)")
    steps: int = Field(20, ge=1, le=1000)
    guidance: dict[str, float] = Field({"tiny": 3.5, "cpu": 1.0, "sd15": 3.5}, description="per profile")
    control_scale: dict[str, float] = Field({"tiny": 2.0, "cpu": 1.0, "sd15": 2.0}, description="per profile")
    feather: float = Field(0.06, ge=0, le=0.5, description="blend edge width, share of the face crop side")
    seed: int = Field(0, ge=0)


def describe(s: dict[str, Any]) -> str:
    return "disabled" if s.get("disabled") else f"{s['enhanced']} of {s['frames']} faces redone"


STAGE = Stage(
    "face", flow="render", scope="render",
    inputs=("motion", "render_body", "finetune", "smplx_fit", "ingest", "render_mesh"), params=FaceParams,
    reads=("models", "render_mesh"), body_model=True, base_weights=True, resource="gpu", in_dvc=False,
    describe=describe, outputs=(f"{FRAMES}/?", f"{COND}/?", f"{MASK}/?", TABLE),
    description="face crop → Face SGDM inpainting → feathered blend; hidden faces pass through")


def _write_table(out: Path, reasons: list[str | None], transforms: list[np.ndarray | None]) -> None:
    pq.write_table(pa.table({
        "frame": pa.array(np.arange(len(reasons)), pa.int32()),
        "visible": pa.array([r is None for r in reasons]),
        "reason": pa.array(reasons, pa.string()),
        "transform": pa.array([None if m is None else m.ravel().astype(np.float32).tolist() for m in transforms],
                              pa.list_(pa.float32())),
    }), out / TABLE)


def final_frames(render_body_dir: Path, face_dir: Path, n: int) -> list[Path]:
    """A render's finished frames: this stage's where it redid the face, render_body's everywhere else."""
    body, redone = render_body_dir / render_body.FRAMES, face_dir / FRAMES
    return [redone / frame_name(i, "png") if (redone / frame_name(i, "png")).is_file()
            else body / frame_name(i, "png") for i in range(n)]


def runs(visible: list[bool]) -> list[slice]:
    """Maximal stretches of consecutive frames with a visible face."""
    out, start = [], None
    for i, v in enumerate([*visible, False]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            out.append(slice(start, i))
            start = None
    return out


def reference_face(ingest_dir: Path, render_dir: Path, fres: int) -> np.ndarray:
    """The identity's first visible training face, cropped as the face model's training data was."""
    tab = pq.read_table(render_dir / FACES).to_pandas()
    train = {c["name"] for c in read_meta(ingest_dir)["clips"] if c["split"] == "train"}
    rows = tab[tab["visible"] & tab["clip"].isin(train)]
    if rows.empty:
        raise StageError("face: the identity shows no visible face in its training clips; render with --no-face")
    row = rows.iloc[0]
    m = np.asarray(row["transform"], np.float64).reshape(2, 3)
    size = cv2.imread(str(render_dir / "face" / row["clip"] / frame_name(int(row["frame"]), "png"))).shape[0]
    full = read_rgb(ingest_dir / "frames" / row["clip"] / frame_name(int(row["frame"])))
    crop = cv2.warpAffine(full, m, (size, size), flags=cv2.INTER_LINEAR)
    return cv2.resize(crop, (fres, fres), interpolation=cv2.INTER_AREA)


def run(inputs: dict[str, Path], out: Path, params: FaceParams, progress: Progress, *,
        settings: SimpleNamespace, base: BasePaths) -> dict[str, Any]:
    _, blocks = smplx_table.read(inputs["motion"] / smplx_table.TABLE)
    n = len(blocks["transl"])
    if not params.enabled:
        _write_table(out, ["disabled"] * n, [None] * n)
        return {"frames": n, "enhanced": 0, "disabled": True}
    quiet()
    generated = inputs["render_body"] / render_body.FRAMES
    res = read_rgb(generated / frame_name(0, "png")).shape[0]
    checkpoint = inputs["finetune"] / "face"
    fres = trained_resolution(checkpoint)
    fsize = settings.render_mesh.face_size
    betas, side, K = render_body.camera(inputs["smplx_fit"], settings)
    for sub in (FRAMES, COND, MASK):
        (out / sub).mkdir()

    # 1. where the face is, its mesh crop and mask, frame by frame
    model = body.load(inputs["body_model"])
    reasons: list[str | None] = []
    transforms: list[np.ndarray | None] = []
    progress.start("face: locating faces", n)
    with (MeshRasterizer(model.faces.astype(np.int64), side, ambient=settings.render_mesh.ambient) as mesh,
          MeshRasterizer(head_faces(model), side, color=(1.0, 1.0, 1.0), ambient=1.0, ctx=mesh.ctx) as head):
        for idx, verts, joints in pose_chunks(model, betas, blocks, np.arange(n)):
            for i, v, j in zip(idx, verts, joints, strict=True):
                state, pts = face_state(j, K, side, settings.render_mesh.max_face_yaw)
                if pts is None:
                    reasons.append(state)
                    transforms.append(None)
                    continue
                m = face_align.align(pts, fsize)
                name = frame_name(int(i), "png")
                for sub, image in ((COND, mesh.render(v, K)), (MASK, head.render(v, K)[:, :, 0])):
                    crop = cv2.warpAffine(image, m, (fsize, fsize), flags=cv2.INTER_LINEAR)
                    crop = cv2.resize(crop, (fres, fres), interpolation=cv2.INTER_AREA)
                    if sub == COND:
                        write_png(out / sub / name, crop)
                    elif not cv2.imwrite(str(out / sub / name), crop):
                        raise OSError(f"cannot write {out / sub / name}")
                reasons.append(None)
                transforms.append(face_align.rescale(m, side, res, fsize, fres))
            progress.advance(len(idx))
    stretches = runs([r is None for r in reasons])
    _write_table(out, reasons, transforms)
    if not stretches:
        return {"frames": n, "enhanced": 0, "runs": 0, "missing": _count(reasons)}

    # 2. inpaint each run of visible faces as one video, then 3. blend back
    face_model = SGDM.from_pretrained(checkpoint).eval()
    face_model.skip_identity_temporal()
    if not face_model.inpaint:
        raise StageError(f"{checkpoint}: not an inpainting (face) model")
    vae, encoder, scheduler = load_vae(base).eval(), load_image_encoder(base).eval(), load_scheduler(base)
    tokens = pipeline.encode_reference(
        encoder, render_body.to_tensor([reference_face(inputs["ingest"], inputs["render_mesh"], fres)])[:, :, 0])
    f = pipeline.vae_factor(vae)
    gen = torch.Generator().manual_seed(params.seed)
    feather = params.feather * fres

    def crops(w: slice) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        frames, faces, masks = [], [], []
        for i in range(w.start, w.stop):
            frame = read_rgb(generated / frame_name(i, "png"))
            frames.append(frame)
            faces.append(cv2.warpAffine(frame, transforms[i], (fres, fres), flags=cv2.INTER_LINEAR))
            mask = cv2.imread(str(out / MASK / frame_name(i, "png")), cv2.IMREAD_GRAYSCALE)
            masks.append(mask)
        return frames, faces, masks

    progress.start("face: inpainting", params.steps * len(stretches))
    for run_ in stretches:
        length = run_.stop - run_.start
        extra = []
        for w in overlap.windows(length, params.window, 0):
            _, faces, masks = crops(slice(run_.start + w.start, run_.start + w.stop))
            mask = torch.from_numpy(np.stack(masks) > 127).float()[None, None]
            image = render_body.to_tensor(faces)
            extra.append(pipeline.inpaint_inputs(vae, mask, image * (1 - mask) + 0.5 * mask))
        extra_t = torch.cat(extra, dim=2)

        def predict(x: torch.Tensor, t: torch.Tensor, w: slice, start: int = run_.start,
                    extra_t: torch.Tensor = extra_t) -> torch.Tensor:
            cond = render_body.to_tensor([read_rgb(out / COND / frame_name(start + i, "png"))
                                          for i in range(w.start, w.stop)])
            return pipeline.predict_noise(face_model, x, t, tokens, cond, params.guidance[settings.profile],
                                          params.control_scale[settings.profile], extra_t[:, :, w])

        latents = pipeline.initial_latents((1, vae.config.latent_channels, length, fres // f, fres // f), gen)
        scheduler.set_timesteps(params.steps)
        latents = overlap.denoise(predict, latents * scheduler.init_noise_sigma, scheduler, params.window,
                                  params.overlap, on_step=lambda _i: progress.advance(1))
        for w in overlap.windows(length, params.window, 0):
            at = slice(run_.start + w.start, run_.start + w.stop)
            decoded = pipeline.decode_latents(vae, latents[:, :, w])[0]
            new = (decoded.permute(1, 2, 3, 0) * 255).round().to(torch.uint8).numpy()
            frames, _, masks = crops(at)
            for k, i in enumerate(range(at.start, at.stop)):
                blended = face_align.paste(frames[k], new[k], masks[k], transforms[i], feather)
                write_png(out / FRAMES / frame_name(i, "png"), blended)
    return {"frames": n, "enhanced": sum(r is None for r in reasons), "runs": len(stretches),
            "resolution": fres, "missing": _count(reasons)}


def _count(reasons: list[str | None]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in reasons:
        if r is not None:
            out[r] = out.get(r, 0) + 1
    return out
