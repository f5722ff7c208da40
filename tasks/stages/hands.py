"""hands: each hand the body drew, redrawn by the identity's hand model, beside the face stage.

Hands are ~20-40 px wide in a 256 px frame and the body model draws them soft; the face gets its own crop, model
and paste, and so do they. Per frame of the motion, each hand's square comes from the mesh by the rule render_mesh
used for training (`render_mesh.hand_boxes`), its mesh crop is rendered at the hand model's side with the fingers
in their own colours (`render_mesh.render_hand`; a left hand mirrored), the finished frame's crop of the same square
(face stage done) is brought to that side, the hand model (finetune's `hand/`, a `Predictor` reading the mesh crop
and the soft hand) redraws it, and it goes back through the inverse transform under a feathered square. A hand out
of view, or hidden behind the body or the other hand (under `min_shown` of its crop in its own colours), passes
through; so do all hands when the stage is disabled or the checkpoint has no hand model (one finetuned before it).
The model is deterministic and reads the mesh of each frame alone, so a hand is as steady over time as its mesh.
Only the frames it changed are written; `final_frames` says where each finished frame is.
"""

from __future__ import annotations

from contextlib import ExitStack
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
from tasks import smplx_table
from tasks.devices import Compute
from tasks.frames import HAND, frame_name, read_rgb, write_png
from tasks.stages import face, render_body
from tasks.stages.render_mesh import hand_boxes, hand_rasterizers, pose_chunks, render_hand

FRAMES = "frames"
TABLE = "hands.parquet"
SIDES = ("left", "right")
OUT_OF_VIEW, HIDDEN = "out_of_view", "hidden"
BATCH = 32  # hand crops per pass of the model (a chunk of frames has at most twice pose_chunks' CHUNK)


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
    inputs=("motion", "render_body", "face", "finetune", "smplx_fit"), params=HandsParams,
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


def run(inputs: dict[str, Path], out: Path, params: HandsParams, progress: Progress, *, settings: Any,
        compute: Compute) -> dict[str, Any]:
    import torch

    from models import body
    from models.predictor import Predictor

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
    size = face.crop_size(inputs["finetune"], HAND)
    betas, side, K = render_body.camera(inputs["smplx_fit"], settings)
    mesh_model = body.load(inputs["body_model"])
    mask = squares.square_mask(size, params.feather * size)
    reasons: dict[str, list[str | None]] = {s: [] for s in SIDES}
    boxes: dict[str, list[list[float] | None]] = {s: [] for s in SIDES}
    redone = frames_changed = 0
    (out / FRAMES).mkdir()

    progress.start("hands: redrawing", n)
    with ExitStack() as stack:
        meshes = {s: stack.enter_context(r) for s, r in
                  hand_rasterizers(mesh_model, size, settings.render_mesh.ambient, None).items()}
        # a chunk of frames at a time, from where each hand is to the pasted frames: memory stays a chunk's worth
        for idx, verts, joints in pose_chunks(mesh_model, betas, blocks, np.arange(n)):
            # 1. where each hand is, and its mesh crop
            conds: dict[tuple[int, str], np.ndarray] = {}
            for i, v, j in zip(idx, verts, joints, strict=True):
                for s, box in hand_boxes(j, K, side).items():
                    boxes[s].append(box)
                    cond = None if box is None else render_hand(meshes[s], v, K, box, side, s == "left")
                    why = OUT_OF_VIEW if cond is None else (
                        HIDDEN if squares.hand_share(cond) < params.min_shown else None)
                    reasons[s].append(why)
                    if why is None:
                        conds[(int(i), s)] = cond
            if not conds:
                progress.advance(len(idx))
                continue
            # 2. the finished frame's crop of each shown hand (mirrored as its mesh crop is), redrawn in one batch
            keys = sorted(conds)
            frames = {i: read_rgb(source[i]) for i in {i for i, _ in keys}}
            soft = []
            for i, s in keys:
                crop = cv2.warpAffine(frames[i], squares.crop_transform(boxes[s][i], res, size), (size, size),
                                      flags=cv2.INTER_LINEAR)
                soft.append(crop[:, ::-1] if s == "left" else crop)
            hands_out = []
            for start in range(0, len(keys), BATCH):
                with torch.no_grad():
                    hands_out.append(face.crop_model(model, [conds[k] for k in keys[start:start + BATCH]],
                                                     soft[start:start + BATCH]))
            # 3. each back into its frame under the feathered square
            for (i, s), hand in zip(keys, np.concatenate(hands_out), strict=True):
                frames[i] = face_align.paste(frames[i], hand[:, ::-1] if s == "left" else hand, mask,
                                             squares.crop_transform(boxes[s][i], res, size), 0.0)
            for i, frame in sorted(frames.items()):
                write_png(out / FRAMES / frame_name(i, "png"), frame)
            redone += len(keys)
            frames_changed += len(frames)
            progress.advance(len(idx))
    _write_table(out, reasons, boxes)
    skipped = {why: sum(r == why for s in SIDES for r in reasons[s]) for why in (OUT_OF_VIEW, HIDDEN)}
    return {"frames": n, "redone": redone, "frames_changed": frames_changed, "skipped": skipped,
            "resolution": size, "device": compute.device.type}
