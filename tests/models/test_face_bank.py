"""The face bank: the identity's training faces found again by the mesh's landmarks, the mouth weighted up, and one
path of picks over a run of frames that jumps only where the distance it saves is worth it."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from models.face_bank import FILE, MOUTH_WEIGHT, FaceBank, descriptor

RIGHT_EYE, MOUTH_TOP = 20, 45


def faces(openings: list[float], clips: list[str] | None = None) -> FaceBank:
    """A bank whose faces differ only by the mouth's opening (the lower lip's landmarks moved down)."""
    n = len(openings)
    landmarks = np.tile(np.linspace(0.2, 0.8, 102, dtype=np.float32).reshape(1, 51, 2), (n, 1, 1))
    landmarks[:, 40:51, 1] += np.asarray(openings, np.float32)[:, None]
    crops = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 3), np.uint8)
    return FaceBank(crops, landmarks, np.asarray(clips or ["a"] * n), np.arange(n))


def test_the_mouth_weighs_more_than_an_eye() -> None:
    base = np.zeros((1, 51, 2), np.float32)
    eye, mouth = base.copy(), base.copy()
    eye[0, RIGHT_EYE, 0] = mouth[0, MOUTH_TOP, 0] = 0.1
    d = lambda a: float(np.linalg.norm(descriptor(a) - descriptor(base)))  # noqa: E731
    assert d(mouth) == pytest.approx(np.sqrt(MOUTH_WEIGHT) * d(eye))


def test_nearest_and_the_pairs_training_makes_come_from_another_moment() -> None:
    bank = faces([0.0, 0.01, 0.025, 0.10, 0.11], clips=["a", "a", "a", "a", "b"])
    query = bank.landmarks[[3]].copy()
    assert bank.path(query, 0.0).tolist() == [3]
    # at least 1 frame away: any other face; at least 2 in clip a: face 1 has only 3 (and 4, of clip b, which no gap
    # excludes)
    assert bank.nearest_elsewhere(1).tolist() == [1, 0, 1, 4, 3]
    assert bank.nearest_elsewhere(2).tolist() == [2, 3, 0, 4, 3]
    assert bank.nearest_elsewhere(2, chunk=2).tolist() == [2, 3, 0, 4, 3]
    alone = faces([0.0])
    assert alone.nearest_elsewhere(5).tolist() == [0]  # nothing far enough away: itself


def objective(bank: FaceBank, query: np.ndarray, picks: np.ndarray, switch: float) -> float:
    return float(bank.distances(query)[np.arange(len(picks)), picks].sum() + switch * bank.jumps(picks))


def test_the_path_jumps_only_where_it_saves_more_than_the_switch() -> None:
    bank = faces([0.00, 0.02, 0.04, 0.06, 0.08, 0.30, 0.021, 0.059], clips=list("aaaaabcd"))
    query = faces([0.0, 0.021, 0.04, 0.059, 0.08]).landmarks
    each = bank.path(query, 0.0)
    assert each.tolist() == [0, 6, 2, 7, 4] and bank.jumps(each) == 4
    steady = bank.path(query, 0.05)
    assert steady.tolist() == [0, 1, 2, 3, 4] and bank.jumps(steady) == 0
    # a jump far enough away is taken however it is charged; holding a face is free
    far = faces([0.0, 0.3, 0.3]).landmarks
    assert bank.path(far, 0.05).tolist() == [0, 5, 5] and bank.jumps(np.asarray([0, 5, 5])) == 1
    # moving on by up to two bank faces of a clip is free, three or into another clip is not
    assert bank.jumps(np.asarray([0, 2, 4])) == 0 and bank.jumps(np.asarray([0, 3])) == 1
    assert bank.jumps(np.asarray([4, 5])) == 1 and bank.jumps(np.asarray([3, 1])) == 1


def test_the_path_is_the_best_the_objective_allows() -> None:
    rng = np.random.default_rng(1)
    # a bank small enough to try every path: the path is the optimum
    small = faces(list(rng.uniform(0, 0.1, 6)), clips=list("aaabbb"))
    query = faces(list(rng.uniform(0, 0.1, 4))).landmarks
    for switch in (0.0, 0.02, 0.2):
        best = min(objective(small, query, np.asarray(p), switch) for p in np.ndindex(*(6,) * 4))
        assert objective(small, query, small.path(query, switch), switch) == pytest.approx(best)
    # a bank larger than the candidates kept per frame: never worse than each frame's nearest, steadier as a jump
    # costs more, and with a prohibitive cost no jump at all
    big = faces(list(rng.uniform(0, 0.1, 200)), clips=list("abcd" * 50))
    query = faces(list(0.05 + 0.04 * np.sin(np.arange(60) / 5))).landmarks
    nearest = big.path(query, 0.0)
    assert np.array_equal(nearest, big.distances(query).argmin(1))
    jumps = []
    for switch in (0.01, 0.05, 1e3):
        picks = big.path(query, switch)
        assert objective(big, query, picks, switch) <= objective(big, query, nearest, switch) + 1e-9
        jumps.append(big.jumps(picks))
    assert big.jumps(nearest) >= jumps[0] >= jumps[1] >= jumps[2] == 0


def test_the_path_continues_a_clip_that_is_not_among_the_nearest() -> None:
    # clip "a" rises with the asked mouth, a little off each frame; from the second frame on, 35 faces closer than it
    # (each in a clip of its own) crowd it out of the 30 nearest: only continuing the last frame's path finds it
    rng = np.random.default_rng(2)
    asked = 0.002 * np.arange(20) + 0.0005
    query = faces(list(asked)).landmarks
    walk = faces(list(0.002 * np.arange(20)))
    near = query[1:].repeat(35, 0) + rng.normal(0, 1e-4, (19 * 35, 51, 2)).astype(np.float32)
    bank = FaceBank(np.zeros((20 + len(near), 4, 4, 3), np.uint8), np.concatenate([walk.landmarks, near]),
                    np.asarray(["a"] * 20 + [f"x{k}" for k in range(len(near))]), np.arange(20 + len(near)))
    assert not set(bank._candidates(query[1:], 30)[0].ravel()) & set(range(20))
    picks = bank.path(query, 0.05)
    assert picks.tolist() == list(range(20)) and bank.jumps(picks) == 0


def test_moving_on_across_a_gap_in_time_is_a_jump() -> None:
    bank = FaceBank(np.zeros((4, 4, 4, 3), np.uint8), faces([0.0, 0.01, 0.02, 0.03]).landmarks, np.asarray(["a"] * 4),
                    np.asarray([0, 1, 2, 40]))
    assert bank.jumps(np.asarray([0, 1, 2])) == 0 and bank.jumps(np.asarray([2, 3])) == 1
    thinned = FaceBank(bank.crops, bank.landmarks, bank.clips, np.asarray([0, 6, 12, 18]))  # every 6th frame kept
    assert thinned.jumps(np.asarray([0, 1, 3])) == 0


def test_candidates_read_in_chunks_are_the_same() -> None:
    rng = np.random.default_rng(0)
    bank = faces(list(rng.uniform(0, 0.1, 40)))
    query = faces(list(rng.uniform(0, 0.1, 25))).landmarks
    whole = bank._candidates(query, 5)
    chunked = bank._candidates(query, 5, chunk=7)
    assert np.array_equal(whole[0], chunked[0]) and np.allclose(whole[1], chunked[1])
    assert np.all(np.diff(whole[1], axis=1) >= 0)  # nearest first


def test_a_bank_saves_loads_and_refuses_mismatched_parts(tmp_path: Path) -> None:
    bank = faces([0.0, 0.05], clips=["a", "b"])
    bank.save(tmp_path)
    back = FaceBank.load(tmp_path)
    assert np.array_equal(back.crops, bank.crops) and np.array_equal(back.landmarks, bank.landmarks)
    assert back.clips.tolist() == ["a", "b"] and back.frames.tolist() == [0, 1]
    # the same bank, the same bytes (np.savez would date each entry now)
    with zipfile.ZipFile(tmp_path / FILE) as zf:
        assert {i.date_time for i in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    with pytest.raises(ValueError, match="2 crops but landmarks"):
        FaceBank(bank.crops, bank.landmarks[:1], bank.clips, bank.frames)
    with pytest.raises(ValueError, match="at least one face"):
        FaceBank(bank.crops[:0], bank.landmarks[:0], bank.clips[:0], bank.frames[:0])
