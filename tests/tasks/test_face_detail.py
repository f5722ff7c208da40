"""The face detail model: render_mesh's jaw-coloured face crops, the model finetune learns from them, and the face
stage redrawing each shown face with it (`face.redraw: detail`), or with the Face SGDM where the checkpoint has none."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from core.artifacts import read_manifest
from core.errors import StageError
from core.progress import NullProgress
from core.workspace import Workspace
from models import face_align
from models.face_bank import FILE as BANK_FILE
from models.face_bank import FaceBank
from models.predictor import Predictor
from models.raster import MESH_COLOR
from tasks.frames import FACE_DETAIL, FACE_JAW, frame_name, read_meta, read_rgb
from tasks.registry import artifact_dir
from tasks.stages import face
from tasks.stages.render_mesh import JAW_COLOR, face_colors
from tasks.training_data import face_crops
from tests.conftest import ONBOARDED_ID, copy_workspace, held_out, render

slow = pytest.mark.slow
ID = ONBOARDED_ID
DETAIL = {"face": {"redraw": {"tiny": "detail", "cpu": "detail", "sd15": "sgdm"}, "check_skin": 0.0}}


def jaw_share(image: np.ndarray) -> float:
    """Share of pixels in the jaw's colour, shaded or not (red well above green and blue)."""
    r, g, b = (image[..., k].astype(int) for k in range(3))
    return float(((r > 60) & (r > 2 * g + 20) & (r > 2 * b + 20)).mean())


def test_face_crops_colour_the_jaw_only() -> None:
    import torch

    from models import smplx_layout as layout

    owners = [layout.HEAD, layout.JAW, layout.NECK, layout.JAW]
    model = SimpleNamespace(lbs_weights=torch.nn.functional.one_hot(torch.tensor(owners), layout.N_JOINTS).float())
    colors = face_colors(model)
    assert np.allclose(colors[[1, 3]], JAW_COLOR) and np.allclose(colors[[0, 2]], MESH_COLOR)
    assert jaw_share(np.round(np.asarray([[JAW_COLOR, MESH_COLOR]]) * 150).astype(np.uint8)) == 0.5


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory, trained: Path) -> Workspace:
    return Workspace(copy_workspace(trained, tmp_path_factory.mktemp("ws") / "ws"))


@slow
def test_finetune_learns_a_face_detail_model_from_the_jaw_coloured_crops(ws: Workspace) -> None:
    render_dir, ingest = artifact_dir(ws, "render_mesh", ID), artifact_dir(ws, "ingest", ID)
    tab = pq.read_table(render_dir / "faces.parquet").to_pandas()
    train = {c["name"] for c in read_meta(ingest)["clips"] if c["split"] == "train"}
    visible = [(c, int(f), np.asarray(t).reshape(2, 3)) for c, f, v, t
               in zip(tab["clip"], tab["frame"], tab["visible"], tab["transform"], strict=True) if v and c in train]
    # render_mesh writes a jaw-coloured crop beside every plain face crop, and only there
    written = {(p.parent.name, int(p.stem)) for p in (render_dir / FACE_JAW).rglob("*.png")}
    assert written == {(c, f) for c, f, v in zip(tab["clip"], tab["frame"], tab["visible"], strict=True) if v}
    c, f, m = visible[0]
    plain = read_rgb(render_dir / "face" / c / frame_name(f, "png"))
    jawed = read_rgb(render_dir / FACE_JAW / c / frame_name(f, "png"))
    assert jawed.shape == plain.shape and jaw_share(plain) == 0 and jaw_share(jawed) > 0.002
    # the same mesh, only coloured otherwise (a silhouette pixel may round to black in one colour and not the other)
    assert ((jawed.max(-1) > 0) != (plain.max(-1) > 0)).mean() < 0.01
    # each visible face's 51 mesh landmarks in its own crop: the alignment of its five points is already done there
    landmarks = {(c, int(f)): np.asarray(lm).reshape(51, 2) for c, f, lm
                 in zip(tab["clip"], tab["frame"], tab["landmarks"], strict=True) if lm is not None}
    assert set(landmarks) == written
    again = face_align.similarity(face_align.five_points(landmarks[(c, f)]).astype(np.float64), face_align.TEMPLATE)
    assert np.allclose(again, np.eye(2, 3), atol=1e-4)
    size = 16
    conds, bank = face_crops(ingest, render_dir, size)
    reals = bank.crops
    assert conds.shape == reals.shape == (len(visible), size, size, 3)
    keys = [(str(a), int(b)) for a, b in zip(bank.clips, bank.frames, strict=True)]
    assert keys == [(c_, f_) for c_, f_, _ in visible]
    assert np.allclose(bank.landmarks[0], landmarks[(c, f)])
    frame = read_rgb(ingest / "frames" / c / frame_name(f))
    crop = cv2.warpAffine(frame, m, plain.shape[:2][::-1], flags=cv2.INTER_LINEAR)
    assert np.array_equal(reals[0], cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA))
    few, small = face_crops(ingest, render_dir, size, most=3)
    assert len(few) == len(small) == 3 and np.array_equal(few[0], conds[0]) and np.array_equal(few[-1], conds[-1])
    summary = read_manifest(artifact_dir(ws, "finetune", ID))["summary"]["face_detail"]
    assert summary["steps"] == 10 and summary["crops"] == summary["bank"] == len(visible)
    assert summary["resolution"] == 64
    saved = artifact_dir(ws, "finetune", ID) / FACE_DETAIL
    model = Predictor.from_pretrained(saved)
    assert not model.own_reference and model.config.inputs == 3  # mesh crop, bank face, the body's face
    kept = FaceBank.load(saved)
    assert len(kept) == len(visible) and kept.crops.shape[1:] == (64, 64, 3)


@slow
def test_the_face_detail_model_redraws_each_shown_face_inside_its_mask(ws: Workspace, tmp_path: Path) -> None:
    blocks, _ = held_out(ws)
    blocks = {k: v[:8].copy() for k, v in blocks.items()}
    blocks["transl"][5:7, 0] += 5.0  # out of view to the side: those frames keep the body's
    subject = render(ws, blocks, overrides=DETAIL)
    out = artifact_dir(ws, "face", subject)
    summary = read_manifest(out)["summary"]
    reasons = pq.read_table(out / face.TABLE).to_pandas()["reason"]
    shown = {i for i, r in enumerate(reasons) if not isinstance(r, str)}  # no reason to skip it
    assert summary["redraw"] == "detail" and summary["enhanced"] == len(shown) and {5, 6}.isdisjoint(shown)
    bank = summary["bank"]
    assert bank["faces"] == len(FaceBank.load(artifact_dir(ws, "finetune", ID) / FACE_DETAIL))
    assert f"from {bank['used']} of the {bank['faces']} training faces in its bank" in face.describe(summary)
    assert {int(p.stem) for p in (out / face.FRAMES).glob("*.png")} == shown
    assert not (out / face.MASK).exists()  # the head mask is the SGDM's: not made for the detail model
    # the model read the mesh with its jaw coloured, as it learnt
    assert all(jaw_share(read_rgb(out / face.COND / frame_name(i, "png"))) > 0.002 for i in shown)
    # a redrawn frame differs from the body's only inside the crop's square (the whole crop is redrawn)
    i = min(shown)
    body = read_rgb(artifact_dir(ws, "render_body", subject) / "frames" / frame_name(i, "png")).astype(int)
    after = read_rgb(out / face.FRAMES / frame_name(i, "png")).astype(int)
    changed = np.abs(after - body).max(-1) > 0
    m = np.asarray(pq.read_table(out / face.TABLE).to_pandas()["transform"][i], np.float64).reshape(2, 3)
    side = summary["resolution"]
    square = cv2.warpAffine(np.full((side, side), 255, np.uint8), cv2.invertAffineTransform(m), body.shape[:2][::-1],
                            flags=cv2.INTER_LINEAR) > 0
    inner = cv2.erode(square.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
    assert not (changed & ~square).any() and changed[inner].mean() > 0.5
    import torch

    from tasks import registry
    from tasks.devices import Compute
    from tasks.runner import body_model_path

    def rerun(finetune: Path, name: str, **more: float) -> dict:
        inputs = {**{k: artifact_dir(ws, k, subject) for k in ("motion", "render_body")},
                  **{k: artifact_dir(ws, k, ID) for k in ("smplx_fit", "ingest", "render_mesh")},
                  "finetune": finetune, "body_model": body_model_path(ws)}
        params = face.FaceParams(**{**registry.params(ws).face.model_dump(), **DETAIL["face"], **more})
        (tmp_path / name).mkdir()
        return face.run(inputs, tmp_path / name, params, NullProgress(),
                        settings=registry.settings(ws, face.STAGE), compute=Compute(torch.device("cpu")))

    # the bank faces are one path: each frame's nearest with no charge for a jump, none at a prohibitive one
    each = rerun(artifact_dir(ws, "finetune", ID), "each", detail_switch=0.0)["bank"]
    steady = rerun(artifact_dir(ws, "finetune", ID), "steady", detail_switch=1e3)["bank"]
    assert steady["switches"] == 0 and each["switches"] >= bank["switches"]
    # a bank cut short, emptied or gone: one error that says what to do, nothing written
    for name, spoil in (("cut", lambda f: f.write_bytes(f.read_bytes()[:1000])),
                        ("empty", lambda f: f.write_bytes(b"")), ("gone", lambda f: f.unlink())):
        spoilt = tmp_path / f"finetune_{name}"
        shutil.copytree(artifact_dir(ws, "finetune", ID), spoilt)
        spoil(spoilt / FACE_DETAIL / BANK_FILE)
        with pytest.raises(StageError, match="missing or unreadable .*: run finetune again"):
            rerun(spoilt, f"spoilt_{name}")
        assert not list((tmp_path / f"spoilt_{name}").iterdir())
    # a checkpoint finetuned before the face detail model: the Face SGDM redraws the faces
    old = tmp_path / "finetune"
    shutil.copytree(artifact_dir(ws, "finetune", ID), old, ignore=shutil.ignore_patterns(FACE_DETAIL))
    summary = rerun(old, "sgdm")
    assert summary["redraw"] == "sgdm" and summary["enhanced"] == len(shown) and summary["scheduler"]
    assert "no face detail model" in summary["note"] and "by the Face SGDM" in face.describe(summary)
    # a face detail model from before the bank (the mesh crop and the body's face only) still redraws them
    Predictor(channels=(8, 16), norm_num_groups=4).save_pretrained(old / FACE_DETAIL)
    summary = rerun(old, "before_bank")
    assert summary["redraw"] == "detail" and summary["enhanced"] == len(shown) and "bank" not in summary
    assert "before its bank" in summary["note"] and "run finetune again" in face.describe(summary)
    # untrained, it is the body's own face (but for resampling), where the bank's model starts from a training face
    frame = read_rgb(tmp_path / "before_bank" / face.FRAMES / frame_name(i, "png")).astype(int)
    assert np.abs(frame - body).mean() < 1 and np.abs(after - body).mean() > 2
