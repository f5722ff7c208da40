"""Five-point face alignment: a similarity transform from projected mesh landmarks to a canonical face crop.

The five points (eye centres, nose tip, mouth corners) come from the SMPL-X face landmarks, so the crop follows the
mesh, not a face detector: it exists for every frame whose face is in view, and moves smoothly with the fit.
"""

from __future__ import annotations

import cv2
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


def in_crop(points: np.ndarray, m: np.ndarray, size: int) -> np.ndarray:
    """(N, 2) image pixels → where the 2×3 `m` puts them in its `size` crop, as shares of the crop's side."""
    return (np.asarray(points, np.float64) @ m[:, :2].T + m[:, 2]) / size


def _resize_map(src: int, dst: int) -> np.ndarray:
    """Pixel coordinates of an image of side `src` in the same image resized to side `dst` (pixel centres kept)."""
    k = dst / src
    return np.array([[k, 0, 0.5 * k - 0.5], [0, k, 0.5 * k - 0.5], [0, 0, 1]])


def rescale(m: np.ndarray, image_from: int, image_to: int, crop_from: int, crop_to: int) -> np.ndarray:
    """`m` takes an image of side image_from into a crop of side crop_from; the same crop region for an image of
    side image_to, sampled at side crop_to."""
    m3 = np.vstack([m, [0, 0, 1]])
    return (_resize_map(crop_from, crop_to) @ m3 @ _resize_map(image_to, image_from))[:2]


def paste(frame: np.ndarray, crop: np.ndarray, mask: np.ndarray, m: np.ndarray, feather: float) -> np.ndarray:
    """Blend `crop` (taken from `frame` by the 2×3 `m`) back into the frame inside `mask` (uint8, crop-sized),
    its edge softened by a Gaussian of `feather` crop pixels. Pixels the mask does not reach are left exactly."""
    h, w = frame.shape[:2]
    alpha = mask.astype(np.float32) / 255
    if feather > 0:
        alpha = cv2.GaussianBlur(alpha, (0, 0), feather)
    inv = cv2.invertAffineTransform(m)
    back = cv2.warpAffine(crop, inv, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    a = cv2.warpAffine(alpha, inv, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    a = a[..., None]
    out = frame.astype(np.float32) * (1 - a) + back.astype(np.float32) * a
    return np.where(a > 0, np.round(out), frame).astype(np.uint8)
