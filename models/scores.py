"""Frame-level scores of a generated video against the real one: landmark mean distance, SSIM inside the person,
temporal flicker, and the "nearest training frame" baseline a trained model must beat.

LMD follows the paper (Table I) with MediaPipe in place of OpenPose: landmarks are found on generated and real
frames of the same motion, and the mean Euclidean distance over the points found in both is reported in pixels at
the crop resolution. Hands: a frame's hand whose mean distance exceeds `hand_outlier` (a share of the frame side)
is treated as a detector failure (a missed, swapped or hallucinated hand) and left out, and how many were left out
is reported with the figure.

Flicker is warping-free: it compares the frame-to-frame change of the generated video with that of the real one,
|(G_t − G_{t−1}) − (R_t − R_{t−1})| averaged over pixels and frames (0 = the generated video changes exactly as the
real one does), alongside both videos' mean absolute change.

Hands are ~20 px wide in a 256 px frame and weigh little in the person's SSIM; their own SSIM is taken in a square
around each real hand's landmarks (`models.squares.hand_box`), read from the frame's SSIM map (`ssim_map`,
`mean_in_box`).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from skimage.metrics import structural_similarity


def landmark_distance(generated: np.ndarray, real: np.ndarray, outlier: float | None = None) -> dict[str, float]:
    """generated, real: (T, K, 2) pixel coordinates, NaN where a point (or the whole part) was not found.
    Returns the mean distance over frames and points found in both, with the frames used and dropped."""
    if generated.shape != real.shape or generated.ndim != 3 or generated.shape[-1] != 2:
        raise ValueError(f"landmarks must be two (T, K, 2) arrays of one shape, got {generated.shape}, {real.shape}")
    dist = np.linalg.norm(generated.astype(np.float64) - real.astype(np.float64), axis=-1)  # (T, K)
    found = np.isfinite(dist)
    frames = found.any(axis=1)
    per_frame = np.where(frames, np.nansum(np.where(found, dist, 0.0), axis=1) / np.maximum(found.sum(1), 1), np.nan)
    dropped = 0
    if outlier is not None:
        bad = frames & (per_frame > outlier)
        dropped = int(bad.sum())
        found &= ~bad[:, None]
    n = int(found.sum())
    return {"mean_px": float(dist[found].mean()) if n else float("nan"), "points": n,
            "frames": int(found.any(axis=1).sum()), "dropped_frames": dropped}


def temporal_flicker(generated: Iterable[np.ndarray], real: Iterable[np.ndarray]) -> dict[str, float]:
    """Frames (H, W, 3) uint8, streamed in step; both videos must have the same length and size."""

    def pairs() -> Iterable[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        prev = None
        for g, r in zip(generated, real, strict=True):
            if prev is not None:
                yield prev[0], g, prev[1], r
            prev = (g, r)

    return flicker_of_pairs(pairs())


def flicker_of_pairs(pairs: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Flicker over (G_{t−1}, G_t, R_{t−1}, R_t) pairs of consecutive frames: all of a video's, or a sample."""
    total = change_g = change_r = 0.0
    steps = 0
    for g0, g1, r0, r1 in pairs:
        g0, g1 = g0.astype(np.float32) / 255, g1.astype(np.float32) / 255
        r0, r1 = r0.astype(np.float32) / 255, r1.astype(np.float32) / 255
        if g1.shape != r1.shape or g0.shape != r0.shape:
            raise ValueError(f"frame sizes differ: {g1.shape} vs {r1.shape}")
        dg, dr = g1 - g0, r1 - r0
        total += float(np.abs(dg - dr).mean())
        change_g += float(np.abs(dg).mean())
        change_r += float(np.abs(dr).mean())
        steps += 1
    if not steps:
        raise ValueError("flicker needs at least two frames")
    return {"flicker": total / steps, "change_generated": change_g / steps, "change_real": change_r / steps}


def ssim_map(generated: np.ndarray, real: np.ndarray) -> np.ndarray:
    """SSIM (Wang et al. 2004: 11-tap Gaussian window, σ 1.5) of two (H, W, 3) uint8 images at every pixel, averaged
    over the colour channels: one map per frame, which the person's mask and each hand's square are read from."""
    if generated.shape != real.shape:
        raise ValueError(f"shapes differ: generated {generated.shape}, real {real.shape}")
    _, full = structural_similarity(real, generated, channel_axis=-1, data_range=255, gaussian_weights=True,
                                    sigma=1.5, use_sample_covariance=False, full=True)
    return full.mean(axis=-1)


def mean_in_mask(ssim: np.ndarray, mask: np.ndarray) -> float:
    """An SSIM map's mean where `mask` (H, W, in [0, 1]) is above one half: the person, not the background that any
    copy gets right. NaN when the mask is empty."""
    if mask.shape != ssim.shape:
        raise ValueError(f"shapes differ: SSIM map {ssim.shape}, mask {mask.shape}")
    inside = mask > 0.5
    return float(ssim[inside].mean()) if inside.any() else float("nan")


def mean_in_box(ssim: np.ndarray, box: tuple[int, int, int]) -> float:
    """An SSIM map's mean over the (x, y, size) square: every pixel of it counts, its edges included (the map is
    of the whole frame, so a crop's border is not lost to the window)."""
    x, y, size = box
    inside = ssim[y:y + size, x:x + size]
    if inside.shape != (size, size):
        raise ValueError(f"box {box} leaves the {ssim.shape} frame")
    return float(inside.mean())


def ssim_in_mask(generated: np.ndarray, real: np.ndarray, mask: np.ndarray) -> float:
    """SSIM of two (H, W, 3) uint8 images inside `mask` (`ssim_map`, `mean_in_mask`)."""
    return mean_in_mask(ssim_map(generated, real), mask)


def nearest_frames(query: np.ndarray, pool: np.ndarray, chunk: int = 64) -> np.ndarray:
    """For each query pose (T, K, 2) the index of the pool pose (N, K, 2) at the smallest mean distance over the
    points found in both (NaN = not found), among the pool frames that share the most of the query's points: a
    frame whose hands are out of view must not win on the body alone against one that shows them. A pool frame
    sharing no point with a query is never chosen; -1 when no pool frame shares one."""
    if query.ndim != 3 or pool.ndim != 3 or query.shape[1:] != pool.shape[1:]:
        raise ValueError(f"poses must be (T, K, 2) and (N, K, 2), got {query.shape} and {pool.shape}")
    out = np.full(len(query), -1, np.int64)
    for a in range(0, len(query), chunk):
        d = np.linalg.norm(query[a:a + chunk, None] - pool[None], axis=-1)  # (t, N, K)
        found = np.isfinite(d)
        shared = found.sum(-1)  # (t, N)
        mean = np.where(shared > 0, np.where(found, d, 0).sum(-1) / np.maximum(shared, 1), np.inf)
        mean = np.where(shared == shared.max(axis=1, keepdims=True), mean, np.inf)
        best = mean.argmin(axis=1)
        out[a:a + chunk] = np.where(np.isfinite(mean.min(axis=1)), best, -1)
    return out
