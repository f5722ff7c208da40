"""The SMPL-X body model, always through `smplx.create`, plus a sparse forward pass for fitting.

Fitting only needs joints, the extra vertex joints and the face landmarks of every frame, not all 10475 vertices:
`SparseBody` runs the same linear blend skinning on just those vertices (a few hundred), which makes a whole clip
per optimiser step cheap on a CPU. `test_body` checks it against smplx's full forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import smplx
import torch
from smplx.lbs import batch_rigid_transform, batch_rodrigues
from smplx.vertex_ids import vertex_ids as VERTEX_IDS

from models.smplx_layout import (  # noqa: F401 - the layout's names, also here for the body's users
    EXTRA,
    EXTRA_START,
    HEAD,
    JAW,
    L_EYE,
    L_SHOULDER,
    L_WRIST,
    LMK_START,
    N_JOINTS,
    N_POINTS,
    NECK,
    NUM_BETAS,
    NUM_EXPRESSION,
    PELVIS,
    POSE_BLOCKS,
    R_EYE,
    R_SHOULDER,
    R_WRIST,
)


def model_file(path: Path) -> Path:
    """The SMPLX_NEUTRAL file behind `body_model.path`: the file itself, or one inside the directory."""
    path = Path(path)
    if path.is_file():
        return path
    for rel in ("SMPLX_NEUTRAL.npz", "smplx/SMPLX_NEUTRAL.npz", "SMPLX_NEUTRAL.pkl", "smplx/SMPLX_NEUTRAL.pkl"):
        if (path / rel).is_file():
            return path / rel
    raise FileNotFoundError(f"{path}: no SMPLX_NEUTRAL.npz or .pkl there (body_model.path)")


def load(path: Path, batch_size: int = 1) -> smplx.SMPLX:
    """smplx.create on a local SMPL-X file (the mannequin or the real one), full 45-dim hands, absolute poses."""
    file = model_file(path)
    return smplx.create(str(file), model_type="smplx", ext=file.suffix[1:], use_pca=False, flat_hand_mean=True,
                        use_face_contour=True, num_betas=NUM_BETAS, num_expression_coeffs=NUM_EXPRESSION,
                        batch_size=batch_size)


def full_pose(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """(T, 55, 3) axis-angle in SMPL-X joint order from the named pose blocks."""
    return torch.cat([params[k].reshape(params[k].shape[0], -1, 3) for k in POSE_BLOCKS], dim=1)


@dataclass
class Output:
    joints: torch.Tensor  # (T, 55, 3) posed joints, translation applied
    points: torch.Tensor  # (T, 127, 3) joints, vertex joints, face landmarks


class SparseBody(torch.nn.Module):
    """LBS on the vertices the joints and landmarks need; exact, not an approximation."""

    def __init__(self, model: smplx.SMPLX) -> None:
        super().__init__()
        faces = model.faces_tensor.long()
        extra = torch.tensor([VERTEX_IDS["smplx"][k] for k in EXTRA])
        lmk_verts = faces[model.lmk_faces_idx]  # (51, 3)
        needed = torch.unique(torch.cat([extra, lmk_verts.reshape(-1)]))
        remap = {int(v): i for i, v in enumerate(needed)}
        self.register_buffer("extra_idx", torch.tensor([remap[int(v)] for v in extra]))
        self.register_buffer("lmk_idx", torch.tensor([[remap[int(v)] for v in tri] for tri in lmk_verts]))
        self.register_buffer("lmk_bary", model.lmk_bary_coords.clone())
        self.register_buffer("parents", model.parents.clone())
        v_template = model.v_template
        shapedirs = model.shapedirs[..., :NUM_BETAS]
        exprdirs = model.expr_dirs[..., :NUM_EXPRESSION]
        jreg = model.J_regressor
        self.register_buffer("v_template", v_template[needed].clone())
        self.register_buffer("shapedirs", shapedirs[needed].clone())
        self.register_buffer("exprdirs", exprdirs[needed].clone())
        n_pose = model.posedirs.shape[0]
        self.register_buffer("posedirs", model.posedirs.reshape(n_pose, -1, 3)[:, needed].reshape(n_pose, -1).clone())
        self.register_buffer("weights", model.lbs_weights[needed].clone())
        self.register_buffer("j_template", jreg @ v_template)
        self.register_buffer("j_shapedirs", torch.einsum("jv,vcs->jcs", jreg, shapedirs))
        self.register_buffer("j_exprdirs", torch.einsum("jv,vcs->jcs", jreg, exprdirs))
        self.register_buffer("pose_mean", model.pose_mean.reshape(-1, 3).clone())

    def forward(self, betas: torch.Tensor, expression: torch.Tensor, pose: torch.Tensor,
                transl: torch.Tensor, root_rot: torch.Tensor | None = None) -> Output:
        """betas (1|T, 10), expression (T, 10), pose (T, 55, 3) axis-angle, transl (T, 3); `root_rot` (T|1, 3, 3)
        premultiplies the root rotation (lets a fit start from "facing the camera" without axis-angle at pi)."""
        t = pose.shape[0]
        betas = betas.expand(t, -1)
        pose = pose + self.pose_mean
        v = (self.v_template + torch.einsum("bs,vcs->bvc", betas, self.shapedirs)
             + torch.einsum("be,vce->bvc", expression, self.exprdirs))
        joints = (self.j_template + torch.einsum("bs,jcs->bjc", betas, self.j_shapedirs)
                  + torch.einsum("be,jce->bjc", expression, self.j_exprdirs))
        rot = batch_rodrigues(pose.reshape(-1, 3)).reshape(t, -1, 3, 3)
        if root_rot is not None:
            rot = torch.cat([(root_rot @ rot[:, 0]).unsqueeze(1), rot[:, 1:]], dim=1)
        ident = torch.eye(3, dtype=rot.dtype, device=rot.device)
        pose_feature = (rot[:, 1:] - ident).reshape(t, -1)
        v = v + (pose_feature @ self.posedirs).reshape(t, -1, 3)
        posed_joints, rel = batch_rigid_transform(rot, joints, self.parents, dtype=rot.dtype)
        a = torch.einsum("vj,bjmn->bvmn", self.weights, rel)
        v = torch.einsum("bvmn,bvn->bvm", a[..., :3, :3], v) + a[..., :3, 3]
        lmk = (v[:, self.lmk_idx] * self.lmk_bary[None, :, :, None]).sum(2)
        points = torch.cat([posed_joints, v[:, self.extra_idx], lmk], dim=1) + transl[:, None]
        return Output(posed_joints + transl[:, None], points)


def project(points: torch.Tensor, focal: float | torch.Tensor, centre: tuple[float, float]) -> torch.Tensor:
    """Pinhole projection of camera-space points (OpenCV axes: x right, y down, z forward) to pixels."""
    z = points[..., 2:3].clamp(min=1e-3)
    return points[..., :2] / z * focal + torch.tensor(centre, dtype=points.dtype)


def intrinsics(focal: float, size: int) -> np.ndarray:
    return np.array([[focal, 0, size / 2], [0, focal, size / 2], [0, 0, 1]], np.float64)


def hands_mean(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The model's relaxed hand pose (the PCA mean), left and right, as absolute 45-dim poses."""
    file = model_file(path)
    model = smplx.create(str(file), model_type="smplx", ext=file.suffix[1:], use_pca=False, flat_hand_mean=False,
                         num_betas=NUM_BETAS, num_expression_coeffs=NUM_EXPRESSION)
    return model.left_hand_mean.numpy().copy(), model.right_hand_mean.numpy().copy()
