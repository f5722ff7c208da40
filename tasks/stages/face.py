"""face: the generated face redone by the Face SGDM (paper Algorithm 2): crop → inpaint → blend.

Per frame of the motion, the face transform comes from the mesh exactly as render_mesh makes it for training (five
projected landmarks, render_mesh's face_size), rescaled to the generated frame and the face model's resolution.
Runs of consecutive frames with a visible face are inpainted as videos with the same overlapped windows as the body
(the face model has the motion modules too), conditioned on the face mesh crop and the identity's own face as
reference, then pasted back through the inverse transform under a feathered face mask. Frames whose face is out
of view or turned away pass through unchanged, as do all frames when the stage is disabled. Only the frames it
changed are written; assemble takes the rest from render_body.

With `redraw: detail` (the cpu profile's) and a checkpoint that has one, the identity's face detail model redraws
each visible face instead, frame by frame: a `Predictor` reading the mesh crop with its jaw coloured, the identity's
training face whose mesh is most like this one (`models.face_bank`, one path over each run of frames so the
reference does not change every frame) and the body frame's own crop of the face, learnt in finetune like the hand
model. A Face SGDM learnt in minutes samples a blurred face; the regressor's is sharp, and the training face gives
it a mouth open as wide as the jaw asks (a detail model from before the bank reads the mesh and the body's face
only). Its whole square crop is pasted back
(the mesh's head is the body model's, smaller than the person's: under the head mask most of the face would stay the
body's blur).

Before pasting, each crop is checked against the body frame itself (MediaPipe face detection, full-range model, on
the frame upscaled to at least DETECT_SIDE): where the body drew its face away from where the mesh puts it, the
crop is moved onto the body's face (`check: align`) or that frame keeps the body's face (`check: skip`), and the
summary counts those frames. Where the detector finds no face (a blurred or turned face, or none drawn there), the
body frame is asked at the mesh's face: if the centre of the crop is mostly the identity's skin colour (a chroma
model of its own reference face), the face there is redone; if not, the body drew its face elsewhere (or none), and
the frame is left as it is (`no_face_left`) rather than given a second face. Never two faces in one frame.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from core.artifacts import read_manifest
from core.errors import StageError
from core.progress import Progress
from core.stage import Stage
from models import face_align, npz, squares
from models.face_bank import FILE as BANK_FILE
from models.face_bank import LANDMARKS, FaceBank
from models.raster import MeshRasterizer
from tasks import smplx_table
from tasks.base_weights import quiet
from tasks.denoising import WindowParams
from tasks.devices import Compute
from tasks.frames import FACE_DETAIL, ImageFiles, frame_name, read_meta, read_rgb, write_png
from tasks.mp import solutions
from tasks.stages import render_body
from tasks.stages.render_mesh import FACES, face_colors, face_crop, head_faces, pose_chunks
from tasks.workers import Reporter, run_parallel

FRAMES = "frames"
DETECT_SIDE = 256  # body frames are upscaled to this before face detection (the tiny profile draws 64 px frames)
COND = "cond"
MASK = "mask"
TABLE = "faces.parquet"


class FaceParams(WindowParams):
    """Algorithm 2: crop the generated face, inpaint it with the Face SGDM, blend it back."""

    enabled: bool = Field(True, description="false: frames pass through unchanged (`anchor render --no-face`)")
    guidance: dict[str, float] = Field({"tiny": 3.5, "cpu": 1.0, "sd15": 3.5}, description="per profile")
    control_scale: dict[str, float] = Field({"tiny": 2.0, "cpu": 1.0, "sd15": 2.0}, description="per profile")
    feather: float = Field(0.06, ge=0, le=0.5, description="blend edge width, share of the face crop side")
    seed: int = Field(0, ge=0)
    check: Literal["align", "skip", "off"] = Field("align", description="where the face the body frame shows "
                                                   "(MediaPipe face detection) is away from the mesh's face: align "
                                                   "the crop to the body's face, skip (that frame keeps its face), or "
                                                   "off (trust the mesh)")
    check_tolerance: float = Field(0.35, gt=0, le=5, description="how far apart the two may be before they "
                                   "disagree, as a share of the face crop's side in the frame")
    check_confidence: float = Field(0.5, gt=0, lt=1, description="face detection's minimum confidence")
    check_skin: float = Field(0.4, ge=0, le=1, description="where no face is detected: the least share of the "
                              "crop's central half in the identity's skin colour for the face there to be redone; "
                              "below it the frame keeps the body's face (0 = always redo, as the mesh says)")
    redraw: dict[str, Literal["sgdm", "detail"]] = Field(
        {"tiny": "sgdm", "cpu": "detail", "sd15": "sgdm"}, description="what redraws each face, per profile: sgdm "
        "(Algorithm 2's Face SGDM inpainting runs of faces as videos) or detail (the identity's face detail model, "
        "frame by frame from the jaw-coloured mesh crop and the body's face; a checkpoint without one uses the "
        "SGDM; cpu: sharper, docs/cpu-profile.md)")
    detail_feather: float = Field(0.15, ge=0, le=0.5, description="with the face detail model: the edge of its "
                                  "square crop, blended in linearly over this share of the side (it redraws the "
                                  "whole crop, hair and surroundings included, not only the mesh's head)")
    detail_switch: float = Field(0.02, ge=0, description="with the face detail model: what moving to another "
                                 "training face costs, against the bank's landmark distance (crop-side shares, "
                                 "mouth weighted) of the face it gives; 0 takes each frame's nearest, higher keeps "
                                 "the reference steadier over time")


def describe(s: dict[str, Any]) -> str:
    if s.get("disabled"):
        return "disabled"
    text = f"{s['enhanced']} of {s['frames']} faces redone" + (" by the face detail model"
                                                               if s.get("redraw") == "detail" else "")
    if s.get("note"):
        text += (" by the Face SGDM: " if s.get("redraw") != "detail" else "; ") + s["note"]
    if bank := s.get("bank"):
        text += f" from {bank['used']} of the {bank['faces']} training faces in its bank"
    moved = (s.get("face_check") or {}).get("aligned", 0)
    kept = (s.get("face_check") or {}).get("skipped", 0) + (s.get("face_check") or {}).get("no_face_left", 0)
    if moved or kept:
        text += f" ({moved} moved onto the face the body drew, {kept} left as the body drew them)"
    return text


STAGE = Stage(
    "face", flow="render", scope="render",
    inputs=("motion", "render_body", "finetune", "smplx_fit", "ingest", "render_mesh"), params=FaceParams,
    reads=("render_mesh",), body_model=True, resource="gpu", device=True, in_dvc=False,
    describe=describe, outputs=(f"{FRAMES}/?", f"{COND}/?", f"{MASK}/?", TABLE),
    description="face crop → Face SGDM inpainting (or the face detail model) → feathered blend; hidden faces pass "
    "through")


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
    detail_dir = inputs["finetune"] / FACE_DETAIL
    detail = params.redraw[settings.profile] == "detail" and (detail_dir / "config.json").is_file()
    if detail:
        from models.predictor import Predictor

        redrawer = Predictor.from_pretrained(detail_dir).to(compute.device).eval()
        fres = crop_size(inputs["finetune"], FACE_DETAIL)
        bank = None
        if redrawer.config.inputs > 2:  # a detail model that changes a training face reads them from its bank
            try:
                bank = FaceBank.load(detail_dir)
            except (*npz.UNREADABLE, ValueError, KeyError) as e:  # gone, empty, cut short, or another format
                raise StageError(f"{detail_dir / BANK_FILE}: the face detail model reads its bank of training "
                                 f"faces, which is missing or unreadable ({e}): run finetune again") from e
            if bank.crops.shape[1:3] != (fres, fres):
                raise StageError(f"{detail_dir}: its bank's faces are {bank.crops.shape[1]} px, the model learnt at "
                                 f"{fres} px: run finetune again")
    else:
        pipe = render_body.load_pipeline(inputs["finetune"] / "face", params, settings.profile, compute)
        if not pipe.inpaint:
            raise StageError(f"{inputs['finetune'] / 'face'}: not an inpainting (face) model")
        fres = pipe.resolution
    fsize = settings.render_mesh.face_size
    betas, side, K = render_body.camera(inputs["smplx_fit"], settings)
    for sub in (FRAMES, COND) if detail else (FRAMES, COND, MASK):
        (out / sub).mkdir()

    # 1. where the face is, its mesh crop and (for the SGDM, which inpaints the head) its mask, frame by frame
    model = body.load(inputs["body_model"])
    reasons: list[str | None] = []
    transforms: list[np.ndarray | None] = []
    landmarks = np.zeros((n, LANDMARKS, 2), np.float32)  # the mesh's, in its own crop: what finds a bank face
    progress.start("face: locating faces", n)
    # the detail model reads the mesh with its jaw coloured, as it learnt from render_mesh's face_jaw/
    with (MeshRasterizer(model.faces.astype(np.int64), side, ambient=settings.render_mesh.ambient,
                         vertex_colors=face_colors(model) if detail else None) as mesh,
          MeshRasterizer(head_faces(model), side, color=(1.0, 1.0, 1.0), ambient=1.0, ctx=mesh.ctx) as head):
        for idx, verts, joints in pose_chunks(model, betas, blocks, np.arange(n)):
            for i, v, j in zip(idx, verts, joints, strict=True):
                state, m, in_crop = face_crop(j, K, side, settings.render_mesh.max_face_yaw, fsize)
                if m is None:
                    reasons.append(state)
                    transforms.append(None)
                    continue
                landmarks[i] = in_crop
                name = frame_name(int(i), "png")
                for sub, image in ((COND, mesh.render(v, K)),) + (() if detail else (
                        (MASK, head.render(v, K)[:, :, 0]),)):
                    crop = cv2.warpAffine(image, m, (fsize, fsize), flags=cv2.INTER_LINEAR)
                    crop = cv2.resize(crop, (fres, fres), interpolation=cv2.INTER_AREA)
                    if sub == COND:
                        write_png(out / sub / name, crop)
                    elif not cv2.imwrite(str(out / sub / name), crop):
                        raise OSError(f"cannot write {out / sub / name}")
                reasons.append(None)
                transforms.append(face_align.rescale(m, side, res, fsize, fres))
            progress.advance(len(idx))
    # 1b. the face the body frame shows: the crop goes there, never beside it
    check: dict[str, Any] = {"mode": params.check}
    reference: np.ndarray | None = None  # the identity's own face, read when first needed
    shown = [i for i, m in enumerate(transforms) if m is not None]
    if params.check != "off" and shown:
        progress.start("face: checking against the body's faces", len(shown))
        found = run_parallel(detect_faces, [([str(generated / frame_name(i, "png")) for i in shown],
                                             params.check_confidence)], 1, progress)[0]
        detections: list[list[tuple[float, float, float]]] = [[] for _ in range(n)]
        for i, faces in zip(shown, found, strict=True):
            detections[i] = faces
        skin = [None] * n
        if params.check_skin > 0 and any(not detections[i] for i in shown):
            reference = reference_face(inputs["ingest"], inputs["render_mesh"], fres)
            model = skin_model(reference)
            for i in shown:
                if not detections[i]:
                    crop = cv2.warpAffine(read_rgb(generated / frame_name(i, "png")), transforms[i], (fres, fres),
                                          flags=cv2.INTER_LINEAR)
                    skin[i] = skin_share(crop, model)
        check.update(reconcile(transforms, reasons, detections, fres, params.check_tolerance, params.check, skin,
                               params.check_skin))
        for i, reason in enumerate(reasons):
            if reason in (AWAY, NO_FACE):
                for sub in (COND, MASK):
                    (out / sub / frame_name(i, "png")).unlink(missing_ok=True)
    stretches = runs([r is None for r in reasons])
    _write_table(out, reasons, transforms)
    how: dict[str, Any] = {"redraw": "detail" if detail else "sgdm"}
    if params.redraw[settings.profile] == "detail" and not detail:
        how["note"] = "no face detail model in the checkpoint (finetuned before it, or no face crops to learn from)"
    elif detail and bank is None:
        how["note"] = ("a face detail model from before its bank of training faces: the mouth does not follow the "
                       "jaw; run finetune again")
    if not stretches:
        return {"frames": n, "enhanced": 0, "runs": 0, "missing": _count(reasons), "face_check": check, **how}

    # 2. redraw each visible face (the face detail model, or the Face SGDM inpainting each run as one video), then
    # 3. blend each face back: the detail model's under its whole square (the mesh's head is the body model's, not the
    # person's, whose face and hair reach past it), the SGDM's under the head mask it inpainted
    square = squares.square_mask(fres, params.detail_feather * fres) if detail else None

    def paste(i: int, face: np.ndarray, frame: np.ndarray | None = None) -> None:
        mask = square if square is not None else cv2.imread(str(out / MASK / frame_name(i, "png")),
                                                            cv2.IMREAD_GRAYSCALE)
        frame = read_rgb(generated / frame_name(i, "png")) if frame is None else frame
        feather = 0.0 if square is not None else params.feather * fres  # the square has its edge in the mask
        blended = face_align.paste(frame, face, mask, transforms[i], feather)
        write_png(out / FRAMES / frame_name(i, "png"), blended)

    if detail:
        shown = [i for s_ in stretches for i in range(s_.start, s_.stop)]
        progress.start("face: redrawing with the face detail model", len(shown))
        picks = None
        if bank is not None:
            paths = [bank.path(landmarks[s_], params.detail_switch) for s_ in stretches]
            picks = np.concatenate(paths)
            how["bank"] = {"faces": len(bank), "used": int(len(np.unique(picks))),
                           "switches": sum(bank.jumps(p) for p in paths)}
        redraw_faces(redrawer, shown, out / COND, generated, transforms, fres, paste, progress,
                     None if bank is None else bank.crops, picks)
        return {"frames": n, "enhanced": len(shown), "runs": len(stretches), "resolution": fres,
                "missing": _count(reasons), "device": compute.device.type,
                "dtype": str(next(redrawer.parameters()).dtype).removeprefix("torch."), "face_check": check, **how}

    if reference is None:
        reference = reference_face(inputs["ingest"], inputs["render_mesh"], fres)
    gen = torch.Generator().manual_seed(params.seed)
    progress.start("face: inpainting", params.steps[settings.profile] * len(stretches))
    for run_ in stretches:
        frames = [generated / frame_name(i, "png") for i in range(run_.start, run_.stop)]

        def crop(k: int, frame: np.ndarray, start: int = run_.start) -> np.ndarray:
            return cv2.warpAffine(frame, transforms[start + k], (fres, fres), flags=cv2.INTER_LINEAR)

        def blend(first: int, faces: np.ndarray, start: int = run_.start) -> None:
            for k, face in enumerate(faces):
                paste(start + first + k, face)

        pipe(ImageFiles([out / COND / frame_name(i, "png") for i in range(run_.start, run_.stop)]), reference,
             images=ImageFiles(frames, transform=crop),
             masks=ImageFiles([out / MASK / frame_name(i, "png") for i in range(run_.start, run_.stop)], gray=True),
             steps=params.steps[settings.profile], guidance=params.guidance[settings.profile],
             control_scale=params.control_scale[settings.profile], window=params.window,
             overlap_frames=params.overlap, generator=gen, callback=lambda _step, _steps: progress.advance(1),
             output=blend, max_latent_bytes=compute.max_latent_bytes, spill_dir=out)
    return {"frames": n, "enhanced": sum(r is None for r in reasons), "runs": len(stretches),
            "resolution": fres, "missing": _count(reasons), "device": compute.device.type,
            "dtype": str(pipe.dtype).removeprefix("torch."), "scheduler": params.scheduler[settings.profile],
            "face_check": check, **how}


DETAIL_BATCH = 32  # faces per pass of the face detail model


def crop_model(model: Any, conds: list[np.ndarray], soft: list[np.ndarray],
               references: np.ndarray | None = None) -> np.ndarray:
    """A crop model (hand or face detail) on uint8 RGB mesh crops and the frame's crops (and, for a face detail model
    with a bank, the bank faces it changes): its uint8 RGB crops."""
    import torch

    param = next(model.parameters())

    def signed(images: list[np.ndarray] | np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(np.stack(images))).permute(0, 3, 1, 2)
        return x.to(param.device, param.dtype).div(127.5).sub(1)

    y = model(signed(conds), signed(soft)) if references is None else model(signed(conds), signed(references),
                                                                              signed(soft))
    return ((y.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def crop_size(finetune_dir: Path, part: str) -> int:
    """The crop side a crop model (the hand or face detail model, `part`) learnt at, from finetune's summary: a
    later change of render_mesh's or finetune's sizes cannot change what an existing checkpoint reads."""
    summary = ((read_manifest(finetune_dir) or {}).get("summary") or {}).get(part) or {}
    if not summary.get("resolution"):
        raise StageError(f"{finetune_dir}: its summary does not say at what side the {part} model learnt")
    return int(summary["resolution"])


def redraw_faces(model: Any, shown: list[int], cond_dir: Path, generated: Path, transforms: list[np.ndarray | None],
                 fres: int, paste: Any, progress: Progress, bank: np.ndarray | None = None,
                 picks: np.ndarray | None = None) -> None:
    """Each shown face redrawn by the face detail model from its mesh crop, the body frame's crop and (with a bank)
    its bank face (`bank[picks[k]]` for the k-th shown face, gathered a batch at a time: a long render's picks would
    not fit in memory as crops), and handed to `paste(i, face, body frame)`."""
    import torch

    for a in range(0, len(shown), DETAIL_BATCH):
        part = shown[a:a + DETAIL_BATCH]
        frames = [read_rgb(generated / frame_name(i, "png")) for i in part]
        conds = [read_rgb(cond_dir / frame_name(i, "png")) for i in part]
        soft = [cv2.warpAffine(f, transforms[i], (fres, fres), flags=cv2.INTER_LINEAR)
                for i, f in zip(part, frames, strict=True)]
        with torch.no_grad():
            faces = crop_model(model, conds, soft, None if bank is None else bank[picks[a:a + DETAIL_BATCH]])
        for i, face, frame in zip(part, faces, frames, strict=True):
            paste(i, face, frame)
        progress.advance(len(part))


AWAY = "away from the body's face"
NO_FACE = "no face in the body frame there"
SKIN_SIGMAS = 3.0  # a pixel within this Mahalanobis distance of the identity's skin chroma counts as skin


def _centre(crop: np.ndarray) -> np.ndarray:
    """The central half of a face crop: cheeks, nose, mouth and brows; the hair and the background stay out."""
    f = crop.shape[0]
    return crop[f // 4: f - f // 4, f // 4: f - f // 4]


def _chroma(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2YCrCb)[..., 1:].reshape(-1, 2).astype(np.float64)


def skin_model(face: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and inverse covariance of the chroma (Cr, Cb) of the central half of the identity's own face crop:
    brightness left out, so shading and exposure do not count, and learnt from the person, not from a table of
    skin tones."""
    c = _chroma(_centre(face))
    cov = np.cov(c.T) + np.eye(2)  # a floor of 1 (chroma levels are integers): a flat test face stays invertible
    return c.mean(0), np.linalg.inv(cov)


def skin_share(crop: np.ndarray, model: tuple[np.ndarray, np.ndarray]) -> float:
    """Share of a face crop's central half whose chroma is within SKIN_SIGMAS of the identity's skin."""
    mean, inv = model
    d = _chroma(_centre(crop)) - mean
    return float((np.einsum("ni,ij,nj->n", d, inv, d) <= SKIN_SIGMAS ** 2).mean())


def detect_faces(job: tuple[list[str], float], report: Reporter) -> list[list[tuple[float, float, float]]]:
    """Faces on each frame as (centre x, centre y, confidence) in the frame's pixels. Runs in a `tasks.workers`
    process (MediaPipe)."""
    paths, confidence = job
    out: list[list[tuple[float, float, float]]] = []
    with solutions().face_detection.FaceDetection(model_selection=1, min_detection_confidence=confidence) as det:
        for path in paths:
            img = read_rgb(Path(path))
            h, w = img.shape[:2]
            up = max(1.0, DETECT_SIDE / min(h, w))
            if up > 1:
                img = cv2.resize(img, (round(w * up), round(h * up)), interpolation=cv2.INTER_CUBIC)
            faces = []
            for d in det.process(img).detections or []:
                box = d.location_data.relative_bounding_box
                faces.append((float((box.xmin + box.width / 2) * w), float((box.ymin + box.height / 2) * h),
                              float(d.score[0])))
            out.append(faces)
            report()
    return out


def reconcile(transforms: list[np.ndarray | None], reasons: list[str | None],
              detections: list[list[tuple[float, float, float]]], fres: int, tolerance: float, mode: str,
              skin: list[float | None] | None = None, min_skin: float = 0.0) -> dict[str, int]:
    """Compare each crop (frame → face-crop affine) with the faces found on its frame, in place: a crop whose
    centre is within `tolerance` × its side of a found face agrees; otherwise `align` shifts it onto the nearest
    found face and `skip` drops it (reason AWAY). Where no face was found, the crop stays if the share of skin at
    its centre (`skin`, None = not measured) reaches `min_skin`, and is dropped otherwise (reason NO_FACE)."""
    counts = {"agreed": 0, "aligned": 0, "skipped": 0, "no_face_found": 0, "no_face_redone": 0, "no_face_left": 0}
    for i, m in enumerate(transforms):
        if m is None:
            continue
        if not detections[i]:
            counts["no_face_found"] += 1
            share = skin[i] if skin is not None else None
            if share is not None and share < min_skin:
                transforms[i] = None
                reasons[i] = NO_FACE
                counts["no_face_left"] += 1
            else:
                counts["no_face_redone"] += 1
            continue
        linear = m[:, :2]
        centre = np.linalg.solve(linear, np.array([fres / 2, fres / 2]) - m[:, 2])
        side = fres / np.sqrt(abs(np.linalg.det(linear)))
        found = np.array([(x, y) for x, y, _ in detections[i]])
        nearest = found[np.argmin(np.linalg.norm(found - centre, axis=1))]
        if np.linalg.norm(nearest - centre) <= tolerance * side:
            counts["agreed"] += 1
        elif mode == "align":
            moved = m.copy()
            moved[:, 2] = m[:, 2] + linear @ (centre - nearest)  # the found face's centre to the crop's centre
            transforms[i] = moved
            counts["aligned"] += 1
        else:
            transforms[i] = None
            reasons[i] = AWAY
            counts["skipped"] += 1
    return counts


def _count(reasons: list[str | None]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in reasons:
        if r is not None:
            out[r] = out.get(r, 0) + 1
    return out
