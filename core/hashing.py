"""Content hashes: the cache keys and manifests rest on these, never on paths or timestamps."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
# Written by DVC beside the files it tracks one by one (a report's outs sit inside its artifact), never by a stage.
NOT_CONTENT = frozenset({MANIFEST, ".gitignore"})
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def hash_obj(obj: Any) -> str:
    """Hash of a JSON-able value, independent of key order."""
    return sha256_bytes(canonical_json(obj).encode())


def artifact_files(root: Path) -> list[Path]:
    """Files that make up an artifact's content: everything but its manifest (and DVC's .gitignore), stably ordered."""
    files = [p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() not in NOT_CONTENT]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def hash_tree(root: Path, files: Iterable[Path] | None = None) -> str:
    """Hash of a directory's files: relative names and contents, so a rename or one flipped byte changes it."""
    h = hashlib.sha256()
    for p in files if files is not None else artifact_files(root):
        rel = p.relative_to(root).as_posix()
        h.update(rel.encode() + b"\0" + sha256_file(p).encode() + b"\n")
    return h.hexdigest()
