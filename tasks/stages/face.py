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
from pydantic import Field

from core.errors import StageError
from core.progress import Progress
from core.stage import Stage
from models import face_align
from models.raster import MeshRasterizer
from tasks import smplx_table
from tasks.base_weights import quiet
from tasks.denoising import WindowParams
from tasks.devices import Compute
from tasks.frames import ImageFiles, frame_name, read_meta, read_rgb, write_png
from tasks.stages import render_body
from tasks.stages.render_mesh import FACES, face_state, head_faces, pose_chunks

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
    reads=("render_mesh",), body_model=True, resource="gpu", device=True, in_dvc=False,
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
        settings: SimpleNamespace, compute: Compute) -> dict[str, Any]:
    import torch

    from models import body

    _, blocks = smplx_table.read(inputs["motion"] / smplx_table.TABLE)
    n = len(blocks["transl"])
    if not params.enabled:
        _write_table(out, ["disabled"] * n, [None] * n)
        return {"frames": n, "enhanced": 0, "disabled": True}
    quiet()
    generated = inputs["render_body"] / render_body.FRAMES
    res = read_rgb(generated / frame_name(0, "png")).shape[0]
    pipe = render_body.load_pipeline(inputs["finetune"] / "face", params, settings.profile, compute)
    if not pipe.inpaint:
        raise StageError(f"{inputs['finetune'] / 'face'}: not an inpainting (face) model")
    fres = pipe.resolution
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

    # 2. inpaint each run of visible faces as one video with the Face SGDM, then 3. blend each face back
    reference = reference_face(inputs["ingest"], inputs["render_mesh"], fres)
    feather = params.feather * fres
    gen = torch.Generator().manual_seed(params.seed)
    progress.start("face: inpainting", params.steps * len(stretches))
    for run_ in stretches:
        frames = [generated / frame_name(i, "png") for i in range(run_.start, run_.stop)]

        def crop(k: int, frame: np.ndarray, start: int = run_.start) -> np.ndarray:
            return cv2.warpAffine(frame, transforms[start + k], (fres, fres), flags=cv2.INTER_LINEAR)

        def blend(first: int, faces: np.ndarray, start: int = run_.start) -> None:
            for k, face in enumerate(faces):
                i = start + first + k
                mask = cv2.imread(str(out / MASK / frame_name(i, "png")), cv2.IMREAD_GRAYSCALE)
                blended = face_align.paste(read_rgb(generated / frame_name(i, "png")), face, mask, transforms[i],
                                           feather)
                write_png(out / FRAMES / frame_name(i, "png"), blended)

        pipe(ImageFiles([out / COND / frame_name(i, "png") for i in range(run_.start, run_.stop)]), reference,
             images=ImageFiles(frames, transform=crop),
             masks=ImageFiles([out / MASK / frame_name(i, "png") for i in range(run_.start, run_.stop)], gray=True),
             steps=params.steps, guidance=params.guidance[settings.profile],
             control_scale=params.control_scale[settings.profile], window=params.window,
             overlap_frames=params.overlap, generator=gen, callback=lambda _step, _steps: progress.advance(1),
             output=blend, max_latent_bytes=compute.max_latent_bytes, spill_dir=out)
    return {"frames": n, "enhanced": sum(r is None for r in reasons), "runs": len(stretches),
            "resolution": fres, "missing": _count(reasons), "device": compute.device.type,
            "dtype": str(pipe.dtype).removeprefix("torch."), "scheduler": params.scheduler}


def _count(reasons: list[str | None]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in reasons:
        if r is not None:
            out[r] = out.get(r, 0) + 1
    return out
