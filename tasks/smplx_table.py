"""SMPL-X parameters per frame as a Parquet table (one row per frame), and the identity's shape and camera.

The same layout serves the fit, its perturbed copies and imported motions, so render_mesh reads them all alike.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

TABLE = "params.parquet"
IDENTITY = "identity.json"
BLOCKS = {"global_orient": 3, "transl": 3, "body_pose": 63, "left_hand_pose": 45, "right_hand_pose": 45,
          "jaw_pose": 3, "leye_pose": 3, "reye_pose": 3, "expression": 10}


def write(path: Path, keys: dict[str, np.ndarray], blocks: dict[str, np.ndarray]) -> None:
    """keys: per-row columns such as clip, split, frame (and copy); blocks: (T, width) arrays."""
    cols: dict[str, Any] = {k: pa.array(v.tolist()) for k, v in keys.items()}
    for name in BLOCKS:
        arr = np.ascontiguousarray(blocks[name], np.float32)
        cols[name] = pa.FixedSizeListArray.from_arrays(pa.array(arr.ravel()), arr.shape[1])
    pq.write_table(pa.table(cols), path)


def read(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    tab = pq.read_table(path)
    keys = {c: np.asarray(tab[c].to_pylist()) for c in tab.column_names if c not in BLOCKS}
    blocks = {}
    for name, width in BLOCKS.items():
        flat = tab[name].combine_chunks().flatten().to_numpy(zero_copy_only=False)
        blocks[name] = flat.reshape(-1, width).astype(np.float32)
    return keys, blocks


def write_identity(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_identity(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def segments(clips: np.ndarray) -> list[tuple[int, int, str]]:
    """Runs of equal clip names: (start, end, clip)."""
    out, start = [], 0
    for i in range(1, len(clips) + 1):
        if i == len(clips) or clips[i] != clips[start]:
            out.append((start, i, str(clips[start])))
            start = i
    return out
