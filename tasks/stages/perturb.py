"""perturb: noisy copies of the training clips' SMPL-X parameters (paper §V-C6).

The generator learns to follow the mesh, not to copy it pixel for pixel: conditions rendered from parameters with a
little per-frame position noise (and optionally pose noise) teach it to tolerate the fitting's own errors. Noise is
drawn from `seed`, so the same params give the same copies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from core.progress import Progress
from core.section import Section
from core.stage import Stage
from tasks import smplx_table


class PerturbParams(Section):
    copies: int = Field(1, ge=0, le=16, description="perturbed versions of each training clip")
    sigma_transl: float = Field(0.01, ge=0, le=1, description="per-frame position noise, metres (paper §V-C6)")
    sigma_pose: float = Field(0.0, ge=0, le=1, description="optional per-frame body pose noise, radians")
    seed: int = Field(0, ge=0)


def describe(s: dict[str, Any]) -> str:
    return f"{s['copies']} copies of {s['frames_per_copy']} frames, sigma {s['sigma_transl_m']} m"


STAGE = Stage(
    "perturb", flow="onboard", inputs=("smplx_fit",), params=PerturbParams, describe=describe,
    outputs=(smplx_table.TABLE,),
    description="training augmentation: per-frame position (and pose) noise, seeded")


def run(inputs: dict[str, Path], out: Path, params: PerturbParams, progress: Progress) -> dict[str, Any]:
    keys, blocks = smplx_table.read(inputs["smplx_fit"] / smplx_table.TABLE)
    train = keys["split"] == "train"
    n = int(train.sum())
    progress.start("perturbing training parameters", max(params.copies, 1))
    rng = np.random.default_rng(params.seed)
    rows: dict[str, list[np.ndarray]] = {k: [] for k in (*keys, "copy")}
    out_blocks: dict[str, list[np.ndarray]] = {k: [] for k in smplx_table.BLOCKS}
    for copy in range(params.copies):
        for k, v in keys.items():
            rows[k].append(v[train])
        rows["copy"].append(np.full(n, copy, np.int32))
        for name, arr in blocks.items():
            arr = arr[train].copy()
            if name == "transl":
                arr += rng.normal(0.0, params.sigma_transl, arr.shape).astype(np.float32)
            elif name == "body_pose" and params.sigma_pose > 0:
                arr += rng.normal(0.0, params.sigma_pose, arr.shape).astype(np.float32)
            out_blocks[name].append(arr)
        progress.advance()
    cat_keys = {k: np.concatenate(v) if v else np.zeros(0) for k, v in rows.items()}
    cat_blocks = {k: np.concatenate(v) if v else np.zeros((0, w), np.float32)
                  for (k, v), w in zip(out_blocks.items(), smplx_table.BLOCKS.values(), strict=True)}
    smplx_table.write(out / smplx_table.TABLE, cat_keys, cat_blocks)
    return {"copies": params.copies, "frames_per_copy": n, "sigma_transl_m": params.sigma_transl,
            "sigma_pose_rad": params.sigma_pose, "seed": params.seed}
