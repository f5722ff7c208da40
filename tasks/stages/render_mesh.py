"""render_mesh: the SMPL-X mesh rendered as the diffusion models' condition images.

Per frame: the body condition (blue-grey mesh on black, the identity's camera), the face crop aligned by a 5-point
similarity from projected mesh landmarks, that transform, and a face mask from the projected head. A frame whose
face is out of view or turned away is marked in faces.parquet and gets no face crop; nothing fails on it (the
official code crashes there). Each hand's square around its projected joints goes to hands.parquet, as shares of
the frame side (empty when the hand is out of view): where training looks harder, and the hand model's crops. The
face crop is also made with the jaw in a colour of its own (`face_jaw/`, `face_colors`): the face detail model's
condition, where the mouth's opening shows as the jaw region's shape rather than a pixel-wide crease; faces.parquet
keeps each face's 51 landmarks in its crop (shares of the side), by which the face detail model finds the
identity's training face most like a mesh's (`models.face_bank`). Each
hand in view is also rendered at `hand_size` through a camera cropped to its square, its fingers in their own
colours (`render_hand`; a left hand mirrored, so one hand model learns both): the hand model's condition. Perturbed
parameter sets get body conditions too, for training.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from core.progress import Progress
from core.section import Section
from core.stage import Stage
from models import face_align, squares
from models import smplx_layout as layout
from models.raster import MeshRasterizer
from tasks import smplx_table
from tasks.frames import FACE_JAW, HANDS, frame_name

FACES = "faces.parquet"


class RenderMeshParams(Section):
    resolution: int | None = Field(None, ge=32, le=2048, description="body condition side; empty = the ingest "
                                   "crop side")
    face_size: Literal[256, 512] = Field(256, description="side of the aligned face crop")
    ambient: float = Field(0.3, ge=0, le=1)
    max_face_yaw: float = Field(75.0, gt=0, le=180, description="degrees; a head turned further away is marked "
                                "as having no visible face")
    hand_size: int = Field(96, ge=16, le=512, multiple_of=16, description="side of the hand crops (mesh and "
                           "frame) the hand model learns and redraws (seated clip: 96 found more hands than 64 or "
                           "128, docs/cpu-profile.md)")
    png_level: int = Field(1, ge=0, le=9, description="PNG compression level (speed over size)")
    workers: int = Field(2, ge=1, le=64, description="threads encoding images")


def describe(s: dict[str, Any]) -> str:
    return (f"{s['frames']} + {s['perturbed_frames']} perturbed at {s['resolution']} px, "
            f"faces visible {s['faces_visible']}"
            + (f", hands in view {s['hands_in_view']['left']} left / {s['hands_in_view']['right']} right"
               if "hands_in_view" in s else ""))


STAGE = Stage(
    "render_mesh", flow="onboard", inputs=("smplx_fit", "perturb"), params=RenderMeshParams, body_model=True,
    describe=describe,
    outputs=("body/", "face/?", "face_mask/?", f"{FACE_JAW}/?", "hand/?", "perturbed/?", FACES, HANDS),
    description="mesh condition images, aligned face crops, face transforms and masks, hand squares and crops")
CHUNK = 32
HEAD_JOINTS = (layout.HEAD, layout.JAW, layout.L_EYE, layout.R_EYE)


def head_faces(model: Any) -> np.ndarray:
    """Faces whose three vertices all follow the head, jaw or eyes: the region the face mask covers."""
    owner = model.lbs_weights.argmax(1).numpy()
    faces = model.faces.astype(np.int64)
    return faces[np.isin(owner[faces], HEAD_JOINTS).all(1)]


def pose_chunks(model: Any, betas: np.ndarray, blocks: dict[str, np.ndarray], rows: np.ndarray):
    """Vertices and joints (smplx's 144, face landmarks included) for the given rows, CHUNK frames at a time."""
    import torch

    for start in range(0, len(rows), CHUNK):
        idx = rows[start:start + CHUNK]
        n = len(idx)
        kw = {k: torch.from_numpy(blocks[k][idx]) for k in smplx_table.BLOCKS}
        with torch.no_grad():
            out = model(betas=torch.from_numpy(betas).expand(n, -1), **kw)
        yield idx, out.vertices.numpy(), out.joints.numpy()


def render_frames(body_model: Path, fit_dir: Path, blocks: dict[str, np.ndarray], rows: np.ndarray, res: int,
                  ambient: float = 0.3) -> list[np.ndarray]:
    """RGB mesh conditions of some frames of a motion, with the identity's shape and camera (for reports)."""
    from models import body

    ident = smplx_table.read_identity(fit_dir / smplx_table.IDENTITY)
    cam = ident["camera"]
    K = body.intrinsics(cam["focal"] * res / cam["size"], res)
    model = body.load(body_model)
    betas = np.asarray(ident["betas"], np.float32)[None]
    images = []
    with MeshRasterizer(model.faces.astype(np.int64), res, ambient=ambient) as mesh:
        for _, verts, _ in pose_chunks(model, betas, blocks, np.asarray(rows)):
            images += [mesh.render(v, K) for v in verts]
    return images


def face_state(joints: np.ndarray, K: np.ndarray, res: int, max_yaw: float) -> tuple[str, np.ndarray | None]:
    """('ok', the 51 SMPL-X face landmarks projected to pixels) or the reason the face is not usable."""
    lmk = joints[layout.LMK_START:layout.LMK_START + 51]
    if (lmk[:, 2] <= 0.01).any():
        return "behind_camera", None
    uv = lmk[:, :2] / lmk[:, 2:3] * K[0, 0] + K[:2, 2]
    pts = face_align.five_points(uv)
    if (pts < 0).any() or (pts >= res).any():
        return "out_of_view", None
    ears = (joints[58] + joints[59]) / 2
    forward = joints[55] - ears
    to_camera = -ears
    cos = forward @ to_camera / (np.linalg.norm(forward) * np.linalg.norm(to_camera) + 1e-9)
    if np.degrees(np.arccos(np.clip(cos, -1, 1))) > max_yaw:
        return "turned_away", None
    return "ok", uv


def face_crop(joints: np.ndarray, K: np.ndarray, res: int, max_yaw: float, size: int
              ) -> tuple[str, np.ndarray | None, np.ndarray | None]:
    """(state, the 2×3 transform to the face's `size` crop, its 51 landmarks in that crop as shares of the side):
    one rule for training's crops (render_mesh) and a render's (the face stage), so a mesh finds its bank faces by
    the same numbers they were stored with. None for both where the face is not usable."""
    state, uv = face_state(joints, K, res, max_yaw)
    if uv is None:
        return state, None, None
    m = face_align.align(face_align.five_points(uv), size)
    return state, m, face_align.in_crop(uv, m, size)


def hand_boxes(joints: np.ndarray, K: np.ndarray, res: int) -> dict[str, list[float] | None]:
    """Each hand's square (x, y, size) around its projected joints and fingertips, as shares of the frame side, by
    the same rule the metrics crop real hands with (`squares.hand_box`); None for a hand mostly out of view or behind
    the camera."""
    out: dict[str, list[float] | None] = {}
    for side, idx in layout.HAND_POINTS.items():
        p = joints[list(idx)]
        front = p[:, 2] > 0.01
        uv = np.full((len(p), 2), np.nan)
        uv[front] = p[front, :2] / p[front, 2:3] * K[0, 0] + K[:2, 2]
        box = squares.hand_box(uv, res)
        out[side] = None if box is None else [v / res for v in box]
    return out


# the hand crops' colours: one per finger (smplx_layout.FINGERS' order), the palm, and the rest of the body in the
# usual mesh colour. Saturated hues next to the body's grey-blue: fingers tell apart, and `squares.hand_share`
# finds them.
FINGER_COLORS = ((1.0, 0.15, 0.15), (0.15, 1.0, 0.15), (0.15, 0.15, 1.0), (1.0, 1.0, 0.1), (1.0, 0.1, 1.0))
PALM_COLOR = (0.1, 1.0, 1.0)


def hand_colors(model: Any, side: str) -> np.ndarray:
    """(V, 3) vertex colours for the crops of the `side` hand: its vertices coloured by the finger (or the palm)
    that moves them most, everything else, the other hand included, in the mesh colour. So a hand behind the other
    one shows as few of its own colours."""
    from models.raster import MESH_COLOR

    owner = model.lbs_weights.argmax(1).numpy()
    colors = np.tile(np.asarray(MESH_COLOR, np.float32), (len(owner), 1))
    joints = layout.HAND_JOINTS[side]
    colors[owner == layout.WRISTS[side]] = PALM_COLOR
    for k, color in enumerate(FINGER_COLORS):
        colors[np.isin(owner, joints[3 * k:3 * k + 3])] = color
    return colors


JAW_COLOR = (1.0, 0.2, 0.2)


def face_colors(model: Any) -> np.ndarray:
    """(V, 3) vertex colours for the face detail model's crops: the vertices the jaw moves most in JAW_COLOR, the
    rest in the mesh colour. In the plain mesh an open mouth is a crease a pixel or two wide at the face crop's
    side; the jaw region's outline moves with it."""
    from models.raster import MESH_COLOR

    colors = np.tile(np.asarray(MESH_COLOR, np.float32), (model.lbs_weights.shape[0], 1))
    colors[model.lbs_weights.argmax(1).numpy() == layout.JAW] = JAW_COLOR
    return colors


def hand_rasterizers(model: Any, size: int, ambient: float, ctx: Any = None) -> dict[str, MeshRasterizer]:
    """One rasteriser per hand at the crop side, each colouring its own hand (`hand_colors`), on `ctx` or on the
    first one's own context; release them in reverse order (as an ExitStack does)."""
    out = {}
    for side in layout.HAND_JOINTS:
        out[side] = MeshRasterizer(model.faces.astype(np.int64), size, ambient=ambient, ctx=ctx,
                                   vertex_colors=hand_colors(model, side))
        ctx = out[side].ctx
    return out


def render_hand(mesh: MeshRasterizer, vertices: np.ndarray, K: np.ndarray, box: list[float] | tuple[float, ...],
                side: int, left: bool) -> np.ndarray:
    """The mesh through a camera cropped to `box` of a `side` px frame with intrinsics K, at the rasteriser's size,
    pixel for pixel where `cv2.warpAffine` by `squares.crop_transform` puts the frame's pixels; a left hand
    mirrored."""
    m = squares.crop_transform(box, side, mesh.size)
    Kc = K.astype(np.float64).copy()
    Kc[:2] = m[:, :2] @ K[:2] + np.array([[0, 0, m[0, 2]], [0, 0, m[1, 2]]])
    # the rasteriser fills pixel j from [j, j + 1), warpAffine samples the frame at pixel centres: at a scale of a,
    # the two differ by (a - 1) / 2 crop pixels
    Kc[:2, 2] -= (m[0, 0] - 1) / 2
    image = mesh.render(vertices, Kc)
    return image[:, ::-1].copy() if left else image


def run(inputs: dict[str, Path], out: Path, params: RenderMeshParams, progress: Progress) -> dict[str, Any]:
    import torch

    from models import body

    ident = smplx_table.read_identity(inputs["smplx_fit"] / smplx_table.IDENTITY)
    cam = ident["camera"]
    res = params.resolution or int(cam["size"])
    K = body.intrinsics(cam["focal"] * res / cam["size"], res)
    betas = np.asarray(ident["betas"], np.float32)[None]
    keys, blocks = smplx_table.read(inputs["smplx_fit"] / smplx_table.TABLE)
    pkeys, pblocks = smplx_table.read(inputs["perturb"] / smplx_table.TABLE)
    torch.set_num_threads(1)  # the forward pass is cheap next to rasterising; spare cores go to PNG encoding
    model = body.load(inputs["body_model"])
    fsize = params.face_size
    progress.start("rendering mesh conditions", len(keys["frame"]) + len(pkeys["frame"]))

    records: dict[str, list[Any]] = {"clip": [], "frame": [], "visible": [], "reason": [], "transform": [],
                                     "landmarks": []}
    hands: dict[str, list[Any]] = {side: [] for side in layout.HAND_POINTS}
    counts = {"ok": 0, "out_of_view": 0, "turned_away": 0, "behind_camera": 0}
    with (MeshRasterizer(model.faces.astype(np.int64), res, ambient=params.ambient) as mesh,
          MeshRasterizer(head_faces(model), res, color=(1.0, 1.0, 1.0), ambient=1.0, ctx=mesh.ctx) as head,
          MeshRasterizer(model.faces.astype(np.int64), res, ambient=params.ambient, ctx=mesh.ctx,
                         vertex_colors=face_colors(model)) as jaw,
          ThreadPoolExecutor(params.workers) as pool, ExitStack() as stack):
        hand = {side: stack.enter_context(r)
                for side, r in hand_rasterizers(model, params.hand_size, params.ambient, mesh.ctx).items()}
        pending = []

        def save(path: Path, img: np.ndarray) -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            pending.append(pool.submit(cv2.imwrite, str(path), img, [cv2.IMWRITE_PNG_COMPRESSION, params.png_level]))

        for idx, verts, joints in pose_chunks(model, betas, blocks, np.arange(len(keys["frame"]))):
            for i, v, j in zip(idx, verts, joints, strict=True):
                clip, frame = str(keys["clip"][i]), int(keys["frame"][i])
                name = frame_name(frame, "png")
                image = mesh.render(v, K)
                save(out / "body" / clip / name, image[:, :, ::-1])
                state, m, landmarks = face_crop(j, K, res, params.max_face_yaw, fsize)
                counts[state] += 1
                if m is not None:
                    crop = cv2.warpAffine(image, m, (fsize, fsize), flags=cv2.INTER_LINEAR)
                    mask = cv2.warpAffine(head.render(v, K)[:, :, 0], m, (fsize, fsize), flags=cv2.INTER_LINEAR)
                    save(out / "face" / clip / name, crop[:, :, ::-1])
                    save(out / FACE_JAW / clip / name,
                         cv2.warpAffine(jaw.render(v, K), m, (fsize, fsize), flags=cv2.INTER_LINEAR)[:, :, ::-1])
                    save(out / "face_mask" / clip / name, mask)
                records["clip"].append(clip)
                records["frame"].append(frame)
                records["visible"].append(state == "ok")
                records["reason"].append(None if state == "ok" else state)
                records["transform"].append(None if m is None else m.ravel().astype(np.float32).tolist())
                records["landmarks"].append(None if landmarks is None else
                                            landmarks.ravel().astype(np.float32).tolist())
                for side, box in hand_boxes(j, K, res).items():
                    hands[side].append(box)
                    if box is not None:
                        save(out / "hand" / side / clip / name,
                             render_hand(hand[side], v, K, box, res, side == "left")[:, :, ::-1])
            progress.advance(len(idx))
        copies = pkeys.get("copy", np.zeros(len(pkeys["frame"]), np.int32))
        for idx, verts, _ in pose_chunks(model, betas, pblocks, np.arange(len(pkeys["frame"]))):
            for i, v in zip(idx, verts, strict=True):
                path = out / "perturbed" / str(int(copies[i])) / str(pkeys["clip"][i]) / frame_name(
                    int(pkeys["frame"][i]), "png")
                save(path, mesh.render(v, K)[:, :, ::-1])
            progress.advance(len(idx))
        for fut in pending:
            if not fut.result():
                raise OSError("could not write a condition image")
    pq.write_table(pa.table({
        "clip": pa.array(records["clip"], pa.string()), "frame": pa.array(records["frame"], pa.int32()),
        "visible": pa.array(records["visible"]), "reason": pa.array(records["reason"], pa.string()),
        "transform": pa.array(records["transform"], pa.list_(pa.float32())),
        "landmarks": pa.array(records["landmarks"], pa.list_(pa.float32())),
    }), out / FACES)
    pq.write_table(pa.table({"clip": pa.array(records["clip"], pa.string()),
                             "frame": pa.array(records["frame"], pa.int32()),
                             **{side: pa.array(boxes, pa.list_(pa.float32())) for side, boxes in hands.items()}}),
                   out / HANDS)
    return {"frames": len(records["frame"]), "perturbed_frames": int(len(pkeys["frame"])), "resolution": res,
            "face_size": fsize, "faces_visible": counts["ok"],
            "faces_missing": {k: v for k, v in counts.items() if k != "ok"},
            "hands_in_view": {side: sum(b is not None for b in boxes) for side, boxes in hands.items()}}
