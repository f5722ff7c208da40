"""The square around a hand's points, one rule for every place that looks at a hand: the metrics judge a generated
hand inside the square around the real one's landmarks, training weighs the square around the mesh's projected
hand, and the hand model learns and redraws what is inside it. Numpy only, so the stages that use it carry no
scoring or rendering code in their cache keys."""

from __future__ import annotations

import numpy as np


def hand_box(points: np.ndarray, side: int, margin: float = 1.5, least: float = 0.06
             ) -> tuple[int, int, int] | None:
    """The square (x, y, size) in a side × side frame around one hand's landmarks (K, 2; NaN = not found): the longer
    extent of the points inside the frame times `margin`, at least `least` of the side (and 16 px: a folded hand
    still has fingers to judge), moved to lie inside the frame. None when fewer than half of the points are found
    inside it: a hand at the frame's edge or missed by the detector has no crop to judge."""
    ok = np.isfinite(points).all(-1) & (points >= 0).all(-1) & (points < side).all(-1)
    if ok.sum() * 2 < len(points):
        return None
    inside = points[ok]
    lo, hi = inside.min(0), inside.max(0)
    size = int(min(side, max(round(float((hi - lo).max()) * margin), round(least * side), 16)))
    cx, cy = (lo + hi) / 2
    x = int(min(max(round(cx - size / 2), 0), side - size))
    y = int(min(max(round(cy - size / 2), 0), side - size))
    return x, y, size


def hand_share(crop: np.ndarray) -> float:
    """Share of a hand crop (RGB uint8) in the hands' own saturated colours: how much of the hand is in front of
    everything else. The body's mesh colour and the black background are far from saturated."""
    c = crop.astype(np.int16)
    hi, lo = c.max(-1), c.min(-1)
    return float(((hi > 24) & (hi - lo > 0.7 * hi)).mean())


def crop_transform(box: list[float] | tuple[float, ...], frame_side: int, size: int) -> np.ndarray:
    """The 2 × 3 affine taking a frame of `frame_side` px to the `size` px crop of the square `box` (x, y, side as
    shares of the frame side)."""
    x, y, s = (float(v) * frame_side for v in box)
    a = size / s
    return np.array([[a, 0.0, -x * a], [0.0, a, -y * a]])


def square_mask(size: int, feather: float) -> np.ndarray:
    """A size × size uint8 mask, full inside and falling linearly to 0 at the edges over `feather` px: a crop
    model's square (a hand's, a face's) meets the frame without a seam."""
    edge = np.minimum(np.arange(size), np.arange(size)[::-1]).astype(np.float32)
    ramp = np.clip(edge / max(feather, 1e-6), 0, 1)
    return np.round(np.minimum.outer(ramp, ramp) * 255).astype(np.uint8)
