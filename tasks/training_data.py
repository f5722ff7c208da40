"""Training clips for the SGDMs, read from the identities' artifacts and held in memory at training resolution.

A sample is `video_length` consecutive frames of one training clip, their mesh conditions (the clean fit, or one of
the perturbed copies at `perturbed_share`), and a reference: a random other frame of the same identity, encoded by
the CLIP vision model into tokens. Pretraining reads foreground-on-black frames (matting), finetuning full frames.
Face samples are the real frames warped by render_mesh's per-frame face transform, the face mesh crop, and the face
mask; only runs of frames whose face is visible are used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import torch

from core.errors import StageError
from models import pipeline
from tasks.frames import frame_name, read_meta


def _load(path: Path, size: int, flags: int = cv2.IMREAD_COLOR) -> np.ndarray:
    img = cv2.imread(str(path), flags)
    if img is None:
        raise StageError(f"training data: cannot read {path}")
    img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    return img[:, :, ::-1] if img.ndim == 3 else img


@dataclass
class Identity:
    name: str
    frames: np.ndarray  # (N, H, W, 3) uint8 RGB
    cond: np.ndarray  # (N, H, W, 3)
    perturbed: list[np.ndarray]  # copies of cond
    runs: list[tuple[int, int]]  # [start, end) of each clip's frames in the arrays
    mask: np.ndarray | None = None  # (N, H, W) uint8, face samples only
    starts: list[int] = field(default_factory=list)


def load_identity(name: str, ingest: Path, render: Path, source: Path, *, res: int, video_length: int,
                  face: bool = False, face_res: int = 64) -> Identity | None:
    """One identity's training clips; `source` holds the frames (ingest for full frames, matting for foreground).
    None when it has no usable clip (shorter than video_length, or no visible face)."""
    meta = read_meta(ingest)
    sub = "frames" if (source / "frames").is_dir() else "foreground"
    visible: dict[tuple[str, int], list[float]] = {}
    if face:
        tab = pq.read_table(render / "faces.parquet").to_pandas()
        visible = {(c, int(f)): list(t) for c, f, v, t in zip(tab["clip"], tab["frame"], tab["visible"],
                                                                tab["transform"], strict=True) if v}
    copies = sorted(int(p.name) for p in (render / "perturbed").iterdir()) if (render / "perturbed").is_dir() else []
    frames, conds, masks, runs = [], [], [], []
    perturbed: list[list[np.ndarray]] = [[] for _ in copies]
    for clip in meta["clips"]:
        if clip["split"] != "train":
            continue
        name_ = clip["name"]
        run: list[int] = []
        for i in range(clip["frames"]):
            fname = frame_name(i)
            png = frame_name(i, "png")
            if face:
                if (name_, i) not in visible:
                    if len(run) >= video_length:
                        runs.append((run[0], run[-1] + 1))
                    run = []
                    continue
                m = np.asarray(visible[(name_, i)], np.float64).reshape(2, 3)
                mesh_face = cv2.imread(str(render / "face" / name_ / png))
                full = cv2.imread(str(source / sub / name_ / fname))
                if mesh_face is None or full is None:
                    raise StageError(f"training data: cannot read the frame or face crop {name_}/{png}")
                size = mesh_face.shape[0]  # the transform maps frames into crops of this side
                crop = cv2.warpAffine(full, m, (size, size), flags=cv2.INTER_LINEAR)
                frames.append(cv2.resize(crop, (face_res, face_res), interpolation=cv2.INTER_AREA)[:, :, ::-1])
                conds.append(cv2.resize(mesh_face, (face_res, face_res), interpolation=cv2.INTER_AREA)[:, :, ::-1])
                masks.append(_load(render / "face_mask" / name_ / png, face_res, cv2.IMREAD_GRAYSCALE))
            else:
                frames.append(_load(source / sub / name_ / fname, res))
                conds.append(_load(render / "body" / name_ / png, res))
                for k, copy in enumerate(copies):
                    perturbed[k].append(_load(render / "perturbed" / str(copy) / name_ / png, res))
            run.append(len(frames) - 1)
        if len(run) >= video_length:
            runs.append((run[0], run[-1] + 1))
    if not runs:
        return None
    ident = Identity(name, np.stack(frames), np.stack(conds), [np.stack(p) for p in perturbed if p] if not face
                     else [], runs, np.stack(masks) if face else None)
    ident.starts = [s for a, b in runs for s in range(a, b - video_length + 1)]
    return ident


def _tensor(x: np.ndarray) -> torch.Tensor:
    """(F, H, W, 3) uint8 → (3, F, H, W) float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(x)).permute(3, 0, 1, 2).float() / 255


class ClipBatches:
    """`training.Batches` over several identities: VAE latents and CLIP tokens computed per batch (both frozen)."""

    def __init__(self, identities: list[Identity], vae, encoder, video_length: int, perturbed_share: float,
                 face: bool = False) -> None:
        if not identities:
            raise StageError("no training clips: every identity's training frames are fewer than video_length"
                             + (" or show no face" if face else ""))
        self.ids, self.vae, self.encoder = identities, vae, encoder
        self.f, self.share, self.face = video_length, perturbed_share, face

    def batch(self, gen: torch.Generator, size: int) -> dict[str, torch.Tensor]:
        frames, conds, refs, masks = [], [], [], []
        for _ in range(size):
            ident = self.ids[int(torch.randint(len(self.ids), (1,), generator=gen))]
            s = ident.starts[int(torch.randint(len(ident.starts), (1,), generator=gen))]
            window = slice(s, s + self.f)
            # the reference is another moment of the same person, so appearance comes from it, not from the target
            n = len(ident.frames)
            r = int(torch.randint(n - self.f, (1,), generator=gen)) if n > self.f else 0
            r = r + self.f if r >= s else r
            r = min(r, n - 1)
            use_perturbed = bool(ident.perturbed) and float(torch.rand(1, generator=gen)) < self.share
            source = ident.perturbed[int(torch.randint(len(ident.perturbed), (1,), generator=gen))] \
                if use_perturbed else ident.cond
            frames.append(_tensor(ident.frames[window]))
            conds.append(_tensor(source[window]))
            refs.append(torch.from_numpy(np.ascontiguousarray(ident.frames[r])).permute(2, 0, 1).float() / 255)
            if self.face and ident.mask is not None:
                masks.append(torch.from_numpy(ident.mask[window] > 127).float()[None])
        video = torch.stack(frames)
        out = {"latents": pipeline.encode_frames(self.vae, video), "cond": torch.stack(conds),
               "tokens": pipeline.encode_reference(self.encoder, torch.stack(refs))}
        if self.face:
            mask = torch.stack(masks)
            extra = pipeline.inpaint_inputs(self.vae, mask, video * (1 - mask) + 0.5 * mask)
            out["mask"], out["masked"] = extra[:, :1], extra[:, 1:]
        return out
