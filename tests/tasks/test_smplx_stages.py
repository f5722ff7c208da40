"""The SMPL-X stages on real video: fit report, perturbation, mesh conditions, body model choice, motion import."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from cli.main import app
from core.artifacts import read_manifest
from core.errors import StageError
from core.progress import NullProgress
from core.workspace import Workspace
from models import body, face_align
from models import retarget as rt
from tasks import runner, smplx_table
from tasks.registry import artifact_dir
from tasks.stages import perturb, render_mesh
from tasks.stages.perturb import PerturbParams
from tasks.stages.render_mesh import RenderMeshParams
from tests.conftest import ONBOARDED_ID, copy_workspace, cut_clip, shared_video

pytestmark = pytest.mark.slow
ID = ONBOARDED_ID


def set_param(root: Path, section: str, key: str, value: object) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params.setdefault(section, {})[key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory, onboarded: Path) -> Workspace:
    """The short seated clip through every stage up to render_mesh, without Prefect: the session's template."""
    return Workspace(copy_workspace(onboarded, tmp_path_factory.mktemp("smplx") / "ws"))


def test_fit_report_and_outputs(fitted: Workspace) -> None:
    art = artifact_dir(fitted, "smplx_fit", ID)
    s = read_manifest(art)["summary"]
    assert s["frames"] == 63 and s["clips"] == 2
    # a 128 px crop of a real anchor: the fit lands within a few percent and is steadier than the detections
    assert s["error_pct"]["body"] < 4 and s["error_pct"]["face"] < 3 and s["error_pct"]["hands"] < 6
    for part in ("body", "hands", "face"):
        assert s["error_p90_px"][part] >= s["error_px"][part] > 0
        assert s["error_pct"][part] == pytest.approx(100 * s["error_px"][part] / 128, abs=1e-2)
    assert s["jitter_ratio"] < 0.8
    assert s["jitter_ratio"] == pytest.approx(s["jitter_fit_px"] / s["jitter_detections_px"], rel=1e-3)
    keys, blocks = smplx_table.read(art / smplx_table.TABLE)
    assert len(keys["frame"]) == 63 and set(keys["split"]) == {"train", "test"}
    assert {k: v.shape[1] for k, v in blocks.items()} == smplx_table.BLOCKS
    assert all(np.isfinite(v).all() for v in blocks.values())
    ident = smplx_table.read_identity(art / smplx_table.IDENTITY)
    assert len(ident["betas"]) == 10
    assert ident["camera"] == {"focal": 192.0, "cx": 64.0, "cy": 64.0, "size": 128}
    # the person faces the camera: the fitted body's forward axis points back at the origin
    forward = np.array([0, 0, 1.0])
    from scipy.spatial.transform import Rotation

    facing = Rotation.from_rotvec(blocks["global_orient"]).apply(forward)
    assert (facing[:, 2] < -0.8).all()
    assert (blocks["transl"][:, 2] > 0.5).all()
    # the per-frame error table behind the report's plot: one row per frame, its median near the summary's
    import pandas as pd

    errors = pd.read_csv(art / "fit_error.csv")
    assert list(errors.columns) == ["index", "clip", "frame", "body_pct", "hands_pct", "face_pct"]
    assert len(errors) == 63 and errors["index"].tolist() == list(range(63))
    assert errors["body_pct"].notna().all()
    assert errors["body_pct"].median() == pytest.approx(s["error_pct"]["body"], rel=0.5)


def test_fit_manifest_records_the_body_model(fitted: Workspace) -> None:
    man = read_manifest(artifact_dir(fitted, "smplx_fit", ID))
    entry = next(i for i in man["inputs"] if i.get("kind") == "body_model")
    path = Path(entry["path"])  # where the workspace that made it (the session's template) kept it
    assert path.name == "SMPLX_NEUTRAL.npz" and path.parts[-4:-2] == (".anchor", "body_models")
    here = runner.body_model_path(fitted)  # this workspace's: the same model, by content
    assert here.parent.parent == fitted.state / "body_models" and here.name == path.name
    assert entry["sha256"] == hashlib.sha256(here.read_bytes()).hexdigest()


def test_perturb_is_seeded_noise_on_training_frames(fitted: Workspace, tmp_path: Path) -> None:
    fit_keys, fit_blocks = smplx_table.read(artifact_dir(fitted, "smplx_fit", ID) / smplx_table.TABLE)
    keys, blocks = smplx_table.read(artifact_dir(fitted, "perturb", ID) / smplx_table.TABLE)
    train = fit_keys["split"] == "train"
    assert len(keys["frame"]) == train.sum() == 44 and set(keys["split"]) == {"train"}
    noise = blocks["transl"] - fit_blocks["transl"][train]
    assert 0.005 < noise.std() < 0.02 and abs(noise.mean()) < 0.005
    np.testing.assert_array_equal(blocks["body_pose"], fit_blocks["body_pose"][train])
    inputs = {"smplx_fit": artifact_dir(fitted, "smplx_fit", ID)}
    for name, params in (("same", PerturbParams()), ("other", PerturbParams(seed=1)),
                         ("two", PerturbParams(copies=2, sigma_pose=0.02))):
        (tmp_path / name).mkdir()
        perturb.run(inputs, tmp_path / name, params, NullProgress())
    same = smplx_table.read(tmp_path / "same" / smplx_table.TABLE)[1]
    other = smplx_table.read(tmp_path / "other" / smplx_table.TABLE)[1]
    np.testing.assert_array_equal(same["transl"], blocks["transl"])
    assert not np.allclose(other["transl"], blocks["transl"])
    two_keys, two = smplx_table.read(tmp_path / "two" / smplx_table.TABLE)
    assert list(np.bincount(two_keys["copy"])) == [44, 44]
    assert 0.01 < (two["body_pose"] - np.tile(fit_blocks["body_pose"][train], (2, 1))).std() < 0.03


def test_render_mesh_outputs(fitted: Workspace) -> None:
    art = artifact_dir(fitted, "render_mesh", ID)
    s = read_manifest(art)["summary"]
    assert s["frames"] == 63 and s["perturbed_frames"] == 44 and s["resolution"] == 128 and s["face_size"] == 256
    bodies = sorted((art / "body").rglob("*.png"))
    assert len(bodies) == 63
    import cv2

    img = cv2.imread(str(bodies[10]))[:, :, ::-1]
    assert img.shape == (128, 128, 3)
    lit = img[img.sum(-1) > 30]
    # the blue-grey mesh on black: green and blue above red, a real share of the picture covered
    assert 0.1 < len(lit) / (128 * 128) < 0.9
    assert (lit[:, 1] > lit[:, 0]).mean() > 0.95 and (lit[:, 2] > lit[:, 0]).mean() > 0.95
    assert (img[0, 0] == 0).all()
    faces = pq.read_table(art / render_mesh.FACES).to_pandas()
    assert len(faces) == 63 and faces["visible"].all()
    crops = sorted((art / "face").rglob("*.png"))
    masks = sorted((art / "face_mask").rglob("*.png"))
    assert len(crops) == len(masks) == 63
    crop, mask = cv2.imread(str(crops[0])), cv2.imread(str(masks[0]), cv2.IMREAD_UNCHANGED)
    assert crop.shape == (256, 256, 3) and mask.shape == (256, 256)
    # the mask covers the face centre of the crop and not its corners
    assert mask[128, 128] == 255 and mask[0, 0] == 0 and mask[0, 255] == 0
    m = np.asarray(faces["transform"][0], np.float64).reshape(2, 3)
    assert 1.5 < np.linalg.norm(m[:, :2], axis=0).mean() < 30  # a 128 px frame's face blown up to 256
    # each hand's square sits on the mesh's hand: lit mesh pixels fill part of it, and it is hand-sized
    hands = pq.read_table(art / render_mesh.HANDS).to_pandas()
    assert len(hands) == 63 and list(hands["frame"]) == list(faces["frame"])
    boxes = [(i, b) for side in ("left", "right") for i, b in enumerate(hands[side]) if b is not None]
    assert s["hands_in_view"] == {side: int(hands[side].notna().sum()) for side in ("left", "right")}
    assert len(boxes) >= 63
    for i, b in boxes:
        x, y, size = (round(v * 128) for v in b)
        assert 0.06 * 128 - 1 <= size <= 0.4 * 128 and 0 <= x <= 128 - size and 0 <= y <= 128 - size
        img = cv2.imread(str(art / "body" / hands["clip"][i] / f"{int(hands['frame'][i]):06d}.png"))
        assert (img[y:y + size, x:x + size].sum(-1) > 30).mean() > 0.05, (i, b)


def test_render_mesh_is_byte_identical_on_rerun(fitted: Workspace) -> None:
    before = read_manifest(artifact_dir(fitted, "render_mesh", ID))["output_hash"]
    shutil.rmtree(artifact_dir(fitted, "render_mesh", ID))
    assert runner.execute(fitted, "render_mesh", ID).output_hash == before


def test_faces_turned_away_or_out_of_view_are_marked_not_fatal(fitted: Workspace, tmp_path: Path) -> None:
    src = artifact_dir(fitted, "smplx_fit", ID)
    fake = tmp_path / "fit"
    shutil.copytree(src, fake)
    keys, blocks = smplx_table.read(fake / smplx_table.TABLE)
    from scipy.spatial.transform import Rotation

    turn = Rotation.from_euler("y", 180, degrees=True)
    blocks["global_orient"][:5] = (turn * Rotation.from_rotvec(blocks["global_orient"][:5])).as_rotvec()
    blocks["transl"][5:10, 0] += 3.0  # far to the side: out of the picture
    smplx_table.write(fake / smplx_table.TABLE, keys, blocks)
    out = tmp_path / "out"
    out.mkdir()
    inputs = {"smplx_fit": fake, "perturb": artifact_dir(fitted, "perturb", ID),
              "body_model": runner.body_model_path(fitted)}
    summary = render_mesh.run(inputs, out, RenderMeshParams(), NullProgress())
    assert summary["faces_missing"]["turned_away"] == 5 and summary["faces_missing"]["out_of_view"] == 5
    assert summary["faces_visible"] == 53
    faces = pq.read_table(out / render_mesh.FACES).to_pandas()
    assert list(faces["reason"][:10]) == ["turned_away"] * 5 + ["out_of_view"] * 5
    assert faces["transform"][:10].isna().all()
    hands = pq.read_table(out / render_mesh.HANDS).to_pandas()
    assert hands["left"][5:10].isna().all() and hands["right"][5:10].isna().all()  # with the body, out of view
    assert summary["hands_in_view"]["left"] <= 58 and summary["hands_in_view"]["right"] <= 58
    clip = str(keys["clip"][0])
    assert not (out / "face" / clip / "000000.png").exists()
    assert (out / "body" / clip / "000000.png").exists()
    assert len(list((out / "face").rglob("*.png"))) == 53


def test_face_crop_is_aligned_to_the_template(fitted: Workspace) -> None:
    """The stored transform takes the projected mesh five points onto the canonical template."""
    import torch

    keys, blocks = smplx_table.read(artifact_dir(fitted, "smplx_fit", ID) / smplx_table.TABLE)
    ident = smplx_table.read_identity(artifact_dir(fitted, "smplx_fit", ID) / smplx_table.IDENTITY)
    model = body.load(runner.body_model_path(fitted))
    with torch.no_grad():
        j = model(betas=torch.tensor([ident["betas"]]), **{k: torch.from_numpy(v[:1]) for k, v in blocks.items()}
                  ).joints[0].numpy()
    lmk = j[body.LMK_START:body.LMK_START + 51]
    uv = lmk[:, :2] / lmk[:, 2:] * ident["camera"]["focal"] + 64
    pts = face_align.five_points(uv)
    faces = pq.read_table(artifact_dir(fitted, "render_mesh", ID) / render_mesh.FACES).to_pandas()
    m = np.asarray(faces["transform"][0], np.float64).reshape(2, 3)
    mapped = pts @ m[:, :2].T + m[:, 2]
    assert np.abs(mapped - face_align.TEMPLATE * 256).max() < 25


def test_body_model_path_points_at_real_smplx_files(fitted: Workspace, tmp_path: Path) -> None:
    """A user's SMPL-X folder replaces the mannequin with one line of params; a wrong path is one clear error."""
    ws = Workspace(copy_workspace(fitted.root, tmp_path / "ws"))  # its own: the fit made here is not the module's
    real = tmp_path / "models" / "smplx"
    real.mkdir(parents=True)
    shutil.copy(runner.body_model_path(ws), real / "SMPLX_NEUTRAL.npz")
    set_param(ws.root, "body_model", "path", str(tmp_path / "models"))
    assert runner.body_model_path(ws) == real / "SMPLX_NEUTRAL.npz"
    # the same bytes under another path are the same input (content, not paths): the fit is taken as it is
    assert runner.execute(ws, "smplx_fit", ID).reused
    result = runner.execute(ws, "smplx_fit", ID, overrides={"iterations": 20})
    assert not result.reused
    entry = next(i for i in read_manifest(artifact_dir(ws, "smplx_fit", ID))["inputs"]
                 if i.get("kind") == "body_model")
    assert entry["path"] == str(real / "SMPLX_NEUTRAL.npz")
    assert result.summary["frames"] == 63
    set_param(ws.root, "body_model", "path", str(tmp_path / "nowhere"))
    with pytest.raises(StageError, match="nowhere: no SMPLX_NEUTRAL.npz or .pkl there"):
        runner.execute(ws, "smplx_fit", ID)


# ---------------------------------------------------------------------------------------------- motion import
def _amass(path: Path, frames: int = 120, fps: float = 60.0) -> Path:
    t = np.arange(frames) / fps
    poses = np.zeros((frames, 165), np.float32)
    poses[:, 0] = np.pi / 2  # a y-up body standing in AMASS's z-up world
    poses[:, 3 + 15 * 3 + 2] = -1.3 + 0.3 * np.sin(2 * np.pi * t)
    trans = np.stack([0.1 * np.sin(np.pi * t), np.zeros(frames), np.full(frames, 0.9)], 1).astype(np.float32)
    np.savez(path, poses=poses, trans=trans, betas=np.zeros(16, np.float32), mocap_frame_rate=np.array(fps))
    return path


def test_motion_import_retargets_into_the_identity_scene(fitted: Workspace, tmp_path: Path) -> None:
    from tasks.stages import motion as motion_task

    out = tmp_path / "m.parquet"
    res = CliRunner().invoke(app, ["-w", str(fitted.root), "motion", "import", str(_amass(tmp_path / "a.npz")),
                                   "--identity", ID, "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "amass-npz: 120 frames at 60 fps" in res.output
    keys, blocks = smplx_table.read(out)
    assert len(keys["frame"]) == 60  # 2 s at 30 fps
    ref = motion_task.reference(artifact_dir(fitted, "smplx_fit", ID), runner.body_model_path(fitted))
    framing = ref.framing
    # head and shoulders where the identity's are, on average; the sway (0.1 m amplitude, far wider than a seated
    # presenter's) kept but held to the identity's range plus the margin
    upper = ref.joints(blocks)[:, rt.UPPER].mean(1)
    np.testing.assert_allclose(upper.mean(0), framing.upper_mean, atol=0.01)
    margin = motion_task.MotionParams().position_margin_m
    assert (upper[:, 0] >= framing.upper_range[0, 0] - margin - 1e-4).all()
    assert (upper[:, 0] <= framing.upper_range[1, 0] + margin + 1e-4).all()
    assert np.ptp(upper[:, 0]) > 0.5 * np.ptp(framing.upper_range[:, 0])
    # stood up and turned towards the camera like the identity, whatever the source world's axes were
    from scipy.spatial.transform import Rotation

    up = Rotation.from_rotvec(blocks["global_orient"]).apply([0, 1.0, 0])
    assert (up @ framing.orient_mean.apply([0, 1.0, 0]) > 0.95).all()
    # the earlier pelvis mode, still a param: the pelvis path's mean at the identity's, the whole sway kept
    set_param(fitted.root, "motion", "retarget", "pelvis")
    try:
        res = CliRunner().invoke(app, ["-w", str(fitted.root), "motion", "import", str(tmp_path / "a.npz"),
                                       "--identity", ID, "--out", str(tmp_path / "p.parquet")])
    finally:
        set_param(fitted.root, "motion", "retarget", "framing")
    assert res.exit_code == 0, res.output
    _, kept = smplx_table.read(tmp_path / "p.parquet")
    pelvis = kept["transl"] + framing.pelvis_rest
    np.testing.assert_allclose(pelvis.mean(0), framing.pelvis_mean, atol=1e-4)
    assert 0.15 < np.ptp(pelvis[:, 0]) < 0.25
    default = fitted.data / "motions" / ID / "a.parquet"
    res = CliRunner().invoke(app, ["-w", str(fitted.root), "motion", "import", str(tmp_path / "a.npz"),
                                   "--identity", ID])
    assert res.exit_code == 0 and default.is_file()


def test_motion_import_refuses_bad_files(fitted: Workspace, tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self):  # noqa: ANN204 - the attack under test
            return (Path.touch, (tmp_path / "pwned",))

    bad = tmp_path / "evil.pkl"
    bad.write_bytes(pickle.dumps({"global_orient": np.zeros((3, 3)), "x": Payload()}))
    runner_ = CliRunner()
    res = runner_.invoke(app, ["-w", str(fitted.root), "motion", "import", str(bad), "--identity", ID])
    assert res.exit_code != 0 and "refused to unpickle pathlib" in str(res.exception)
    assert not (tmp_path / "pwned").exists()
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, poses=np.zeros((10, 99), np.float32), trans=np.zeros((10, 3), np.float32))
    res = runner_.invoke(app, ["-w", str(fitted.root), "motion", "import", str(wrong), "--identity", ID])
    assert "poses has shape (10, 99); expected (T, 165)" in str(res.exception)
    res = runner_.invoke(app, ["-w", str(fitted.root), "motion", "import", str(_amass(tmp_path / "b.npz")),
                               "--identity", "nobody"])
    assert "identity 'nobody' has no smplx_fit yet" in str(res.exception)


@pytest.mark.usefixtures("prefect_harness")
def test_motion_from_a_video_is_fitted_then_retargeted(fitted: Workspace, short_video: Path, tmp_path: Path) -> None:
    from flows.motion import import_motion, motion_name

    info = import_motion(str(fitted.root), ID, str(short_video), str(tmp_path / "v.parquet"))
    assert info["frames"] == 63 and info["source_format"] == "video"
    name = motion_name(short_video)
    assert info["motion_fit"] == f"data/identities/{name}/smplx_fit"
    assert name not in (fitted.root / "identities.yaml").read_text()  # not an identity: DVC never sees it
    keys, blocks = smplx_table.read(tmp_path / "v.parquet")
    assert list(keys["frame"]) == list(range(63))
    # the same person's own video comes back close to the identity's own fit, frame for frame in time order
    _, own = smplx_table.read(artifact_dir(fitted, "smplx_fit", ID) / smplx_table.TABLE)
    assert np.abs(blocks["body_pose"] - own["body_pose"]).mean() < 0.05


def test_bench_smplx_json(tmp_path: Path) -> None:
    video = cut_clip(shared_video("anchor_seated_hevc.mp4"), tmp_path / "clip.mp4", 24, 360, 640)  # at the defaults
    res = CliRunner().invoke(app, ["bench", "smplx", "--video", str(video), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output.strip().splitlines()[-1])
    assert {"frames", "fit_fps", "render_fps", "err_pct", "jitter_ratio"} <= set(data)
    assert data["frames"] == 24 and set(data["err_pct"]) == {"body", "hands", "face"}
    assert data["fit_fps"] > 0 and data["render_fps"] > 0 and 0 < data["jitter_ratio"] < 1
