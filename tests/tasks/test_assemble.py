"""assemble's encoder: the same frames give the same bytes every time (a re-render after `anchor pull` must
reproduce a delivered video byte for byte, and `anchor audit` compares hashes)."""

from __future__ import annotations

import os
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from core.hashing import sha256_file
from core.progress import NullProgress
from tasks.frames import write_png
from tasks.stages.assemble import AssembleParams, encode


def _noisy(tmp_path: Path, side: int, n: int = 6) -> list[Path]:
    """Small frames like a tiny render's: smooth random texture whose brightness drifts, with fresh grain each
    frame (what made x264's macroblock-tree give a different stream from run to run)."""
    rng = np.random.default_rng(side)
    base = cv2.GaussianBlur(rng.integers(0, 256, (side, side, 3)).astype(np.float32), (0, 0), 3)
    paths = []
    for i in range(n):
        paths.append(tmp_path / f"{side}-{i:06d}.png")
        write_png(paths[-1], np.clip(base + 20 * np.sin(i) + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8))
    return paths


@pytest.mark.parametrize("side", [64, 96])
def test_the_same_frames_encode_to_the_same_bytes_whatever_was_allocated_before(tmp_path: Path, side: int) -> None:
    frames = _noisy(tmp_path, side)
    held, digests = [], set()
    for k in range(40):
        held.append(os.urandom(4096 * (k % 7 + 1)))  # a different heap before each encode, as in a long process
        out = tmp_path / f"v{k}.mp4"
        assert encode(frames, out, AssembleParams(preset="veryfast", crf=18), None, NullProgress()) == len(frames)
        digests.add(sha256_file(out))
    assert len(digests) == 1
    with av.open(str(tmp_path / "v0.mp4")) as c:
        decoded = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(decoded) == len(frames) and decoded[0].shape == (side, side, 3)
