"""Any motion lands in the identity's framing: onto a second, different body; a leaning, dropping motion kept in
range (and, in the old pelvis mode, not); SHOW's own pickle imported with its PCA hands."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation
from typer.testing import CliRunner

from cli.main import app
from core.workspace import Workspace
from models import retarget as rt
from models.motion_io import Motion, read_motion
from tasks import runner, smplx_table
from tasks.registry import artifact_dir
from tasks.stages import motion as motion_task
from tests.conftest import ONBOARDED_ID, SECOND_ID, copy_workspace, show_pickle

slow = pytest.mark.slow  # on a trained (or onboarded) identity; the unit tests below are not
SEATED, HALF = ONBOARDED_ID, SECOND_ID


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory, second_person: Path) -> Workspace:
    """The seated template plus a second, different person (the half-body portrait) fitted beside it."""
    return Workspace(copy_workspace(second_person, tmp_path_factory.mktemp("retarget") / "ws"))


def fit_dir(ws: Workspace, name: str) -> Path:
    return artifact_dir(ws, "smplx_fit", name)


def own_motion(ws: Workspace, name: str) -> Motion:
    return motion_task.fit_as_motion(fit_dir(ws, name), artifact_dir(ws, "ingest", name))


def projected_head(blocks: dict[str, np.ndarray], ref: motion_task.Reference) -> np.ndarray:
    return rt.project(ref.joints(blocks)[:, rt.HEAD], ref.framing.camera)


@slow
def test_another_persons_motion_lands_in_the_targets_framing_and_orientation(ws: Workspace) -> None:
    target = motion_task.reference(fit_dir(ws, HALF), runner.body_model_path(ws))
    source = own_motion(ws, SEATED)
    blocks, info = motion_task.prepare(source, target)
    framing = target.framing
    # the head-shoulder point sits where the target's does (its mean), depth included: the target's scale
    upper = target.joints(blocks)[:, rt.UPPER].mean(1)
    np.testing.assert_allclose(upper.mean(0), framing.upper_mean, atol=0.01)
    # torso and head turn within the target's own range (+ the margin), whatever the source's posture
    margin = np.deg2rad(motion_task.MotionParams().orientation_margin_deg) + 1e-6
    for rotation, mean, rng in ((rt.torso_rotation(blocks), framing.torso_mean, framing.torso_range),
                                (rt.head_rotation(blocks), framing.head_mean, framing.head_range)):
        dev = (rotation * mean.inv()).as_rotvec()
        assert (dev >= rng[0] - margin).all() and (dev <= rng[1] + margin).all()
    # the projected head stays in the target's head box in (nearly) every frame, and the check says so
    head = projected_head(blocks, target)
    lo, hi = framing.boxes_px["head"][0]
    tol = framing.camera["size"] * motion_task.MotionParams().framing_tolerance_pct / 100
    inside = ((head >= lo - tol) & (head <= hi + tol)).all(1)
    assert inside.mean() >= 0.95
    assert info["framing"]["head"]["outside_share"] == pytest.approx(1 - inside.mean(), abs=1e-3)
    # the gestures are the source's own: arms and hands carry over untouched
    arms = slice(3 * 15, 63)  # shoulders, elbows, wrists (joints 16..21)
    np.testing.assert_allclose(blocks["body_pose"][:, arms], source.body_pose[:, arms], atol=1e-6)
    np.testing.assert_array_equal(blocks["right_hand_pose"], source.right_hand_pose)


@slow
def test_a_motion_leaning_and_dropping_its_head_is_kept_in_the_anchors_framing(ws: Workspace) -> None:
    ref = motion_task.reference(fit_dir(ws, SEATED), runner.body_model_path(ws))
    own = own_motion(ws, SEATED)
    lean = own.body_pose.copy()
    lean[:, 3 * 5: 3 * 6] += [0.7, 0.0, 0.0]  # spine2 bends 40 degrees forward
    leaned = Motion(**{**own.__dict__, "body_pose": lean, "transl": own.transl + np.float32([0, 0.3, 0])})
    lo, hi = ref.framing.boxes_px["head"][0]
    tol = ref.framing.camera["size"] * 0.02

    def head_inside(mode: str) -> tuple[float, dict]:
        blocks, info = motion_task.prepare(leaned, ref, motion_task.MotionParams(retarget=mode))
        head = projected_head(blocks, ref)
        return float(((head >= lo - tol) & (head <= hi + tol)).all(1).mean()), info

    inside, info = head_inside("framing")
    assert inside >= 0.95, info["framing"]
    assert info["retarget"]["torso_clamped_frames"] > 0.9 * own.frames
    assert not info["framing"]["mostly_outside"]
    # the old behaviour puts the head well outside: what the framing mode is for, and the warning says so
    before, old = head_inside("pelvis")
    assert before < 0.5 and old["framing"]["mostly_outside"]
    assert "outside the identity's training framing" in motion_task.framing_warning(old["framing"])
    # a motion already in range is left alone: the identity's own clips are not turned
    _, same = motion_task.prepare(own, ref)
    assert same["retarget"]["torso_clamped_frames"] == same["retarget"]["head_clamped_frames"] == 0


def test_show_pca_hands_expand_as_smplx_itself_expands_them_or_fall_back_to_relaxed(tmp_path: Path) -> None:
    """SHOW's 12 PCA coefficients per hand, read with a body file's hand PCA, give the hand poses smplx itself
    computes from the same file (`use_pca=True`, its own mean): checked on a model file whose components are a
    random rotation and whose means are not zero, so an order, transpose or sign slip shows."""
    import smplx
    import torch

    from models import mannequin
    from tasks import body_file

    path = show_pickle(tmp_path / "show.pkl")
    model_file = tmp_path / "SMPLX_NEUTRAL.npz"
    mannequin.write(model_file)
    rng = np.random.default_rng(0)
    with np.load(model_file) as f:
        arrays = dict(f)
    for side in "lr":
        arrays[f"hands_components{side}"] = np.linalg.qr(rng.standard_normal((45, 45)))[0].astype(np.float32)
        arrays[f"hands_mean{side}"] = rng.normal(0, 0.2, 45).astype(np.float32)
    np.savez(model_file, **arrays)
    basis = body_file.hand_basis(model_file, real=True)
    real = read_motion(path, hands=basis)
    coeffs = pickle.loads(path.read_bytes())
    frames = len(coeffs["left_hand_pose"])
    ours = smplx.create(str(model_file), model_type="smplx", ext="npz", use_pca=True, num_pca_comps=12,
                        flat_hand_mean=False, batch_size=frames)
    with torch.no_grad():
        out = ours(left_hand_pose=torch.from_numpy(coeffs["left_hand_pose"]),
                   right_hand_pose=torch.from_numpy(coeffs["right_hand_pose"]), return_full_pose=True)
    full = out.full_pose.numpy().reshape(frames, 55, 3)
    np.testing.assert_allclose(real.left_hand_pose, full[:, 25:40].reshape(frames, 45), atol=1e-5)
    np.testing.assert_allclose(real.right_hand_pose, full[:, 40:55].reshape(frames, 45), atol=1e-5)
    assert real.body_pose.shape == (40, 63) and real.global_orient.shape == (40, 3)
    assert real.expression.shape == (40, 100) and real.source == "show-pkl"
    assert real.notes == ("hands: 12 PCA coefficients expanded with the body model's",)
    mannequin_basis = body_file.hand_basis(model_file, real=False)
    relaxed = read_motion(path, hands=mannequin_basis)
    np.testing.assert_array_equal(relaxed.right_hand_pose, np.broadcast_to(arrays["hands_meanr"], (40, 45)))
    assert "the relaxed pose is used instead" in relaxed.notes[0]
    with pytest.raises(Exception, match="PCA coefficients"):
        read_motion(path)  # no body model to expand them with: refused, not guessed


@slow
def test_a_show_pickle_imports_onto_an_identity_through_the_command(ws: Workspace, tmp_path: Path) -> None:
    out = tmp_path / "show.parquet"
    res = CliRunner().invoke(app, ["-w", str(ws.root), "motion", "import", str(show_pickle(tmp_path / "s.pkl")),
                                   "--identity", SEATED, "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "show-pkl: 40 frames at 30 fps" in res.output and "relaxed pose is used instead" in res.output
    keys, blocks = smplx_table.read(out)
    assert len(keys["frame"]) == 40
    ref = motion_task.reference(fit_dir(ws, SEATED), runner.body_model_path(ws))
    # upside down in its own world (SHOW's camera has y down, root rotated by pi): stood up like the identity
    up = Rotation.from_rotvec(blocks["global_orient"]).apply([0, 1.0, 0])
    ident_up = ref.framing.orient_mean.apply([0, 1.0, 0])
    assert (up @ ident_up > 0.9).all()
    np.testing.assert_allclose(blocks["jaw_pose"][:, 0], pickle.loads((tmp_path / "s.pkl").read_bytes())[
        "jaw_pose"][:, 0], atol=1e-6)
