"""Artifacts: one directory per (stage, owner), written atomically, described by manifest.json.

The stage contract they follow is in docs/architecture.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

from core.hashing import MANIFEST, hash_tree
from core.stage import PROJECT_PACKAGES

TMP_TAG = ".tmp-"
OLD_TAG = ".old-"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Build an artifact in a hidden sibling directory and move it into place only when complete.

    A crash leaves at most a hidden temporary directory (swept by `sweep_partials`), never a half artifact.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}{TMP_TAG}{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.parent / f".{target.name}{OLD_TAG}{uuid.uuid4().hex[:12]}"
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sweep_partials(parent: Path, name: str) -> list[Path]:
    """Remove what an interrupted `atomic_dir` left for artifact `name`; restore a displaced complete one."""
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    target = parent / name
    for p in sorted(parent.glob(f".{name}{OLD_TAG}*")):
        if not target.exists() and (p / MANIFEST).is_file():
            p.rename(target)  # killed between the two renames: the previous artifact is still whole
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    for p in parent.glob(f".{name}{TMP_TAG}*"):
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def write_text(path: Path, text: str) -> None:
    """Written beside the target and renamed over it, so a reader never sees half a file."""
    tmp = path.with_name(path.name + f".{os.getpid()}-{threading.get_ident()}.tmp")  # unique per writer thread
    tmp.write_text(text)
    tmp.replace(path)


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_manifest(artifact: Path) -> dict[str, Any] | None:
    try:
        return json.loads((artifact / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def verify(artifact: Path, expected_hash: str | None = None) -> bool:
    """True when the artifact exists, has a manifest, and its files hash to what the manifest (and caller) say."""
    manifest = read_manifest(artifact)
    if manifest is None:
        return False
    recorded = manifest.get("output_hash")
    if expected_hash is not None and recorded != expected_hash:
        return False
    return recorded == hash_tree(artifact)


def find_artifact(path: Path, stop: Path) -> Path | None:
    """The artifact directory holding `path` (the nearest ancestor with a manifest), not looking above `stop`."""
    path = path.resolve()
    stop = stop.resolve()
    for candidate in (path, *path.parents):
        if (candidate / MANIFEST).is_file():
            return candidate
        if candidate == stop:
            break
    return None


# What "the code" is when a run asks whether it had uncommitted changes: the project's packages and the files that
# decide what they compute. The workspace's records (dvc.lock, identities.yaml, versions.yaml), which the pipeline
# itself updates, are not code.
CODE_CONFIG = ("pyproject.toml", "constraints.txt", "params.yaml")
CODE_FILES = (*PROJECT_PACKAGES, *CODE_CONFIG)


CODE_ROOT = Path(__file__).resolve().parent.parent


@cache
def code_version(files: tuple[str, ...] = CODE_FILES, root: Path = CODE_ROOT) -> dict[str, Any]:
    """Git commit of the pipeline code and whether `files` (paths relative to the code's checkout `root`) had
    uncommitted changes there, a new file not yet committed included."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--", *files], cwd=root,
                                capture_output=True, text=True, timeout=10, check=True).stdout
        return {"commit": commit, "dirty": bool(status.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}


def host() -> str:
    return socket.gethostname()
