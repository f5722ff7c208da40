"""Training clips for the SGDMs, read from the identities' artifacts a batch at a time.

A sample is `video_length` consecutive frames of one training clip, their mesh conditions (the clean fit, or one of
the perturbed copies at `perturbed_share`), and a reference: a random other frame of the same identity, encoded by
the CLIP vision model into tokens. Pretraining reads foreground-on-black frames (matting), finetuning full frames.
Face samples are the real frames warped by render_mesh's per-frame face transform, the face mesh crop, and the face
mask; only runs of frames whose face is visible are used.

The frames go through the frozen encoders once, before the first step, into the store of tasks.encoded (on disk,
reused by later runs on the same frames and weights); batches read those encodings and decode only the mesh
conditions (and the reference frame itself, for a model that reads it at its input). Images and encodings are
held in caches of bounded size, so memory stays flat however many frames and identities there are (a pretrain
with no steps reads no image at all).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from threading import Lock

import cv2
import numpy as np
import pyarrow.parquet as pq
import torch

from core.errors import StageError
from core.hashing import hash_obj
from models import pipeline
from models.codec import device_dtype
from models.face_bank import FaceBank
from tasks.encoded import CHUNK, EncodedStore, entry_key, files_key, weights_key
from tasks.frames import FACE_JAW, HANDS, frame_name, read_meta, read_rgb

CACHE_BYTES = 1 << 30  # decoded training images kept between batches
ENCODED_BYTES = 1 << 30  # the frozen encoders' outputs per frame (latents, reference tokens) kept between batches


class _Images:
    """Decoded images by key, least recently used dropped beyond a byte budget (shared by the identities)."""

    def __init__(self, max_bytes: int = CACHE_BYTES) -> None:
        self.max_bytes, self.bytes = max_bytes, 0
        self.items: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self.lock = Lock()

    def get(self, key: tuple, make) -> np.ndarray:  # noqa: ANN001 - a callable making the image
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        img = make()
        with self.lock:
            self.items[key] = img
            self.bytes += img.nbytes
            while self.bytes > self.max_bytes and len(self.items) > 1:
                _, old = self.items.popitem(last=False)
                self.bytes -= old.nbytes
        return img


def _load(path: Path, size: int, flags: int = cv2.IMREAD_COLOR) -> np.ndarray:
    img = cv2.imread(str(path), flags)
    if img is None:
        raise StageError(f"training data: cannot read {path}")
    img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(img[:, :, ::-1]) if img.ndim == 3 else img


@dataclass
class Identity:
    """One identity's training frames as files; `frame(i)`, `cond(i)`, `perturbed(k, i)`, `mask(i)` read them."""

    name: str
    frame_paths: list[Path]
    cond_paths: list[Path]
    perturbed_paths: list[list[Path]]  # per perturbed copy, one per frame
    runs: list[tuple[int, int]]  # [start, end) of each clip's frames
    res: int
    face: bool = False
    transforms: list[np.ndarray] = field(default_factory=list)  # face samples: frame → crop
    mask_paths: list[Path] = field(default_factory=list)
    hands: list[list[list[float]]] = field(default_factory=list)  # body samples: each frame's hand squares (x, y,
    # size as shares of the side); empty lists throughout for a render_mesh from before hands.parquet
    starts: list[int] = field(default_factory=list)
    cache: _Images = field(default_factory=_Images)

    def __len__(self) -> int:
        return len(self.frame_paths)

    def frame(self, i: int) -> np.ndarray:
        path = self.frame_paths[i]
        return self.cache.get(("frame", path, self.res, self.face), lambda: self._face_crop(i) if self.face
                              else _load(path, self.res))

    def cond(self, i: int) -> np.ndarray:
        path = self.cond_paths[i]
        return self.cache.get(("cond", path, self.res), lambda: _load(path, self.res))

    def perturbed(self, k: int, i: int) -> np.ndarray:
        path = self.perturbed_paths[k][i]
        return self.cache.get(("cond", path, self.res), lambda: _load(path, self.res))

    def mask(self, i: int) -> np.ndarray:
        path = self.mask_paths[i]
        return self.cache.get(("mask", path, self.res), lambda: _load(path, self.res, cv2.IMREAD_GRAYSCALE))

    def _face_crop(self, i: int) -> np.ndarray:
        """The real frame warped by the face transform into the crop the mesh face was rendered at, then sized."""
        mesh_face = cv2.imread(str(self.cond_paths[i]))
        full = cv2.imread(str(self.frame_paths[i]))
        if mesh_face is None or full is None:
            raise StageError(f"training data: cannot read the frame or face crop {self.frame_paths[i]}")
        size = mesh_face.shape[0]  # the transform maps frames into crops of this side
        crop = cv2.warpAffine(full, self.transforms[i], (size, size), flags=cv2.INTER_LINEAR)
        return np.ascontiguousarray(cv2.resize(crop, (self.res, self.res), interpolation=cv2.INTER_AREA)[:, :, ::-1])


def load_identity(name: str, ingest: Path, render: Path, source: Path, *, res: int, video_length: int,
                  face: bool = False, face_res: int = 64, cache: _Images | None = None) -> Identity | None:
    """One identity's training clips, as file lists (nothing decoded); `source` holds the frames (ingest for full
    frames, matting for foreground). None when it has no usable clip (shorter than video_length, or no visible
    face)."""
    meta = read_meta(ingest)
    sub = "frames" if (source / "frames").is_dir() else "foreground"
    visible: dict[tuple[str, int], list[float]] = {}
    if face:
        tab = pq.read_table(render / "faces.parquet").to_pandas()
        visible = {(c, int(f)): list(t) for c, f, v, t in zip(tab["clip"], tab["frame"], tab["visible"],
                                                                tab["transform"], strict=True) if v}
    boxes: dict[tuple[str, int], list[list[float]]] = {}
    if not face and (render / HANDS).is_file():
        tab = pq.read_table(render / HANDS).to_pandas()
        boxes = {(c, int(f)): [list(b) for b in (left, right) if b is not None]
                 for c, f, left, right in zip(tab["clip"], tab["frame"], tab["left"], tab["right"], strict=True)}
    copies = sorted(int(p.name) for p in (render / "perturbed").iterdir()) if (render / "perturbed").is_dir() else []
    ident = Identity(name, [], [], [[] for _ in copies] if not face else [], [], face_res if face else res, face,
                     cache=cache or _Images())
    for clip in meta["clips"]:
        if clip["split"] != "train":
            continue
        name_ = clip["name"]
        run: list[int] = []
        for i in range(clip["frames"]):
            fname, png = frame_name(i), frame_name(i, "png")
            if face:
                if (name_, i) not in visible:
                    if len(run) >= video_length:
                        ident.runs.append((run[0], run[-1] + 1))
                    run = []
                    continue
                ident.transforms.append(np.asarray(visible[(name_, i)], np.float64).reshape(2, 3))
                ident.cond_paths.append(render / "face" / name_ / png)
                ident.mask_paths.append(render / "face_mask" / name_ / png)
            else:
                ident.cond_paths.append(render / "body" / name_ / png)
                ident.hands.append(boxes.get((name_, i), []))
                for k, copy in enumerate(copies):
                    ident.perturbed_paths[k].append(render / "perturbed" / str(copy) / name_ / png)
            ident.frame_paths.append(source / sub / name_ / fname)
            run.append(len(ident.frame_paths) - 1)
        if len(run) >= video_length:
            ident.runs.append((run[0], run[-1] + 1))
    if not ident.runs:
        return None
    missing = next((p for p in (*ident.frame_paths, *ident.cond_paths) if not p.is_file()), None)
    if missing is not None:
        raise StageError(f"training data: cannot read {missing}")
    ident.perturbed_paths = [p for p in ident.perturbed_paths if p]
    ident.starts = [s for a, b in ident.runs for s in range(a, b - video_length + 1)]
    return ident


HAND_CROPS = 4000  # at most this many hand crops, evenly spread, are loaded (with their mesh crops ~220 MB at 96 px)


def hand_crops(ingest: Path, render: Path, most: int = HAND_CROPS) -> tuple[np.ndarray, np.ndarray]:
    """The hand model's training pairs: the hands in view in the identity's training frames (at most `most`, evenly
    spread over them, so a long video costs no more memory), as (N, S, S, 3) uint8 mesh crops (render_mesh's
    `hand/`, S its hand_size) and the frame's crops of the same squares (a left hand mirrored, as its mesh crop is).
    Empty arrays for a render_mesh from before hand crops."""
    from models.squares import crop_transform

    none = np.zeros((0, 0, 0, 3), np.uint8), np.zeros((0, 0, 0, 3), np.uint8)
    meta, table = read_meta(ingest), render / HANDS
    if not table.is_file() or not (render / "hand").is_dir():
        return none
    tab = pq.read_table(table).to_pandas()
    train = {c["name"] for c in meta["clips"] if c["split"] == "train"}
    shown = [(clip, int(i), side, list(box)) for clip, i, *boxes in zip(tab["clip"], tab["frame"], tab["left"],
                                                                        tab["right"], strict=True)
             if clip in train for side, box in zip(("left", "right"), boxes, strict=True) if box is not None]
    if len(shown) > most:
        shown = [shown[k] for k in np.linspace(0, len(shown) - 1, most).round().astype(int)]
    conds: list[np.ndarray] = []
    reals: list[np.ndarray] = []
    frame, frame_path = None, None
    for clip, i, side, box in shown:
        path = render / "hand" / side / clip / frame_name(i, "png")
        if not path.is_file():
            continue
        if frame_path != (clip, i):
            frame, frame_path = read_rgb(ingest / "frames" / clip / frame_name(i)), (clip, i)
        cond = read_rgb(path)
        size = cond.shape[0]
        crop = cv2.warpAffine(frame, crop_transform(box, frame.shape[0], size), (size, size), flags=cv2.INTER_LINEAR)
        conds.append(cond)
        reals.append(crop[:, ::-1] if side == "left" else crop)
    if not conds:
        return none
    return np.stack(conds), np.ascontiguousarray(np.stack(reals))


FACE_CROPS = 3000  # at most this many face crops are loaded, evenly spread (~170 MB with their mesh crops at 96 px)


def face_crops(ingest: Path, render: Path, size: int, most: int = FACE_CROPS) -> tuple[np.ndarray, FaceBank] | None:
    """The face detail model's training data: the visible faces of the identity's training frames (at most `most`,
    evenly spread), as (N, size, size, 3) uint8 jaw-coloured mesh crops (render_mesh's `face_jaw/`) and a bank of
    the frame's crops with their mesh landmarks, both read as the Face SGDM's training data is (`load_identity`).
    None for a render_mesh from before jaw-coloured crops and landmarks, or without a visible training face."""
    tab = pq.read_table(render / "faces.parquet") if (render / FACE_JAW).is_dir() else None
    if tab is None or "landmarks" not in tab.column_names:
        return None
    ident = load_identity("identity", ingest, render, ingest, res=size, video_length=1, face=True, face_res=size,
                          cache=_Images(0))
    if ident is None:
        return None
    landmarks = {(c, int(f)): lm for c, f, lm in zip(tab["clip"].to_pylist(), tab["frame"].to_pylist(),
                                                     tab["landmarks"].to_pylist(), strict=True) if lm is not None}
    picks = np.linspace(0, len(ident) - 1, min(most, len(ident))).round().astype(int)
    faces = [ident.cond_paths[k].relative_to(render / "face") for k in picks]
    keys = [(str(f.parent), int(f.stem)) for f in faces]
    bank = FaceBank(np.stack([ident.frame(int(k)) for k in picks]),
                    np.asarray([landmarks[key] for key in keys], np.float32).reshape(len(keys), -1, 2),
                    np.asarray([c for c, _ in keys]), np.asarray([f for _, f in keys], np.int64))
    return np.stack([_load(render / FACE_JAW / f, size) for f in faces]), bank


def hand_weights(frames: list[list[list[float]]], h: int, w: int, weight: float) -> torch.Tensor:
    """(1, F, h, w) loss weights on an h × w grid (latent cells, or pixels): `weight` inside each frame's hand
    squares (shares of the side, rounded outwards to whole cells so a 20 px hand still owns its latent cells), 1
    elsewhere."""
    out = torch.ones(1, len(frames), h, w)
    for k, boxes in enumerate(frames):
        for x, y, size in boxes:
            out[0, k, int(y * h):int(np.ceil((y + size) * h)), int(x * w):int(np.ceil((x + size) * w))] = weight
    return out


def _tensor(x: np.ndarray) -> torch.Tensor:
    """(F, H, W, 3) uint8 → (3, F, H, W) float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(x)).permute(3, 0, 1, 2).float() / 255


class ClipBatches:
    """`training.Batches` over several identities. The VAE and the CLIP encoder are frozen, so what they make of a
    frame never changes: every frame's latent (the face model's masked-frame latent too) and its tokens as a
    reference are encoded once, up front, into `store` (tasks.encoded: on disk, reused by later runs), and batches
    read them from there (host memory keeps the chunks read last, up to `encoded_bytes`)."""

    def __init__(self, identities: list[Identity], vae, encoder, video_length: int, perturbed_share: float,
                 store: Path, face: bool = False, encoded_bytes: int = ENCODED_BYTES, hand_weight: float = 1.0,
                 reference_frames: bool = False) -> None:
        if not identities:
            raise StageError("no training clips: every identity's training frames are fewer than video_length"
                             + (" or show no face" if face else ""))
        self.ids, self.vae, self.encoder = identities, vae, encoder
        self.f, self.share, self.face = video_length, perturbed_share, face
        # the body model's loss weight inside the hands' squares (1: none); the face model has no hands to weigh
        self.hand_weight = 1.0 if face else hand_weight
        self.reference_frames = reference_frames  # batches carry the reference frame (B, 3, H, W) besides its tokens
        self.store = EncodedStore(store)
        self.chunks = _Images(encoded_bytes)
        self.keys: dict[tuple[str, str], str] | None = None  # (identity, kind) → its entry in the store

    def _kinds(self) -> tuple[str, ...]:
        return ("latent", "tokens", "masked") if self.face else ("latent", "tokens")

    def _content(self, ident: Identity) -> dict:
        """What the identity's encodings are made from, as hashes (keyed once, for all its kinds)."""
        content = {"frames": files_key(ident.frame_paths), "res": ident.res, "face": self.face}
        if self.face:  # face frames are crops: the transforms and the crop side (the mesh face's) make them; masks
            content |= {"crops": files_key(ident.cond_paths), "masks": files_key(ident.mask_paths),
                        "transforms": hash_obj([t.tolist() for t in ident.transforms])}
        return content

    def hand_frames(self) -> int:
        """Training frames with at least one hand square: what a hand weight acts on (none for a render_mesh from
        before hands.parquet)."""
        return sum(bool(h) for i in self.ids for h in i.hands)

    def encodings(self) -> int:
        """How many frame encodings the identities need (a frame counts once per kind)."""
        return sum(len(i) for i in self.ids) * len(self._kinds())

    def encode(self, advance: Callable[[int], None] | None = None) -> int:
        """Make sure every encoding is in the store; returns how many were made now (0 when an earlier run left
        them all). The first batch calls it; a caller calls it first to show progress (`advance(frames)`)."""
        if self.keys is None:
            weights = weights_key(self.vae, self.encoder)
            device = device_dtype(self.vae)[0]
            contents = {i.name: self._content(i) for i in self.ids}
            self.keys = {(i.name, k): entry_key(k, contents[i.name], weights, device, __name__)
                         for i in self.ids for k in self._kinds()}
        made = {"latent": self._latents, "tokens": self._tokens, "masked": self._masked}
        return sum(self.store.fill(self.keys[(i.name, k)], len(i), lambda frames, i=i, k=k: made[k](i, frames),
                                   advance) for i in self.ids for k in self._kinds())

    def _video(self, ident: Identity, frames: range) -> torch.Tensor:
        return _tensor(np.stack([ident.frame(i) for i in frames]))[None]  # (1, 3, F, H, W)

    def _latents(self, ident: Identity, frames: range) -> torch.Tensor:
        """(F, C, h, w)"""
        return pipeline.encode_frames(self.vae, self._video(ident, frames))[0].transpose(0, 1)

    def _masked(self, ident: Identity, frames: range) -> torch.Tensor:
        """The face model's inputs (F, 1 + C, h, w): the mask at latent size, the masked frame's latent."""
        mask = torch.from_numpy(np.stack([ident.mask(i) for i in frames]) > 127).float()[None, None]  # (1,1,F,H,W)
        video = self._video(ident, frames)
        return pipeline.inpaint_inputs(self.vae, mask, video * (1 - mask) + 0.5 * mask)[0].transpose(0, 1)

    def _tokens(self, ident: Identity, frames: range) -> torch.Tensor:
        """The CLIP tokens of the frames as references (F, T, D)."""
        images = np.stack([ident.frame(i) for i in frames])
        return pipeline.encode_reference(self.encoder, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)

    def _read(self, ident: Identity, kind: str, i: int) -> torch.Tensor:
        if self.keys is None:
            self.encode()
        key = self.keys[(ident.name, kind)]
        chunk = self.chunks.get((key, i // CHUNK), lambda: self.store.load_chunk(key, i))
        return chunk[i % CHUNK]

    def batch(self, gen: torch.Generator, size: int) -> dict[str, torch.Tensor]:
        latents, conds, tokens, references, masked, weights = [], [], [], [], [], []
        for _ in range(size):
            ident = self.ids[int(torch.randint(len(self.ids), (1,), generator=gen))]
            s = ident.starts[int(torch.randint(len(ident.starts), (1,), generator=gen))]
            window = range(s, s + self.f)
            # the reference is another moment of the same person, so appearance comes from it, not from the target
            n = len(ident)
            r = int(torch.randint(n - self.f, (1,), generator=gen)) if n > self.f else 0
            r = r + self.f if r >= s else r
            r = min(r, n - 1)
            use_perturbed = bool(ident.perturbed_paths) and float(torch.rand(1, generator=gen)) < self.share
            if use_perturbed:
                k = int(torch.randint(len(ident.perturbed_paths), (1,), generator=gen))
                cond = np.stack([ident.perturbed(k, i) for i in window])
            else:
                cond = np.stack([ident.cond(i) for i in window])
            latents.append(torch.stack([self._read(ident, "latent", i) for i in window], dim=1))
            conds.append(_tensor(cond))
            tokens.append(self._read(ident, "tokens", r))
            if self.reference_frames:
                references.append(_tensor(ident.frame(r)[None])[:, 0])
            if self.hand_weight != 1.0:
                weights.append(hand_weights([ident.hands[i] if ident.hands else [] for i in window],
                                            *latents[-1].shape[-2:], self.hand_weight))
            if self.face:
                masked.append(torch.stack([self._read(ident, "masked", i) for i in window], dim=1))
        out = {"latents": torch.stack(latents), "cond": torch.stack(conds), "tokens": torch.stack(tokens)}
        if references:
            out["reference"] = torch.stack(references)
        if weights:
            out["weight"] = torch.stack(weights)  # (B, 1, F, h, w)
        if self.face:
            extra = torch.stack(masked)
            out["mask"], out["masked"] = extra[:, :1], extra[:, 1:]
        return out
