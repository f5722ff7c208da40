"""The mannequin body model: SMPL-X layout, human proportions, shape/expression semantics, the sparse forward pass,
fitting a known synthetic motion, and the five-point face alignment.

One mannequin is written per module (about 2 s) and everything else reads it.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import smplx
import torch
from scipy.spatial.transform import Rotation
from smplx.joint_names import JOINT_NAMES

from models import body, face_align, fitting, mannequin
from models.raster import MeshRasterizer
from models.raster import project as render_project

IDX = {name: i for i, name in enumerate(JOINT_NAMES)}
SIZE = 256
FOCAL = 450.0  # a 1.75 m figure 4 m away spans ~200 px of 256
FACING_CAMERA = (np.pi, 0.0, 0.0)  # SMPL-X (y up, z forward) → OpenCV camera axes, looking at the camera
L_SHOULDER_Z, R_SHOULDER_Z = (16 - 1) * 3 + 2, (17 - 1) * 3 + 2  # body_pose slots of the shoulders' z rotation
L_ELBOW_Y, R_ELBOW_Y = (18 - 1) * 3 + 1, (19 - 1) * 3 + 1
HEAD_Y = (15 - 1) * 3 + 1

# SMPL-X's kinematic tree, written by joint name (child: parent), independent of the generator's table
_TREE = {
    "left_hip": "pelvis", "right_hip": "pelvis", "spine1": "pelvis", "left_knee": "left_hip",
    "right_knee": "right_hip", "spine2": "spine1", "left_ankle": "left_knee", "right_ankle": "right_knee",
    "spine3": "spine2", "left_foot": "left_ankle", "right_foot": "right_ankle", "neck": "spine3",
    "left_collar": "spine3", "right_collar": "spine3", "head": "neck", "left_shoulder": "left_collar",
    "right_shoulder": "right_collar", "left_elbow": "left_shoulder", "right_elbow": "right_shoulder",
    "left_wrist": "left_elbow", "right_wrist": "right_elbow", "jaw": "head", "left_eye_smplhf": "head",
    "right_eye_smplhf": "head",
}
for _side in ("left", "right"):
    for _finger in ("index", "middle", "pinky", "ring", "thumb"):
        _TREE[f"{_side}_{_finger}1"] = f"{_side}_wrist"
        _TREE[f"{_side}_{_finger}2"] = f"{_side}_{_finger}1"
        _TREE[f"{_side}_{_finger}3"] = f"{_side}_{_finger}2"
SMPLX_PARENTS = [-1] + [IDX[_TREE[JOINT_NAMES[i]]] for i in range(1, 55)]

# the arrays smplx reads from SMPLX_NEUTRAL.npz, with SMPL-X's shapes
LAYOUT = {
    "v_template": (10475, 3), "f": (20908, 3), "J_regressor": (55, 10475), "kintree_table": (2, 55),
    "weights": (10475, 55), "posedirs": (10475, 3, 486), "shapedirs": (10475, 3, 400),
    "hands_componentsl": (45, 45), "hands_componentsr": (45, 45), "hands_meanl": (45,), "hands_meanr": (45,),
    "lmk_faces_idx": (51,), "lmk_bary_coords": (51, 3), "dynamic_lmk_faces_idx": (79, 17),
    "dynamic_lmk_bary_coords": (79, 17, 3),
}


# -- fixtures and helpers -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    """Small tensors: one thread is fastest, and on a busy 2-core machine torch's spinning OpenMP pool can make the
    fit 100× slower (measured 2 s vs 250 s)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def npz_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mannequin.write(tmp_path_factory.mktemp("mannequin") / "SMPLX_NEUTRAL.npz")


@pytest.fixture(scope="module")
def arrays(npz_path: Path) -> dict[str, np.ndarray]:
    with np.load(npz_path) as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="module")
def model(npz_path: Path) -> smplx.SMPLX:
    return body.load(npz_path)


@pytest.fixture(scope="module")
def renderer(arrays: dict[str, np.ndarray]) -> Iterator[MeshRasterizer]:
    with MeshRasterizer(arrays["f"].astype(np.int64), SIZE) as r:
        yield r


def forward(model: smplx.SMPLX, frames: int = 1, **kwargs: np.ndarray | list[float]) -> tuple[np.ndarray, np.ndarray]:
    """smplx's full forward pass with zeros for every block not given: (vertices, joints) as numpy."""
    dims = {"betas": 10, "expression": 10, "transl": 3, **body.POSE_BLOCKS}
    inputs = {k: torch.zeros(frames, n) for k, n in dims.items()}
    for k, value in kwargs.items():
        inputs[k] = torch.as_tensor(np.asarray(value, np.float32)).reshape(frames, dims[k])
    with torch.no_grad():
        out = model(**inputs)
    vertices, joints = out.vertices.numpy(), out.joints.numpy()
    return (vertices[0], joints[0]) if frames == 1 else (vertices, joints)


def arms_down(left: float = -1.2, right: float = 1.2) -> np.ndarray:
    pose = np.zeros(63, np.float32)
    pose[L_SHOULDER_Z], pose[R_SHOULDER_Z] = left, right
    return pose


def height(vertices: np.ndarray) -> float:
    return float(np.ptp(vertices[:, 1]))


def to_camera(vertices: np.ndarray, joints: np.ndarray, distance: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """The translation that centres the figure's bounding box `distance` metres in front of the camera."""
    transl = np.array([0.0, 0.0, distance]) - (vertices.max(0) + vertices.min(0)) / 2
    return vertices + transl, joints + transl


def silhouette(model: smplx.SMPLX, renderer: MeshRasterizer, **kwargs: np.ndarray | list[float]
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Front render at 4 m: (image, mask, projected joints, camera-space joints)."""
    v, j = forward(model, global_orient=list(FACING_CAMERA), **kwargs)
    v, j = to_camera(v, j)
    K = body.intrinsics(FOCAL, SIZE)
    image = renderer.render(v, K)
    return image, image.max(-1) > 0, render_project(j, K), j


def bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(mask)
    return int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())


def row_extent(mask: np.ndarray, row: int) -> int:
    cols = np.flatnonzero(mask[row])
    return int(cols.max() - cols.min() + 1) if len(cols) else 0


# -- 1-3: layout, determinism, loading ------------------------------------------------------------------------------


def test_layout_matches_smplx(arrays: dict[str, np.ndarray]) -> None:
    for key, shape in LAYOUT.items():
        assert key in arrays, key
        assert arrays[key].shape == shape, (key, arrays[key].shape)
    np.testing.assert_allclose(arrays["J_regressor"].sum(1), 1.0, atol=1e-6)
    assert (arrays["J_regressor"] >= 0).all()
    np.testing.assert_allclose(arrays["weights"].sum(1), 1.0, atol=1e-6)
    assert (arrays["weights"] >= 0).all()
    kintree = arrays["kintree_table"]
    assert kintree[1].tolist() == list(range(55))
    assert kintree[0, 1:].tolist() == SMPLX_PARENTS[1:]
    for side in "lr":
        comps = arrays[f"hands_components{side}"].astype(np.float64)
        np.testing.assert_allclose(comps @ comps.T, np.eye(45), atol=1e-5)
    np.testing.assert_allclose(arrays["lmk_bary_coords"].sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(arrays["dynamic_lmk_bary_coords"].sum(-1), 1.0, atol=1e-5)
    assert (arrays["lmk_bary_coords"] >= 0).all() and (arrays["dynamic_lmk_bary_coords"] >= 0).all()
    faces = arrays["f"].astype(np.int64)
    assert faces.min() >= 0 and faces.max() < 10475
    for key in ("lmk_faces_idx", "dynamic_lmk_faces_idx"):
        assert arrays[key].min() >= 0 and arrays[key].max() < len(faces), key
    # the landmarks sit on real triangles, not on the degenerate padding
    for tri in faces[arrays["lmk_faces_idx"]]:
        assert len(set(tri.tolist())) == 3
    assert np.isfinite(arrays["v_template"]).all() and np.isfinite(arrays["shapedirs"]).all()


def test_write_is_byte_reproducible(npz_path: Path, tmp_path: Path) -> None:
    again = mannequin.write(tmp_path / "again" / "SMPLX_NEUTRAL.npz")
    first = hashlib.sha256(npz_path.read_bytes()).hexdigest()
    second = hashlib.sha256(again.read_bytes()).hexdigest()
    assert first == second
    assert [p.name for p in again.parent.iterdir()] == ["SMPLX_NEUTRAL.npz"]  # no temporary file left behind


def test_smplx_loads_it_without_coefficient_warnings(npz_path: Path, arrays: dict[str, np.ndarray],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    loaded = body.load(npz_path)
    captured = capsys.readouterr()
    assert "WARNING" not in captured.out + captured.err
    assert "shape" not in captured.out.lower() and "expression" not in captured.out.lower()
    assert tuple(loaded.shapedirs.shape) == (10475, 3, body.NUM_BETAS)
    assert tuple(loaded.expr_dirs.shape) == (10475, 3, body.NUM_EXPRESSION)
    # smplx reads the expression directions from slot 300 on, where the generator put them
    np.testing.assert_array_equal(loaded.expr_dirs.numpy(), arrays["shapedirs"][:, :, 300:310])
    np.testing.assert_allclose(loaded.v_template.numpy(), arrays["v_template"], atol=1e-6)
    assert loaded.parents.tolist() == SMPLX_PARENTS
    assert loaded.lmk_faces_idx.tolist() == arrays["lmk_faces_idx"].tolist()


# -- 4: rest-pose proportions ---------------------------------------------------------------------------------------


def test_rest_pose_proportions(model: smplx.SMPLX) -> None:
    v, j = forward(model)
    assert j.shape == (144, 3)
    H = height(v)
    assert 1.6 < H < 1.85
    floor = v[:, 1].min()

    def at(name: str) -> np.ndarray:
        return j[IDX[name]]

    # heights as fractions of stature (Winter, Biomechanics and Motor Control of Human Movement)
    for name, fraction in (("left_shoulder", 0.818), ("left_hip", 0.530), ("left_knee", 0.285),
                           ("left_ankle", 0.039)):
        assert abs((at(name)[1] - floor) / H - fraction) < 0.03, name
    assert abs(np.linalg.norm(at("left_elbow") - at("left_shoulder")) / H - 0.186) < 0.02
    assert abs(np.linalg.norm(at("left_wrist") - at("left_elbow")) / H - 0.146) < 0.02
    assert abs(np.linalg.norm(at("left_ankle") - at("left_knee")) / H - 0.246) < 0.02
    shoulders = np.linalg.norm(at("left_shoulder") - at("right_shoulder"))
    assert 0.17 < shoulders / H < 0.27
    assert np.linalg.norm(at("left_hip") - at("right_hip")) < shoulders
    # left is +x, mirror symmetric
    for name in ("shoulder", "elbow", "wrist", "hip", "knee", "ankle", "eye", "ear", "big_toe", "heel"):
        left, right = at(f"left_{name}"), at(f"right_{name}")
        assert left[0] > 0.0 > right[0], name
        np.testing.assert_allclose(left, right * (-1, 1, 1), atol=1e-5, err_msg=name)
    # head above the shoulders, neck between
    assert at("head")[1] > at("neck")[1] > at("left_shoulder")[1]
    assert at("pelvis")[1] < at("spine1")[1] < at("spine2")[1] < at("spine3")[1] < at("neck")[1]
    for side in ("left", "right"):
        sign = 1 if side == "left" else -1
        assert sign * at(f"{side}_wrist")[0] > sign * at(f"{side}_elbow")[0] > sign * at(f"{side}_shoulder")[0]
        for finger in ("thumb", "index", "middle", "ring", "pinky"):
            tip = at(f"{side}_{finger}")
            assert sign * (tip[0] - at(f"{side}_wrist")[0]) > 0.07, (side, finger)
            assert sign * (tip[0] - at(f"{side}_{finger}3")[0]) > 0.0, (side, finger)
        # feet: toes forward of the heel, heel below the knee and the ankle, at the floor
        assert at(f"{side}_big_toe")[2] > at(f"{side}_heel")[2] + 0.15
        assert at(f"{side}_small_toe")[2] > at(f"{side}_heel")[2] + 0.15
        assert sign * at(f"{side}_small_toe")[0] > sign * at(f"{side}_big_toe")[0]  # big toe towards the midline
        assert at(f"{side}_heel")[1] < at(f"{side}_ankle")[1] < at(f"{side}_knee")[1]
        assert at(f"{side}_heel")[1] - floor < 0.03
    # face: nose tip on the midline in front of the eyes, eyes in front of the ears, all at head height
    nose, leye, reye, lear, rear = at("nose"), at("left_eye"), at("right_eye"), at("left_ear"), at("right_ear")
    assert abs(nose[0]) < 1e-4
    assert nose[2] > leye[2] + 0.02 and nose[2] > reye[2] + 0.02
    assert nose[1] < leye[1]  # the tip hangs below the eyes
    assert 0.04 < leye[0] - reye[0] < 0.08  # interpupillary distance ~6 cm
    assert lear[2] < nose[2] - 0.08 and rear[2] < nose[2] - 0.08
    assert lear[0] > leye[0] and rear[0] < reye[0]
    for point in (nose, leye, lear):
        assert at("neck")[1] < point[1] < v[:, 1].max()
    # the face landmarks: brows above the eyes above the nose tip above the mouth
    brows = j[[i for i, n in enumerate(JOINT_NAMES[:127]) if "eye_brow" in n]]
    assert brows[:, 1].min() > leye[1] > j[IDX["nose4"], 1] > j[IDX["mouth_top"], 1] > j[IDX["mouth_bottom"], 1]


# -- 5: silhouettes -------------------------------------------------------------------------------------------------


def test_t_pose_silhouette(model: smplx.SMPLX, renderer: MeshRasterizer) -> None:
    _, mask, uv, _ = silhouette(model, renderer)
    top, bottom, left, right = bbox(mask)
    h, w = bottom - top + 1, right - left + 1
    assert 150 < h < 240
    assert abs(w / h - 1.0) < 0.15  # arm span ≈ stature
    # the head: the top 13 % of the figure is narrower than the row of the shoulders
    head_rows = range(top, top + int(0.13 * h))
    head_width = max(row_extent(mask, r) for r in head_rows)
    shoulder_row = int(round(uv[[IDX["left_shoulder"], IDX["right_shoulder"]], 1].mean()))
    assert head_width < 0.5 * row_extent(mask, shoulder_row)
    # image right is the person's left when facing the camera
    assert uv[IDX["left_wrist"], 0] > SIZE / 2 > uv[IDX["right_wrist"], 0]
    assert uv[IDX["head"], 1] < uv[IDX["pelvis"], 1]


def test_arms_down_silhouette(model: smplx.SMPLX, renderer: MeshRasterizer) -> None:
    _, mask, uv, _ = silhouette(model, renderer, body_pose=arms_down())
    top, bottom, left, right = bbox(mask)
    h, w = bottom - top + 1, right - left + 1
    # arms 21° out from the sides: a human is ~1.9-2.1 times as tall as wide in this pose
    assert 1.7 < h / w < 2.5
    # arms hanging straight: the usual standing figure, 2.5-5 times as tall as wide
    _, straight, _, _ = silhouette(model, renderer, body_pose=arms_down(-1.45, 1.45))
    t2, b2, l2, r2 = bbox(straight)
    assert 2.5 < (b2 - t2 + 1) / (r2 - l2 + 1) < 5.0
    # head narrower than the shoulders
    head_width = max(row_extent(mask, r) for r in range(top, top + int(0.13 * h)))
    shoulder_row = int(round(uv[[IDX["left_shoulder"], IDX["right_shoulder"]], 1].mean()))
    assert 0.3 < head_width / row_extent(mask, shoulder_row) < 0.75
    # legs: background between them in the lower part, body on both sides
    mid = int(round(uv[IDX["pelvis"], 0]))
    for row in range(top + int(0.75 * h), top + int(0.95 * h)):
        assert not mask[row, mid - 1:mid + 2].any(), row
        assert mask[row, :mid].any() and mask[row, mid:].any(), row
    # but the torso is solid on the midline
    assert mask[int(uv[IDX["spine2"], 1]), mid]
    # the hands hang below the hips
    assert uv[IDX["left_wrist"], 1] > uv[IDX["left_hip"], 1] - 5


def test_jaw_opens_mouth_in_render(model: smplx.SMPLX, renderer: MeshRasterizer) -> None:
    bent = arms_down()
    bent[L_ELBOW_Y], bent[R_ELBOW_Y] = -1.2, 1.2
    closed, mask_closed, uv, _ = silhouette(model, renderer, body_pose=bent)
    opened, _, uv_open, _ = silhouette(model, renderer, body_pose=bent, jaw_pose=[0.35, 0.0, 0.0])
    # bent elbows bring the hands in front of the body: narrower than arms straight down at the same shoulder angle
    _, _, left, right = bbox(mask_closed)
    _, mask_straight, _, _ = silhouette(model, renderer, body_pose=arms_down())
    _, _, l2, r2 = bbox(mask_straight)
    assert right - left < r2 - l2
    changed = np.abs(closed.astype(int) - opened.astype(int)).max(-1) > 8
    rows, cols = np.nonzero(changed)
    mouth = uv[[IDX["mouth_top"], IDX["mouth_bottom"], IDX["lip_top"], IDX["lip_bottom"]]]
    assert len(rows) >= 10
    # every changed pixel is at the mouth and chin
    assert np.abs(cols - mouth[:, 0].mean()).max() < 10
    assert np.abs(rows - mouth[:, 1].mean()).max() < 10
    # the inner lip landmarks part by more than 5 mm
    _, j_closed = forward(model)
    _, j_open = forward(model, jaw_pose=[0.35, 0.0, 0.0])

    def gap(j: np.ndarray) -> float:
        return float(j[IDX["lip_top"], 1] - j[IDX["lip_bottom"], 1])

    assert gap(j_open) - gap(j_closed) > 0.005
    assert abs(gap(j_closed)) < 0.002  # closed lips meet
    assert uv_open[IDX["lip_bottom"], 1] > uv[IDX["lip_bottom"], 1]  # the lower lip drops in the picture


def test_open_mouth_close_up_shows_the_inside(model: smplx.SMPLX, renderer: MeshRasterizer) -> None:
    """Half a metre from the face: the open mouth is a band of dark (grazing-lit inner) pixels between the lips."""
    K = body.intrinsics(FOCAL, SIZE)
    dark = []
    for jaw in (0.0, 0.35):
        v, j = forward(model, global_orient=list(FACING_CAMERA), jaw_pose=[jaw, 0.0, 0.0])
        shift = np.array([0.0, 0.0, 0.5]) - j[IDX["jaw"]]
        brightness = renderer.render(v + shift, K).astype(float).sum(-1)
        uv = render_project(j + shift, K)
        top, bottom = uv[IDX["lip_top"], 1], uv[IDX["lip_bottom"], 1]
        if jaw:
            assert bottom - top > 6  # pixels
        centre = int(uv[IDX["lip_top"], 0])
        window = brightness[int(top) - 2:int(bottom) + 3, centre - 8:centre + 8]
        face = brightness[int(uv[IDX["nose"], 1]) - 30:int(uv[IDX["nose"], 1]), centre - 30:centre + 30]
        dark.append(int((window < 0.6 * np.median(face)).sum()))
    assert dark[0] == 0
    assert dark[1] >= 20


# -- 6: shape and expression directions ----------------------------------------------------------------------------


def _beta(k: int, value: float = 2.0) -> np.ndarray:
    betas = np.zeros(10, np.float32)
    betas[k] = value
    return betas


def _torso_width(v: np.ndarray, y: float) -> float:
    band = v[(np.abs(v[:, 1] - y) < 0.02) & (np.abs(v[:, 0]) < 0.3)]
    return float(np.ptp(band[:, 0]))


def test_shape_directions(model: smplx.SMPLX) -> None:
    v0, j0 = forward(model)
    h0 = height(v0)

    def limb(j: np.ndarray, a: str, b: str) -> float:
        return float(np.linalg.norm(j[IDX[a]] - j[IDX[b]]))

    v, j = forward(model, betas=_beta(0))  # height
    assert 1.05 < height(v) / h0 < 1.12
    assert j[IDX["head"], 1] > j0[IDX["head"], 1] + 0.02  # joints follow the surface
    assert limb(j, "left_shoulder", "left_wrist") > limb(j0, "left_shoulder", "left_wrist")

    v, j = forward(model, betas=_beta(1))  # girth
    assert abs(height(v) / h0 - 1) < 0.01
    chest = j0[IDX["spine3"], 1]
    assert _torso_width(v, chest) > 1.1 * _torso_width(v0, chest)

    v, j = forward(model, betas=_beta(2))  # arm length
    assert limb(j, "left_shoulder", "left_wrist") > 1.05 * limb(j0, "left_shoulder", "left_wrist")
    assert abs(height(v) / h0 - 1) < 0.01
    assert abs(limb(j, "left_hip", "left_ankle") - limb(j0, "left_hip", "left_ankle")) < 1e-3

    v, j = forward(model, betas=_beta(3))  # leg length
    assert limb(j, "left_hip", "left_ankle") > 1.05 * limb(j0, "left_hip", "left_ankle")
    assert height(v) > h0
    assert abs(limb(j, "left_shoulder", "left_wrist") - limb(j0, "left_shoulder", "left_wrist")) < 1e-3

    # J_regressor consistency under every direction: the joints are the regressor applied to the shaped surface
    regressor = model.J_regressor.numpy()
    for k in range(10):
        v, j = forward(model, betas=_beta(k, 1.5))
        np.testing.assert_allclose(regressor @ v, j[:55], atol=1e-5, err_msg=f"beta {k}")


def _landmarks(model: smplx.SMPLX, expression: np.ndarray | None = None) -> np.ndarray:
    return forward(model, expression=expression if expression is not None else np.zeros(10, np.float32))[1]


def test_expression_directions(model: smplx.SMPLX) -> None:
    j0 = _landmarks(model)
    brows = [i for i, n in enumerate(JOINT_NAMES[:127]) if "eye_brow" in n]
    nose = [i for i, n in enumerate(JOINT_NAMES[:127]) if "nose" in n]
    assert len(brows) == 10 and len(nose) == 10

    up = np.zeros(10, np.float32)
    up[4] = 1.0  # brows_up
    d = _landmarks(model, up) - j0
    assert (d[brows, 1] > 0.002).all()
    assert np.abs(d[nose]).max() < 5e-4
    assert np.abs(d[:55]).max() < 1e-6  # expressions move no skeleton joint

    smile = np.zeros(10, np.float32)
    smile[1] = 1.0
    d = _landmarks(model, smile) - j0
    corners = [IDX["right_mouth_1"], IDX["left_mouth_1"]]
    assert (d[corners, 1] > 0.002).all()
    assert d[IDX["left_mouth_1"], 0] > 0 > d[IDX["right_mouth_1"], 0]  # and out to the sides
    assert np.abs(d[brows]).max() < 5e-4


def test_mouth_open_expression_parts_the_lips(model: smplx.SMPLX) -> None:
    j0 = _landmarks(model)
    opened = np.zeros(10, np.float32)
    opened[0] = 1.0  # mouth_open
    d = _landmarks(model, opened) - j0
    assert abs(d[IDX["lip_top"], 1]) < 1e-3  # the upper lip stays
    assert d[IDX["lip_bottom"], 1] < -0.004  # the lower lip drops
    lip_up = np.zeros(10, np.float32)
    lip_up[6] = 1.0  # upper_lip_up
    d = _landmarks(model, lip_up) - j0
    assert d[IDX["lip_top"], 1] > 0.002
    assert abs(d[IDX["lip_bottom"], 1]) < 1e-3


# -- 7: SparseBody ---------------------------------------------------------------------------------------------------


def _random_params(frames: int, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor,
                                                       torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    params = {k: 0.4 * torch.randn(frames, n, generator=gen) for k, n in body.POSE_BLOCKS.items()}
    betas = torch.randn(frames, 10, generator=gen)
    expression = torch.randn(frames, 10, generator=gen)
    transl = torch.randn(frames, 3, generator=gen)
    return params, betas, expression, transl


def test_sparse_body_equals_smplx_forward(model: smplx.SMPLX) -> None:
    params, betas, expression, transl = _random_params(4, seed=7)
    sparse = body.SparseBody(model)
    with torch.no_grad():
        ours = sparse(betas, expression, body.full_pose(params), transl)
        ref = model(betas=betas, expression=expression, transl=transl, **params)
    assert ours.points.shape == (4, body.N_POINTS, 3)
    torch.testing.assert_close(ours.points, ref.joints[:, :body.N_POINTS], atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.joints, ref.joints[:, :55], atol=1e-4, rtol=0)
    # a shared shape (1, 10) broadcasts over frames
    with torch.no_grad():
        shared = sparse(betas[:1], expression, body.full_pose(params), transl)
        ref_shared = model(betas=betas[:1].expand(4, -1), expression=expression, transl=transl, **params)
    torch.testing.assert_close(shared.points, ref_shared.joints[:, :body.N_POINTS], atol=1e-4, rtol=0)
    # and the points really move with the pose (not a constant)
    assert (ours.points[1] - ours.points[0]).abs().max() > 0.05


def test_sparse_body_root_rotation(model: smplx.SMPLX) -> None:
    params, betas, expression, transl = _random_params(4, seed=11)
    rot = Rotation.random(4, random_state=3)
    root = torch.from_numpy(rot.as_matrix().astype(np.float32))
    pose = body.full_pose(params)
    pose[:, 0] = 0.0
    sparse = body.SparseBody(model)
    with torch.no_grad():
        ours = sparse(betas, expression, pose, transl, root_rot=root)
        params["global_orient"] = torch.from_numpy(rot.as_rotvec().astype(np.float32))
        ref = model(betas=betas, expression=expression, transl=transl, **params)
    torch.testing.assert_close(ours.points, ref.joints[:, :body.N_POINTS], atol=1e-4, rtol=0)


# -- 8: body_model.path ---------------------------------------------------------------------------------------------


def test_model_file_resolves_real_layout(npz_path: Path, arrays: dict[str, np.ndarray], tmp_path: Path) -> None:
    root = tmp_path / "models"
    target = root / "smplx" / "SMPLX_NEUTRAL.npz"
    target.parent.mkdir(parents=True)
    shutil.copyfile(npz_path, target)
    assert body.model_file(root) == target
    assert body.model_file(target) == target
    left, right = body.hands_mean(root)
    np.testing.assert_array_equal(left, arrays["hands_meanl"])
    np.testing.assert_array_equal(right, arrays["hands_meanr"])
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        body.model_file(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="SMPLX_NEUTRAL"):
        body.model_file(empty)


# -- 9: fitting a known motion --------------------------------------------------------------------------------------


FIT_FRAMES, FIT_SIZE = 40, 256
FIT_FOCAL = 1.5 * FIT_SIZE


def _inverse_map(values: np.ndarray, mapping: list[tuple[int, int, float]], slots: int, width: int) -> np.ndarray:
    """MediaPipe-shaped (T, slots, width) array carrying `values[:, point]` at every mapped index, NaN elsewhere."""
    out = np.full((values.shape[0], slots, width), np.nan)
    for mp_index, point, _ in mapping:
        out[:, mp_index, :2] = values[:, point]
        out[:, mp_index, 2] = 0.0
    return out


def _synthetic_motion(sparse: body.SparseBody, hands: tuple[np.ndarray, np.ndarray]
                      ) -> tuple[np.ndarray, np.ndarray]:
    """A talking-anchor clip: arms down, elbows bending, head turning, jaw opening. (2D points, jaw x-rotation)."""
    t = np.arange(FIT_FRAMES) / FIT_FRAMES
    pose = np.tile(arms_down(), (FIT_FRAMES, 1))
    bend = 0.6 + 0.5 * np.sin(2 * np.pi * t)
    pose[:, L_ELBOW_Y], pose[:, R_ELBOW_Y] = -bend, bend
    pose[:, HEAD_Y] = 0.35 * np.sin(3 * np.pi * t)
    jaw = np.zeros((FIT_FRAMES, 3), np.float32)
    jaw[:, 0] = 0.15 + 0.15 * np.sin(4 * np.pi * t)
    blocks = {"global_orient": np.tile(FACING_CAMERA, (FIT_FRAMES, 1)), "body_pose": pose, "jaw_pose": jaw,
              "leye_pose": np.zeros((FIT_FRAMES, 3)), "reye_pose": np.zeros((FIT_FRAMES, 3)),
              "left_hand_pose": np.tile(hands[0], (FIT_FRAMES, 1)),
              "right_hand_pose": np.tile(hands[1], (FIT_FRAMES, 1))}
    full = body.full_pose({k: torch.as_tensor(np.asarray(v, np.float32)) for k, v in blocks.items()})
    betas = torch.tensor([[0.5, -0.3, 0.2, 0.0, 0.3, 0.0, 0.0, 0.0, 0.0, 0.0]])
    expression = torch.zeros(FIT_FRAMES, 10)
    with torch.no_grad():
        rest = sparse(betas, expression, full, torch.zeros(FIT_FRAMES, 3))
        transl = (torch.tensor([0.0, 0.0, 2.5]) - rest.points[:, body.NECK].mean(0)).expand(FIT_FRAMES, 3)
        points = sparse(betas, expression, full, transl).points
        uv = body.project(points, FIT_FOCAL, (FIT_SIZE / 2, FIT_SIZE / 2))
    return uv.numpy().astype(np.float64), jaw[:, 0]


def test_fit_recovers_known_motion(model: smplx.SMPLX, npz_path: Path) -> None:
    sparse = body.SparseBody(model)
    hands = body.hands_mean(npz_path)
    truth, true_jaw = _synthetic_motion(sparse, hands)
    noisy = truth + np.random.default_rng(0).normal(0.0, 1.0, truth.shape)

    pose = _inverse_map(noisy, fitting.BODY_MAP, 33, 4)
    in_view = np.isfinite(pose[..., 0]) & ((pose[..., :2] >= 0) & (pose[..., :2] < FIT_SIZE)).all(-1)
    pose[..., 3] = np.where(in_view, 1.0, 0.0)  # legs below the crop are not seen
    left = _inverse_map(noisy, fitting.HAND_MAP["left_hand"], 21, 3)
    right = _inverse_map(noisy, fitting.HAND_MAP["right_hand"], 21, 3)
    face = _inverse_map(noisy, fitting.FACE_MAP, 478, 3)
    targets = fitting.targets_from_keypoints(pose, left, right, face)
    ok = targets.conf > 0
    # every mapped slot arrives, and only the legs below the crop are missing
    assert ok[:, targets.part > 0].all()
    assert 0 < (~ok[:, targets.part == 0]).sum(1).max() < len(fitting.BODY_MAP) // 2
    np.testing.assert_allclose(targets.xy[ok], noisy[:, targets.points][ok], atol=1e-3)

    segments = [(0, FIT_FRAMES)]
    result = fitting.fit(sparse, targets, segments, fitting.FitConfig(FIT_FOCAL, FIT_SIZE, iterations=150), hands)
    assert result["projected"].shape == targets.xy.shape
    assert result["body_pose"].shape == (FIT_FRAMES, 63) and result["betas"].shape == (1, 10)

    error = np.linalg.norm(result["projected"] - truth[:, targets.points], axis=-1)
    for k, part in enumerate(fitting.PARTS):
        sel = ok & (targets.part == k)[None]
        assert np.median(error[sel]) < 0.01 * FIT_SIZE, part  # the brief asks < 2 %; ~0.3-0.8 px measured
    # steadier than the detections it was given
    assert fitting.jitter(result["projected"], ok, segments) < 0.5 * fitting.jitter(targets.xy, ok, segments)
    # the mouth follows: fitted jaw rotation and lip gap track the true ones
    assert np.corrcoef(true_jaw, result["jaw_pose"][:, 0])[0, 1] > 0.5
    slot = {int(p): s for s, p in enumerate(targets.points)}
    lip_top, lip_bottom = slot[body.LMK_START + 45], slot[body.LMK_START + 49]
    true_gap = truth[:, body.LMK_START + 49, 1] - truth[:, body.LMK_START + 45, 1]
    fit_gap = result["projected"][:, lip_bottom, 1] - result["projected"][:, lip_top, 1]
    assert np.corrcoef(true_gap, fit_gap)[0, 1] > 0.8
    # the forearms bend forward as in the truth, not backward behind the torso (the same 2D points): where the
    # elbows bend most, both wrists are nearer the camera than the shoulders
    blocks = {k: torch.from_numpy(result[k]) for k in ("global_orient", "body_pose", "jaw_pose", "leye_pose",
                                                       "reye_pose", "left_hand_pose", "right_hand_pose")}
    with torch.no_grad():
        pts = sparse(torch.from_numpy(result["betas"]), torch.from_numpy(result["expression"]),
                     body.full_pose(blocks), torch.from_numpy(result["transl"])).points.numpy()
    ahead = (pts[:, [body.L_SHOULDER, body.R_SHOULDER], 2].mean(1, keepdims=True)
             - pts[:, [body.L_WRIST, body.R_WRIST], 2])
    bent = np.sin(2 * np.pi * np.arange(FIT_FRAMES) / FIT_FRAMES) > 0.5
    assert (ahead[bent] > 0.05).all(), ahead[bent].min()
    # still facing the camera
    facing = Rotation.from_rotvec(FACING_CAMERA)
    angles = (Rotation.from_rotvec(result["global_orient"]) * facing.inv()).magnitude()
    assert np.median(angles) < 0.3


# -- 10: face alignment ---------------------------------------------------------------------------------------------


def _apply(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ affine[:, :2].T + affine[:, 2]


def test_similarity_recovers_exact_transform() -> None:
    src = np.random.default_rng(1).uniform(0, 100, (5, 2))
    angle, scale, shift = 0.7, 1.8, np.array([12.0, -5.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = scale * src @ rot.T + shift
    affine = face_align.similarity(src, dst)
    np.testing.assert_allclose(affine[:, :2], scale * rot, atol=1e-9)
    np.testing.assert_allclose(affine[:, 2], shift, atol=1e-9)


def test_similarity_is_least_squares_under_noise() -> None:
    rng = np.random.default_rng(2)
    src = rng.uniform(0, 100, (5, 2))
    angle, scale = -0.4, 0.6
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = scale * src @ rot.T + (30.0, 40.0) + rng.normal(0, 2.0, (5, 2))
    affine = face_align.similarity(src, dst)
    # the same problem solved linearly: x' = a x - b y + tx, y' = b x + a y + ty
    rows = np.concatenate([np.stack([src[:, 0], -src[:, 1], np.ones(5), np.zeros(5)], 1),
                           np.stack([src[:, 1], src[:, 0], np.zeros(5), np.ones(5)], 1)])
    (a, b, tx, ty), *_ = np.linalg.lstsq(rows, np.concatenate([dst[:, 0], dst[:, 1]]), rcond=None)
    np.testing.assert_allclose(affine, [[a, -b, tx], [b, a, ty]], atol=1e-8)
    truth = np.concatenate([scale * rot, [[30.0], [40.0]]], 1)
    residual = ((_apply(affine, src) - dst) ** 2).sum()
    assert 0 < residual < ((_apply(truth, src) - dst) ** 2).sum()
    # a mirrored target still gets a rotation, never a reflection
    mirrored = face_align.similarity(src, src * (-1, 1))
    assert np.linalg.det(mirrored[:, :2]) > 0


def test_similarity_rejects_degenerate_points() -> None:
    with pytest.raises(ValueError, match="degenerate"):
        face_align.similarity(np.full((5, 2), 3.0), np.random.default_rng(0).uniform(size=(5, 2)))


def test_align_maps_projected_face_to_template(model: smplx.SMPLX) -> None:
    _, j = forward(model, global_orient=list(FACING_CAMERA))
    shift = np.array([0.0, 0.0, 0.6]) - j[IDX["head"]]
    uv = render_project(j + shift, body.intrinsics(FOCAL, SIZE))
    landmarks = uv[body.LMK_START:body.N_POINTS]
    five = face_align.five_points(landmarks)
    assert five.shape == (5, 2)
    assert five[0, 0] < five[2, 0] < five[1, 0]  # person's right eye on the image left, nose between
    assert five[3, 0] < five[4, 0] and five[3, 1] > five[2, 1]  # mouth corners below the nose
    affine = face_align.align(five, SIZE)
    np.testing.assert_allclose(_apply(affine, five), face_align.TEMPLATE * SIZE, atol=0.04 * SIZE)
    # batched landmarks give the same five points per frame
    np.testing.assert_allclose(face_align.five_points(np.stack([landmarks, landmarks + 3.0])),
                               np.stack([five, five + 3.0]))
