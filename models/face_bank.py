"""The identity's own faces, found again by the mesh: the face detail model's reference for each face it redraws.

A regressor learnt from a few hundred faces in minutes draws a sharp face but not its mouth: the mouth is a few pixels
tall at the crop's side, its opening an average over frames that disagree, and no variant of the input or the loss
moved it (docs/cpu-profile.md). The identity's training faces already hold every opening it showed. So each face is
redrawn from the training face whose mesh looks most like the one asked for — the SMPL-X face landmarks in the
aligned crop, where head turn and nod shift them all and the jaw moves the mouth's twenty (weighted up, `MOUTH`) —
and the model learns to correct that face towards the mesh and the body frame around it (Video Rewrite, Bregler et
al. 1997, picks mouths from the speaker's own footage in the same spirit).

Over a video the picks are one path, not independent nearest faces (`path`): holding a face or moving on through its
clip is free, any other move costs `switch`, as in unit-selection synthesis — otherwise the reference changes nearly
every frame and the redrawn face flickers with it.

The bank is the training crops with their landmarks, clip and frame, saved beside the model (`FILE`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.npz import write_npz

FILE = "bank.npz"
LANDMARKS = 51  # SMPL-X face landmarks (iBUG-68 points 17..67): brows, nose, eyes, then the mouth's 20
MOUTH = slice(31, 51)
MOUTH_WEIGHT = 4.0  # a mouth landmark's squared offset counts this many times an eye's or the nose's (its offset 2×)
CANDIDATES = 30  # nearest faces per frame for the path (and the best paths so far that it may continue)
FOLLOWS = 2  # a pick up to this many bank faces on from the last (same clip) continues its run: free


def descriptor(landmarks: np.ndarray) -> np.ndarray:
    """(N, 51, 2) landmarks in the crop, shares of its side → (N, 102) vectors whose squared Euclidean distance
    weighs the mouth's landmarks `MOUTH_WEIGHT` times."""
    w = np.ones(LANDMARKS, np.float32)
    w[MOUTH] = MOUTH_WEIGHT
    return (np.asarray(landmarks, np.float32) * np.sqrt(w)[None, :, None]).reshape(len(landmarks), -1)


@dataclass
class FaceBank:
    """Training face crops (N, S, S, 3) uint8 with their mesh landmarks (N, 51, 2), clip names and frame numbers."""

    crops: np.ndarray
    landmarks: np.ndarray
    clips: np.ndarray
    frames: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.crops)
        if not n:
            raise ValueError("a face bank needs at least one face")
        if self.landmarks.shape != (n, LANDMARKS, 2) or len(self.clips) != n or len(self.frames) != n:
            raise ValueError(f"face bank: {n} crops but landmarks {self.landmarks.shape}, {len(self.clips)} clips, "
                             f"{len(self.frames)} frames")
        self._desc = descriptor(self.landmarks).astype(np.float64)
        # the frames between one bank face and the next of its clip (more than 1 where the bank was thinned)
        steps = np.diff(self.frames)[(self.clips[1:] == self.clips[:-1]) & (np.diff(self.frames) > 0)]
        self._stride = int(np.median(steps)) if len(steps) else 1

    def __len__(self) -> int:
        return len(self.crops)

    def save(self, folder: Path) -> None:
        write_npz(folder / FILE, {"crops": self.crops, "landmarks": self.landmarks.astype(np.float32),
                                  "clips": self.clips.astype(str), "frames": self.frames.astype(np.int64)})

    @classmethod
    def load(cls, folder: Path) -> FaceBank:
        with np.load(folder / FILE) as z:
            return cls(z["crops"], z["landmarks"], z["clips"], z["frames"])

    def distances(self, landmarks: np.ndarray) -> np.ndarray:
        """(Q, 51, 2) query landmarks → (Q, N) distances to every bank face."""
        q = descriptor(landmarks).astype(np.float64)
        d2 = (q ** 2).sum(1)[:, None] + (self._desc ** 2).sum(1)[None] - 2 * q @ self._desc.T
        return np.sqrt(np.maximum(d2, 0))

    def nearest_elsewhere(self, gap: int, chunk: int = 512) -> np.ndarray:
        """For each bank face, the nearest other face at least `gap` (≥ 1) frames away in its clip (or in another clip):
        what training pairs a face with, so the model learns to correct a face from another moment, as at render
        time. A face with nothing far enough away is paired with itself."""
        pick = np.arange(len(self))
        for a in range(0, len(self), chunk):
            rows = slice(a, a + chunk)
            d = self.distances(self.landmarks[rows])
            d[(self.clips[rows, None] == self.clips[None])
              & (np.abs(self.frames[rows, None] - self.frames[None]) < gap)] = np.inf
            best = d.argmin(1)
            found = np.isfinite(d[np.arange(len(d)), best])
            pick[a + np.flatnonzero(found)] = best[found]
        return pick

    def jumps(self, picks: np.ndarray) -> int:
        """How many times a path of bank faces does other than hold or move on through its clip (what `path`
        charges for)."""
        return int((~self._follows(picks[:-1], picks[1:])).sum())

    def _follows(self, prev: np.ndarray, cur: np.ndarray) -> np.ndarray:
        """Whether bank face `cur` continues from `prev` (broadcast): the same face, or up to `FOLLOWS` bank faces
        on in the same clip (the bank keeps each clip's faces in order; counted in bank faces, so a thinned bank still
        has neighbours) and no further on in time than that many of its usual steps (not across frames where the
        face was out of view)."""
        step = cur - prev
        later = self.frames[cur] - self.frames[prev]
        return ((self.clips[cur] == self.clips[prev]) & (step >= 0) & (step <= FOLLOWS)
                & (later <= FOLLOWS * self._stride))

    def path(self, landmarks: np.ndarray, switch: float) -> np.ndarray:
        """The bank faces for a run of consecutive frames (Q, 51, 2): the sequence of least total distance plus
        `switch` per jump, where holding a face or moving on by up to `FOLLOWS` of its clip is no jump. Viterbi over
        each frame's `CANDIDATES` nearest and the faces that continue the last frame's best (as unit selection
        does: the continuation is rarely among the nearest of a bank of similar faces). `switch` 0: each frame's
        nearest."""
        k = 1 if switch <= 0 else min(CANDIDATES, len(self))
        near, cost = self._candidates(landmarks, k)
        if k == 1 or len(near) == 1:
            return near[:, 0]
        q = descriptor(landmarks).astype(np.float64)
        sets, back, total = [near[0]], [], cost[0].copy()
        for t in range(1, len(q)):
            prev = sets[-1]
            on = (prev[np.argsort(total)[:k], None] + np.arange(FOLLOWS + 1)[None]).ravel()
            cur = np.unique(np.concatenate([near[t], on[on < len(self)]]))
            options = total[:, None] + np.where(self._follows(prev[:, None], cur[None]), 0.0, switch)
            best = options.argmin(0)
            back.append(best)
            total = options[best, np.arange(len(cur))] + np.sqrt(((self._desc[cur] - q[t]) ** 2).sum(1))
            sets.append(cur)
        j = int(total.argmin())
        out = [int(sets[-1][j])]
        for t in range(len(q) - 1, 0, -1):
            j = int(back[t - 1][j])
            out.append(int(sets[t - 1][j]))
        return np.asarray(out[::-1])

    def _candidates(self, landmarks: np.ndarray, k: int, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """Each query's k nearest bank faces, nearest first, and their distances; queries a chunk at a time, so a
        ten-minute render's distance table is never whole in memory."""
        cands, cost = [], []
        for a in range(0, len(landmarks), chunk):
            d = self.distances(landmarks[a:a + chunk])
            c = np.argpartition(d, k - 1, axis=1)[:, :k] if k < d.shape[1] else np.tile(np.arange(d.shape[1]),
                                                                                          (len(d), 1))
            dc = np.take_along_axis(d, c, 1)
            order = np.argsort(dc, axis=1)
            cands.append(np.take_along_axis(c, order, 1))
            cost.append(np.take_along_axis(dc, order, 1))
        return np.concatenate(cands), np.concatenate(cost)
