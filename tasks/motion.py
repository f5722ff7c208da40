"""Motion import for rendering: any supported motion file, or another video's fit, retargeted onto an identity.

Files are read by models.motion_io (AMASS/BEAT2 .npz, TalkSHOW .npy, SHOW .pkl through a restricted unpickler, the
project's own fit); a video goes through ingest → keypoints → smplx_fit first (flows.motion). Everything is
resampled to 30 fps and retargeted (models.retarget) onto the identity's shape, camera and framing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from models import body
from models.motion_io import FIT_FPS, Motion, read_motion, resample
from models.retarget import retarget
from tasks import smplx_table
from tasks.frames import read_meta

VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mts", ".mpg", ".mpeg", ".wmv", ".flv"}


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES


def fit_as_motion(fit_dir: Path, ingest_dir: Path) -> Motion:
    """A video's fit as one motion, its clips in time order (the ingest meta's order, not alphabetical)."""
    keys, blocks = smplx_table.read(fit_dir / smplx_table.TABLE)
    order = {c["name"]: c.get("start", i) for i, c in enumerate(read_meta(ingest_dir)["clips"])}
    rows = sorted(range(len(keys["frame"])), key=lambda i: (order.get(str(keys["clip"][i]), 0), keys["frame"][i]))
    b = {k: v[rows] for k, v in blocks.items()}
    betas = np.asarray(smplx_table.read_identity(fit_dir / smplx_table.IDENTITY)["betas"], np.float32)
    return Motion(fps=FIT_FPS, global_orient=b["global_orient"], transl=b["transl"], body_pose=b["body_pose"],
                  left_hand_pose=b["left_hand_pose"], right_hand_pose=b["right_hand_pose"], jaw_pose=b["jaw_pose"],
                  leye_pose=b["leye_pose"], reye_pose=b["reye_pose"], expression=b["expression"], betas=betas,
                  source="video")


def reference(fit_dir: Path, body_model: Path) -> dict[str, np.ndarray]:
    """The identity's rest pelvis and its fitted root orientations and pelvis positions (training clips)."""
    keys, blocks = smplx_table.read(fit_dir / smplx_table.TABLE)
    betas = np.asarray(smplx_table.read_identity(fit_dir / smplx_table.IDENTITY)["betas"], np.float32)
    model = body.load(body_model)
    with torch.no_grad():
        rest = model(betas=torch.from_numpy(betas)[None]).joints[0, body.PELVIS].numpy().astype(np.float64)
    train = keys["split"] == "train" if "split" in keys else np.ones(len(keys["frame"]), bool)
    if not train.any():
        train[:] = True
    return {"pelvis_rest": rest, "ref_orient": blocks["global_orient"][train],
            "ref_pelvis": blocks["transl"][train].astype(np.float64) + rest}


def prepare(motion: Motion, ref: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Resample to 30 fps and retarget; returns parameter blocks and a short description."""
    src_fps, src_frames = motion.fps, motion.frames
    motion = resample(motion, FIT_FPS)
    blocks = retarget(motion, pelvis_rest=ref["pelvis_rest"], ref_orient=ref["ref_orient"],
                      ref_pelvis=ref["ref_pelvis"])
    info = {"source_format": motion.source, "source_fps": src_fps, "source_frames": src_frames,
            "frames": motion.frames, "fps": FIT_FPS, "seconds": round(motion.frames / FIT_FPS, 3)}
    return blocks, info


def load_file(path: Path, clip: str | None = None) -> Motion:
    return read_motion(path, clip=clip)


def write(path: Path, blocks: dict[str, np.ndarray]) -> None:
    t = len(blocks["transl"])
    smplx_table.write(path, {"clip": np.array(["motion"] * t), "split": np.array(["motion"] * t),
                             "frame": np.arange(t)}, blocks)
