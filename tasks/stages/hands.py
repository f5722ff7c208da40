"""hands: each hand the body drew, redrawn by the identity's hand model, beside the face stage.

Hands are ~20-40 px wide in a 256 px frame and the body model draws them soft; the face gets its own crop, model
and paste, and so do they. Per frame of the motion, each hand's square comes from the mesh by the rule render_mesh
used for training (`render_mesh.hand_boxes`), its mesh crop is rendered at the hand model's side with the fingers
in their own colours (`render_mesh.render_hand`; a left hand mirrored), the finished frame's crop of the same square
(face stage done) is brought to that side, the hand model (finetune's `hand/`, a `Predictor` reading the mesh crop
and the soft hand) redraws it, and it goes back through the inverse transform under a feathered square. A hand out
of view, or hidden behind the body (under `min_shown` of its crop in the hand's own colours), passes through; so do
all hands when the stage is disabled or the checkpoint has no hand model (one finetuned before it). The model is
deterministic and reads the mesh of each frame alone, so a hand is as steady over time as its mesh. Only the frames
it changed are written; `final_frames` says where each finished frame is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from core.progress import Progress
from core.section import Section
from core.stage import Stage
from models import face_align, squares
from models.raster import MeshRasterizer
from tasks import smplx_table
from tasks.devices import Compute
from tasks.frames import frame_name, read_rgb, write_png
from tasks.stages import face, render_body
from tasks.stages.render_mesh import hand_boxes, hand_colors, pose_chunks, render_hand

FRAMES = "frames"
TABLE = "hands.parquet"
SIDES = ("left", "right")
OUT_OF_VIEW, HIDDEN = "out_of_view", "hidden"
BATCH = 32  # hand crops per pass of the model


class HandsParams(Section):
    """Each visible hand redrawn by the identity's hand model and blended back."""

    enabled: bool = Field(True, description="false: hands stay as the body drew them")
    min_shown: float = Field(0.04, ge=0, le=1, description="the least share of a hand's mesh crop in the hand's own "
                             "colours for it to be redrawn; below it the hand is behind the body or the other hand")
    feather: float = Field(0.12, ge=0, le=0.5, description="blend edge width, share of the hand square's side")


def describe(s: dict[str, Any]) -> str:
    if s.get("disabled"):
        return "disabled"
    if s.get("no_model"):
        return "no hand model in the checkpoint: hands as the body drew them"
    skipped = s.get("skipped", {})
    return (f"{s['redone']} hands redone in {s['frames_changed']} of {s['frames']} frames "
            f"({skipped.get(OUT_OF_VIEW, 0)} out of view, {skipped.get(HIDDEN, 0)} hidden)")


STAGE = Stage(
    "hands", flow="render", scope="render",
    inputs=("motion", "render_body", "face", "finetune", "smplx_fit", "render_mesh"), params=HandsParams,
    reads=("render_mesh",), body_model=True, resource="gpu", device=True, in_dvc=False, describe=describe,
    outputs=(f"{FRAMES}/?", TABLE),
    description="hand crops → the identity's hand model → feathered blend; hidden hands pass through")


def final_frames(render_body_dir: Path, face_dir: Path, hands_dir: Path, n: int) -> list[Path]:
    """A render's finished frames: this stage's where it redid a hand, else the face stage's, else render_body's."""
    before = face.final_frames(render_body_dir, face_dir, n)
    redone = hands_dir / FRAMES
    return [redone / frame_name(i, "png") if (redone / frame_name(i, "png")).is_file() else before[i]
            for i in range(n)]


def _write_table(out: Path, reasons: dict[str, list[str | None]], boxes: dict[str, list[list[float] | None]]
                 ) -> None:
    n = len(reasons["left"])
    pq.write_table(pa.table({
        "frame": pa.array(np.arange(n), pa.int32()),
        **{f"{side}_reason": pa.array(reasons[side], pa.string()) for side in SIDES},
        **{f"{side}_box": pa.array(boxes[side], pa.list_(pa.float32())) for side in SIDES},
    }), out / TABLE)


def square_mask(size: int, feather: float) -> np.ndarray:
    """A size × size uint8 mask, full inside and falling linearly to 0 at the edges over `feather` px: the hand
    model's square meets the frame without a seam."""
    edge = np.minimum(np.arange(size), np.arange(size)[::-1]).astype(np.float32)
    ramp = np.clip(edge / max(feather, 1e-6), 0, 1)
    return np.round(np.minimum.outer(ramp, ramp) * 255).astype(np.uint8)


def run(inputs: dict[str, Path], out: Path, params: HandsParams, progress: Progress, *, settings: Any,
        compute: Compute) -> dict[str, Any]:
    import torch

    from models import body
    from models.predictor import Predictor
    from tasks.training import HAND

    _, blocks = smplx_table.read(inputs["motion"] / smplx_table.TABLE)
    n = len(blocks["transl"])
    model_dir = inputs["finetune"] / HAND
    if not params.enabled or not (model_dir / "config.json").is_file():
        why = "disabled" if not params.enabled else "no hand model"
        _write_table(out, {s: [why] * n for s in SIDES}, {s: [None] * n for s in SIDES})
        return {"frames": n, "redone": 0, "frames_changed": 0,
                **({"disabled": True} if not params.enabled else {"no_model": True})}
    source = face.final_frames(inputs["render_body"], inputs["face"], n)
    res = read_rgb(source[0]).shape[0]
    model = Predictor.from_pretrained(model_dir).to(compute.device).eval()
    size = int(settings.render_mesh.hand_size)
    betas, side, K = render_body.camera(inputs["smplx_fit"], settings)

    # 1. where each hand is, and its mesh crop
    mesh_model = body.load(inputs["body_model"])
    reasons: dict[str, list[str | None]] = {s: [] for s in SIDES}
    boxes: dict[str, list[list[float] | None]] = {s: [] for s in SIDES}
    conds: dict[tuple[int, str], np.ndarray] = {}
    progress.start("hands: locating hands", n)
    with MeshRasterizer(mesh_model.faces.astype(np.int64), size, ambient=settings.render_mesh.ambient,
                        vertex_colors=hand_colors(mesh_model)) as mesh:
        for idx, verts, joints in pose_chunks(mesh_model, betas, blocks, np.arange(n)):
            for i, v, j in zip(idx, verts, joints, strict=True):
                for s, box in hand_boxes(j, K, side).items():
                    boxes[s].append(box)
                    if box is None:
                        reasons[s].append(OUT_OF_VIEW)
                        continue
                    cond = render_hand(mesh, v, K, box, side, s == "left")
                    if squares.hand_share(cond) < params.min_shown:
                        reasons[s].append(HIDDEN)
                        continue
                    reasons[s].append(None)
                    conds[(int(i), s)] = cond
            progress.advance(len(idx))
    _write_table(out, reasons, boxes)

    # 2. redraw every shown hand, a batch of crops at a time, and 3. blend them back, frame by frame
    mask = square_mask(size, params.feather * size)
    todo = sorted(conds)
    redrawn: dict[tuple[int, str], np.ndarray] = {}
    (out / FRAMES).mkdir()
    frames_changed = 0
    progress.start("hands: redrawing", len(todo))
    dtype = next(model.parameters()).dtype
    for start in range(0, len(todo), BATCH):
        keys = todo[start:start + BATCH]
        soft = []
        for i, s in keys:
            crop = cv2.warpAffine(read_rgb(source[i]), squares.crop_transform(boxes[s][i], res, size), (size, size),
                                  flags=cv2.INTER_LINEAR)
            soft.append(crop[:, ::-1] if s == "left" else crop)

        def signed(images: list[np.ndarray]) -> torch.Tensor:
            x = torch.from_numpy(np.ascontiguousarray(np.stack(images))).permute(0, 3, 1, 2)
            return x.to(compute.device, dtype).div(127.5).sub(1)

        with torch.no_grad():
            y = model(signed([conds[k] for k in keys]), signed(soft))
        y = ((y.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        for (i, s), hand in zip(keys, y, strict=True):
            redrawn[(i, s)] = hand[:, ::-1] if s == "left" else hand
        progress.advance(len(keys))
        # frames whose hands are all redrawn are blended and written now: memory stays a batch's worth
        done = {i for i, _ in keys if all((i, s) in redrawn or (i, s) not in conds for s in SIDES)}
        for i in sorted(done):
            frame = read_rgb(source[i])
            for s in SIDES:
                if (i, s) in redrawn:
                    frame = face_align.paste(frame, redrawn.pop((i, s)), mask,
                                             squares.crop_transform(boxes[s][i], res, size), 0.0)
            write_png(out / FRAMES / frame_name(i, "png"), frame)
            frames_changed += 1
    skipped = {why: sum(r == why for s in SIDES for r in reasons[s]) for why in (OUT_OF_VIEW, HIDDEN)}
    return {"frames": n, "redone": len(todo), "frames_changed": frames_changed, "skipped": skipped,
            "resolution": size, "device": compute.device.type}
