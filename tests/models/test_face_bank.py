"""The face bank: the identity's training faces found again by the mesh's landmarks, the mouth weighted up, and one
path of picks over a run of frames that jumps only where the distance it saves is worth it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.face_bank import MOUTH_WEIGHT, FaceBank, descriptor

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
    bank = faces([0.0, 0.01, 0.02, 0.10, 0.11], clips=["a", "a", "a", "a", "b"])
    query = bank.landmarks[[3]].copy()
    assert bank.path(query, 0.0).tolist() == [3]
    # face 1's nearest are its neighbours 0 and 2; at least 2 frames away in clip a that leaves face 3 (and 4, of clip
    # b, which no gap excludes, is nearer to 3)
    assert bank.nearest_elsewhere(1).tolist() == [1, 0, 1, 4, 3]
    assert bank.nearest_elsewhere(2).tolist() == [2, 3, 0, 4, 3]
    alone = faces([0.0])
    assert alone.nearest_elsewhere(5).tolist() == [0]  # nothing far enough away: itself


def test_the_path_jumps_only_where_it_saves_more_than_the_switch() -> None:
    bank = faces([0.00, 0.02, 0.04, 0.06, 0.08, 0.30, 0.021, 0.059])
    asked = np.asarray([0.0, 0.021, 0.04, 0.059, 0.08])
    query = faces(list(asked)).landmarks
    each = bank.path(query, 0.0)
    assert each.tolist() == [0, 6, 2, 7, 4] and bank.jumps(each) == 4
    steady = bank.path(query, 0.05)
    assert steady.tolist() == [0, 1, 2, 3, 4] and bank.jumps(steady) == 0
    # a jump far enough away is taken however it is charged
    far = faces([0.0, 0.3, 0.3]).landmarks
    assert bank.path(far, 0.05).tolist() == [0, 5, 5]


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
    with pytest.raises(ValueError, match="2 crops but landmarks"):
        FaceBank(bank.crops, bank.landmarks[:1], bank.clips, bank.frames)
    with pytest.raises(ValueError, match="at least one face"):
        FaceBank(bank.crops[:0], bank.landmarks[:0], bank.clips[:0], bank.frames[:0])
