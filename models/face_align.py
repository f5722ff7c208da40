"""Five-point face alignment: a similarity transform from projected mesh landmarks to a canonical face crop.

The five points (eye centres, nose tip, mouth corners) come from the SMPL-X face landmarks, so the crop follows the
mesh, not a face detector: it exists for every frame whose face is in view, and moves smoothly with the fit.
"""

from __future__ import annotations

import numpy as np

# canonical positions in a unit square crop: eyes, nose tip, mouth corners (person's right first, image left)
TEMPLATE = np.array([[0.375, 0.44], [0.625, 0.44], [0.5, 0.56], [0.405, 0.67], [0.595, 0.67]])
# SMPL-X face landmark slots (iBUG-68 points 17..67 → 0..50) behind the five points
RIGHT_EYE = list(range(19, 25))
LEFT_EYE = list(range(25, 31))
NOSE_TIP = 13
MOUTH_RIGHT, MOUTH_LEFT = 31, 37


def five_points(landmarks: np.ndarray) -> np.ndarray:
    """(..., 51, 2) projected SMPL-X landmarks → (..., 5, 2)."""
    return np.stack([landmarks[..., RIGHT_EYE, :].mean(-2), landmarks[..., LEFT_EYE, :].mean(-2),
                     landmarks[..., NOSE_TIP, :], landmarks[..., MOUTH_RIGHT, :], landmarks[..., MOUTH_LEFT, :]], -2)


def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares rotation, uniform scale and translation taking src (N,2) onto dst (N,2), as a 2×3 matrix."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    var = (s ** 2).sum()
    if var < 1e-12:
        raise ValueError("degenerate points: all in one place")
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    e = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        e[1, 1] = -1
    rot = u @ e @ vt
    scale = (sig * np.diag(e)).sum() / (var / len(src))
    t = mu_d - scale * rot @ mu_s
    return np.concatenate([scale * rot, t[:, None]], 1)


def align(points5: np.ndarray, size: int) -> np.ndarray:
    """The 2×3 transform from image pixels to a `size` face crop."""
    return similarity(points5.astype(np.float64), TEMPLATE * size)
