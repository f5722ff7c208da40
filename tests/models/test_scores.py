"""Landmark distance, flicker and the hand crops' SSIM on synthetic inputs with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from models.scores import landmark_distance, mean_in_box, ssim_map, temporal_flicker
from models.squares import hand_box


def test_known_offset_gives_the_offset() -> None:
    rng = np.random.default_rng(0)
    real = rng.uniform(0, 512, (30, 21, 2))
    moved = real + np.array([3.0, 4.0])  # 5 px away everywhere
    assert landmark_distance(moved, real)["mean_px"] == pytest.approx(5.0)
    assert landmark_distance(real, real)["mean_px"] == 0.0


def test_points_missing_on_either_side_are_left_out() -> None:
    real = np.zeros((4, 3, 2))
    gen = np.full((4, 3, 2), 2.0)  # every point 2√2 away ...
    gen[0, 0] = (30.0, 40.0)  # ... but this one 50 px away
    gen[1] = np.nan  # a frame where the generated part was not found
    real[2, 1] = np.nan  # a point the real frame lacks
    res = landmark_distance(gen, real)
    assert res["points"] == 12 - 3 - 1 and res["frames"] == 3
    assert res["mean_px"] == pytest.approx((50 + 7 * 2 * np.sqrt(2)) / 8)


def test_hand_outliers_are_dropped_by_the_rule_and_counted() -> None:
    real = np.zeros((5, 21, 2))
    gen = np.ones((5, 21, 2))  # √2 px
    gen[3] += 100.0  # a swapped hand: ~143 px
    kept = landmark_distance(gen, real, outlier=50.0)
    assert kept["dropped_frames"] == 1 and kept["frames"] == 4
    assert kept["mean_px"] == pytest.approx(np.sqrt(2))
    assert landmark_distance(gen, real)["mean_px"] > 20


def test_shape_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="of one shape"):
        landmark_distance(np.zeros((2, 3, 2)), np.zeros((2, 4, 2)))


def test_flicker_is_zero_when_the_change_matches_and_measures_added_flicker() -> None:
    rng = np.random.default_rng(1)
    real = [rng.integers(0, 200, (8, 8, 3), dtype=np.uint8) for _ in range(6)]
    same_change = [(f.astype(int) + 20).astype(np.uint8) for f in real]  # brighter, but changes identically
    res = temporal_flicker(same_change, real)
    assert res["flicker"] == pytest.approx(0.0, abs=1e-7)
    assert res["change_generated"] == pytest.approx(res["change_real"])
    steady = [np.full((8, 8, 3), 100, np.uint8)] * 6
    blinking = [np.full((8, 8, 3), 100 + 51 * (i % 2), np.uint8) for i in range(6)]
    res = temporal_flicker(blinking, steady)
    assert res["flicker"] == pytest.approx(51 / 255) and res["change_real"] == 0.0
    with pytest.raises(ValueError):
        temporal_flicker(steady[:3], steady)


def test_a_hand_box_is_the_hand_with_a_margin_inside_the_frame() -> None:
    hand = np.array([[100.0, 50.0], [120.0, 60.0], [110.0, 90.0]])  # 20 × 40 px
    assert hand_box(hand, 256) == (110 - 30, 70 - 30, 60)  # the longer side × 1.5, centred
    # a hand folded into a few pixels still gets a box SSIM can judge: 6 % of the side (and 16 px)
    assert hand_box(np.array([[40.0, 40.0], [42.0, 41.0]]), 256) == (33, 32, 16)
    assert hand_box(np.array([[40.0, 40.0], [42.0, 41.0]]), 512) == (26, 25, 31)
    # at the frame's edge: moved inside, never cut
    assert hand_box(hand + [140.0, -45.0], 256) == (196, 0, 60)
    # fewer than half of the points found inside the frame: no box
    assert hand_box(np.array([[10.0, 10.0], [np.nan, np.nan], [300.0, 10.0]]), 256) is None
    assert hand_box(np.array([[10.0, 10.0], [np.nan, np.nan], [30.0, 10.0]]), 256) == (5, 0, 30)


def test_ssim_in_a_box_judges_the_whole_box_and_only_it() -> None:
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    outside = real.copy()
    outside[:, 40:] = 0  # 12 px right of the box: beyond the 11-tap window's reach
    assert mean_in_box(ssim_map(outside, real), (4, 8, 24)) == pytest.approx(1.0)
    inside = real.copy()
    inside[10:30, 10:26] = 255 - inside[10:30, 10:26]
    assert mean_in_box(ssim_map(inside, real), (4, 8, 24)) < 0.5
    # the box's own edge counts as much as its centre: a dark 2 px ring costs what it covers (~30 % of a 24 px box)
    ring = real.copy()
    ring[8:32, 4:28] = 0
    ring[10:30, 6:26] = real[10:30, 6:26]
    assert mean_in_box(ssim_map(ring, real), (4, 8, 24)) < 0.8
    with pytest.raises(ValueError, match="leaves the"):
        mean_in_box(ssim_map(real, real), (60, 0, 16))
    with pytest.raises(ValueError, match="shapes differ"):
        ssim_map(real[:32], real)
