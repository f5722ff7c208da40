"""The frozen encoders' outputs for an identity's training frames, computed once and kept on disk.

The VAE and the CLIP image encoder never train, so what they make of a frame depends on the frame, their weights,
their dtype and the kind of device alone. A training run encodes all of an identity's frames up front, a chunk at a
time (on a GPU that is a minute once instead of encoder passes at every step), and writes them under a name that is
the hash of all of that, like an artifact's cache key. Every later run on the same frames and weights (the finetune
after a pretrain, a new finetune version, a resume after a kill) reads them instead. A change of any input is a new
name, so nothing kept is ever stale; a kill loses at most the chunk being encoded; the directory can be deleted at
any time (it is the workspace's `.anchor/encoded/`, outside DVC: derived data, remade on demand).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from core.artifacts import find_artifact, read_manifest
from core.hashing import hash_obj, sha256_file
from core.stage import code_hash_of

CHUNK = 64  # frames per file: what a kill can lose, and how many frames go through an encoder at once at most


def files_key(paths: Sequence[Path]) -> str:
    """Content hash of the files, in order. A file inside an artifact counts as its artifact's output hash and its
    place in it (the runner verified that hash before the stage began), so no image is read; any other file is
    hashed by its bytes."""
    h = hashlib.sha256()
    hashes: dict[Path, str | None] = {}  # read once per call: an artifact rebuilt in place has a new hash
    for path in paths:
        art = find_artifact(path, Path(path.anchor))
        if art is not None and art not in hashes:
            hashes[art] = (read_manifest(art) or {}).get("output_hash")
        known = hashes.get(art) if art is not None else None
        part = f"{known}/{path.resolve().relative_to(art).as_posix()}" if known else sha256_file(path)
        h.update(part.encode() + b"\n")
    return h.hexdigest()


def weights_key(*models: torch.nn.Module) -> str:
    """Content hash of the models' weights as loaded (dtype included): seconds on SD-sized encoders, once a run."""
    h = hashlib.sha256()
    for model in models:
        for name, tensor in sorted(model.state_dict().items()):
            t = tensor.detach().contiguous().cpu()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim ones too
    return h.hexdigest()


def entry_key(kind: str, content: dict, weights: str, device: torch.device, code_module: str) -> str:
    """The name of one identity's encoded `kind`: its inputs' content, the weights, the device kind, and the code
    of `code_module` (the one that encodes) with all it imports."""
    return hash_obj({"kind": kind, "content": content, "weights": weights, "device": device.type,
                     "chunk": CHUNK, "code": code_hash_of(code_module, __name__)})


class EncodedStore:
    """Encoded frames on disk: `root/<entry key>/<first frame>.safetensors`, one tensor (frames, ...) per chunk."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def fill(self, key: str, n: int, encode: Callable[[range], torch.Tensor],
             advance: Callable[[int], None] | None = None) -> int:
        """Encode the chunks of frames 0..n-1 not yet on disk; returns how many frames were encoded. Each chunk is
        written beside and renamed into place, so a chunk file is always whole."""
        folder = self.root / key
        folder.mkdir(parents=True, exist_ok=True)
        done = 0
        for start in range(0, n, CHUNK):
            path = self.chunk_path(key, start)
            frames = range(start, min(start + CHUNK, n))
            if not path.is_file():
                with torch.no_grad():
                    values = encode(frames).detach().contiguous().cpu()
                tmp = path.with_name(f".{path.name}.{os.getpid()}")
                save_file({"values": values}, str(tmp))
                os.replace(tmp, path)
                done += len(frames)
            if advance:
                advance(len(frames))
        return done

    def chunk_path(self, key: str, frame: int) -> Path:
        return self.root / key / f"{frame - frame % CHUNK:06d}.safetensors"

    def load_chunk(self, key: str, frame: int) -> torch.Tensor:
        """The chunk holding `frame`, as (frames, ...)."""
        return load_file(str(self.chunk_path(key, frame)))["values"]
