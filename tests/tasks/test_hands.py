"""The hand stage: each hand's square from the mesh, its finger-coloured mesh crop, the hand model learnt in
finetune, and the redrawn hands blended back where a hand is shown; hidden and out-of-view hands pass through."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from core.artifacts import read_manifest
from core.progress import NullProgress
from core.workspace import Workspace
from models import squares
from models.predictor import Predictor
from models.raster import MESH_COLOR, MeshRasterizer
from tasks.frames import frame_name, read_rgb
from tasks.registry import artifact_dir
from tasks.stages import face, hands
from tasks.stages.render_mesh import FINGER_COLORS, PALM_COLOR, RenderMeshParams, render_hand
from tasks.training import HAND
from tasks.training_data import hand_crops
from tests.conftest import ONBOARDED_ID, copy_workspace, held_out, render, video_frames

slow = pytest.mark.slow
ID = ONBOARDED_ID


def test_a_crop_transform_maps_the_square_onto_the_crop() -> None:
    m = squares.crop_transform([0.25, 0.5, 0.125], 256, 64)  # the square at (64, 128), 32 px, to 64 px
    corners = np.array([[64, 128, 1], [96, 160, 1]], float) @ m.T
    assert np.allclose(corners, [[0, 0], [64, 64]])


def test_the_crop_camera_renders_the_frames_pixels_and_mirrors_a_left_hand() -> None:
    from models.raster import gl_context
    from tests.models.test_raster import BOX_FACES, SIZE, K, box

    verts = box((0.1, -0.05, 3.0), 0.4, ax=0.3, ay=0.5)
    ctx = gl_context()
    try:
        with (MeshRasterizer(BOX_FACES, SIZE, ctx=ctx) as full, MeshRasterizer(BOX_FACES, 32, ctx=ctx) as same,
              MeshRasterizer(BOX_FACES, 128, ctx=ctx) as big):
            whole = full.render(verts, K)
            square = [20 / SIZE, 24 / SIZE, 32 / SIZE]  # 32 px at (20, 24), the box's corner
            right = render_hand(same, verts, K, square, SIZE, left=False)  # at the frame's own scale
            left = render_hand(same, verts, K, square, SIZE, left=True)
            scaled = render_hand(big, verts, K, square, SIZE, left=False)  # four times the frame's scale
    finally:
        ctx.release()
    assert (right > 0).any() and (right == 0).any()
    assert np.abs(right.astype(int) - whole[24:56, 20:52].astype(int)).max() <= 1
    assert np.array_equal(left, right[:, ::-1])
    # at another scale the crop lies where warpAffine puts the frame's pixels: the silhouettes' centres agree to a
    # fraction of a pixel (a camera off by half a frame pixel would put them 1.5 crop pixels apart)
    warped = cv2.warpAffine((whole.max(-1) > 0).astype(np.float32), squares.crop_transform(square, SIZE, 128),
                            (128, 128), flags=cv2.INTER_LINEAR)
    drawn = (scaled.max(-1) > 0).astype(np.float32)
    def centre(m: np.ndarray) -> np.ndarray:
        return np.array([(m.sum(0) * np.arange(128)).sum(), (m.sum(1) * np.arange(128)).sum()]) / m.sum()

    assert np.abs(centre(drawn) - centre(warped)).max() < 0.5, (centre(drawn), centre(warped))


def test_a_hand_crop_colours_its_own_hand_only() -> None:
    import torch

    from models import smplx_layout as layout
    from tasks.stages.render_mesh import hand_colors

    owners = [layout.PELVIS, layout.L_WRIST, layout.R_WRIST, *layout.HAND_JOINTS["left"][::3],
              *layout.HAND_JOINTS["right"][::3]]  # body, both palms, each finger's base joint on both hands
    model = SimpleNamespace(lbs_weights=torch.nn.functional.one_hot(torch.tensor(owners), layout.N_JOINTS).float())
    left = hand_colors(model, "left")
    assert np.allclose(left[[0, 2, *range(8, 13)]], MESH_COLOR)  # the body and the other hand: the mesh colour
    assert np.allclose(left[1], PALM_COLOR) and np.allclose(left[3:8], FINGER_COLORS)
    right = hand_colors(model, "right")
    assert np.allclose(right[8:13], FINGER_COLORS) and np.allclose(right[3:8], MESH_COLOR)


def test_hand_share_counts_the_hands_colours_only() -> None:
    crop = np.zeros((10, 10, 3), np.uint8)
    crop[:5] = np.round(np.asarray(MESH_COLOR) * 200)  # the body, shaded
    assert squares.hand_share(crop) == 0
    for k, colour in enumerate((*FINGER_COLORS, PALM_COLOR)):
        crop[5 + k // 3, (k % 3) * 3:(k % 3) * 3 + 3] = np.round(np.asarray(colour) * 120)  # shaded darker
    assert squares.hand_share(crop) == pytest.approx(18 / 100)


def test_training_softens_a_hand_like_the_body_draws_it_reproducibly() -> None:
    import torch

    from tasks.training import soften

    g = torch.Generator().manual_seed(0)
    real = (torch.rand(4, 3, 64, 64, generator=g) * 2 - 1)  # all detail
    a = soften(real, torch.Generator().manual_seed(1))
    b = soften(real, torch.Generator().manual_seed(1))
    assert a.shape == real.shape and torch.equal(a, b)
    detail = lambda x: (x[..., 1:, :] - x[..., :-1, :]).abs().mean()  # noqa: E731
    assert detail(a) < 0.3 * detail(real)  # at least halved resolution: most of the pixel-to-pixel detail gone
    flat = torch.full((2, 3, 64, 64), 0.5)
    assert (soften(flat, torch.Generator().manual_seed(2)) - 0.5).abs().max() < 0.2  # drift and noise only


def test_the_blend_mask_is_zero_at_the_edge_and_full_inside() -> None:
    mask = squares.square_mask(64, 8)
    assert mask[0].max() == 0 and mask[:, 0].max() == 0 and mask[-1].max() == 0
    assert (mask[8:56, 8:56] == 255).all() and mask[4, 32] == 128
    assert (np.diff(mask[:32, 32].astype(int)) >= 0).all()


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory, trained: Path) -> Workspace:
    return Workspace(copy_workspace(trained, tmp_path_factory.mktemp("ws") / "ws"))


@slow
def test_finetune_learns_a_hand_model_from_the_identitys_mirrored_hand_crops(ws: Workspace) -> None:
    render_dir, ingest = artifact_dir(ws, "render_mesh", ID), artifact_dir(ws, "ingest", ID)
    tab = pq.read_table(render_dir / "hands.parquet").to_pandas()
    meta = json.loads((ingest / "meta.json").read_text())
    train = {c["name"] for c in meta["clips"] if c["split"] == "train"}
    shown = sum(b is not None for side in ("left", "right") for c, b in zip(tab["clip"], tab[side], strict=True)
                if c in train)
    conds, reals = hand_crops(ingest, render_dir)
    side = RenderMeshParams().hand_size
    assert shown > 0 and conds.shape == reals.shape == (shown, side, side, 3)
    # every mesh crop shows its hand in the hands' colours; a left one is mirrored like its frame crop
    assert min(squares.hand_share(c) for c in conds) > 0
    k = 0
    for c, f, left, right in zip(tab["clip"], tab["frame"], tab["left"], tab["right"], strict=True):
        if c not in train:
            continue
        if left is not None:
            frame = read_rgb(ingest / "frames" / c / frame_name(int(f)))
            crop = cv2.warpAffine(frame, squares.crop_transform(left, frame.shape[0], side), (side, side),
                                  flags=cv2.INTER_LINEAR)
            assert np.array_equal(reals[k], crop[:, ::-1]) and not np.array_equal(reals[k], crop)
            break
        k += right is not None
    few, _ = hand_crops(ingest, render_dir, most=5)  # a long video: evenly spread, never more than asked
    assert len(few) == 5 and np.array_equal(few[0], conds[0]) and np.array_equal(few[-1], conds[-1])
    summary = read_manifest(artifact_dir(ws, "finetune", ID))["summary"]
    assert summary["hand"]["crops"] == shown and summary["hand"]["steps"] == 10
    model = Predictor.from_pretrained(artifact_dir(ws, "finetune", ID) / HAND)
    assert not model.own_reference


@slow
def test_shown_hands_are_redrawn_and_hidden_or_absent_ones_pass_through(ws: Workspace) -> None:
    blocks, _ = held_out(ws)
    blocks = {k: v.copy() for k, v in blocks.items()}
    blocks["transl"][12:14, 0] += 5.0  # the whole body far out of view to the side: no hand to redo
    subject = render(ws, blocks, overrides={"face": {"check_skin": 0.0}})
    out = artifact_dir(ws, "hands", subject)
    table = pq.read_table(out / hands.TABLE).to_pandas()
    assert len(table) == 19
    assert set(table["left_reason"][12:14]) == set(table["right_reason"][12:14]) == {hands.OUT_OF_VIEW}
    table = table.astype({"left_reason": object, "right_reason": object}).where(table.notna(), None)
    shown = {int(f) for f, a, b in zip(table["frame"], table["left_reason"], table["right_reason"], strict=True)
             if a is None or b is None}
    written = {int(p.stem) for p in (out / hands.FRAMES).glob("*.png")}
    assert shown and written == shown
    summary = read_manifest(out)["summary"]
    reasons = [*table["left_reason"], *table["right_reason"]]
    assert summary["redone"] == sum(r is None for r in reasons) and summary["frames_changed"] == len(shown)
    assert summary["skipped"] == {hands.OUT_OF_VIEW: reasons.count(hands.OUT_OF_VIEW),
                                  hands.HIDDEN: reasons.count(hands.HIDDEN)}
    # the video is made of the finished frames: the hands' where they were redrawn
    final = hands.final_frames(artifact_dir(ws, "render_body", subject), artifact_dir(ws, "face", subject), out, 19)
    assert {i for i, p in enumerate(final) if p.parent == out / hands.FRAMES} == shown
    assert len(video_frames(artifact_dir(ws, "assemble", subject) / "video.mp4")) == 19
    # a redrawn frame differs from its source inside a hand's square only
    i = min(shown)
    before = read_rgb(face.final_frames(artifact_dir(ws, "render_body", subject), artifact_dir(ws, "face", subject),
                                        19)[i]).astype(int)
    after = read_rgb(final[i]).astype(int)
    changed = np.argwhere(np.abs(after - before).max(-1) > 0)
    assert len(changed)
    boxes = [[float(v) * 64 for v in table[f"{k}_box"][i]] for k in ("left", "right")
             if table[f"{k}_reason"][i] is None]
    inside = np.zeros(len(changed), bool)
    for bx, by, bs in boxes:
        inside |= ((changed[:, 1] >= bx - 1) & (changed[:, 1] <= bx + bs + 1) & (changed[:, 0] >= by - 1)
                   & (changed[:, 0] <= by + bs + 1))
    assert inside.all(), (boxes, changed[~inside][:5])


@slow
def test_disabled_or_without_a_hand_model_hands_stay_as_the_body_drew_them(ws: Workspace, tmp_path: Path) -> None:
    blocks, _ = held_out(ws)
    blocks = {k: v[:6] for k, v in blocks.items()}
    subject = render(ws, blocks, overrides={"hands": {"enabled": False}})
    out = artifact_dir(ws, "hands", subject)
    assert not (out / hands.FRAMES).exists()
    assert read_manifest(out)["summary"]["disabled"] is True
    assert set(pq.read_table(out / hands.TABLE).to_pandas()["left_reason"]) == {"disabled"}
    # a hand showing less of itself than `min_shown` is behind something: it passes through, counted as hidden
    subject = render(ws, blocks, overrides={"hands": {"min_shown": 1.0}})
    out = artifact_dir(ws, "hands", subject)
    summary = read_manifest(out)["summary"]
    assert summary["redone"] == 0 and summary["skipped"][hands.HIDDEN] > 0 and not list((out / hands.FRAMES).glob("*"))
    reasons = pq.read_table(out / hands.TABLE).to_pandas()
    hidden = (reasons[["left_reason", "right_reason"]] == hands.HIDDEN).to_numpy().sum()
    assert summary["skipped"][hands.HIDDEN] == hidden
    # a checkpoint finetuned before the hand stage: the render still runs, hands untouched
    old = tmp_path / "finetune"
    shutil.copytree(artifact_dir(ws, "finetune", ID), old, ignore=shutil.ignore_patterns(HAND))
    (tmp_path / "out").mkdir()
    summary = hands.run({"motion": artifact_dir(ws, "motion", subject), "finetune": old}, tmp_path / "out",
                        hands.HandsParams(), NullProgress(), settings=None, compute=None)
    assert summary == {"frames": 6, "redone": 0, "frames_changed": 0, "no_model": True}
    assert not (tmp_path / "out" / hands.FRAMES).exists()
    assert set(pq.read_table(tmp_path / "out" / hands.TABLE).to_pandas()["right_reason"]) == {"no hand model"}
