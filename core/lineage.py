"""Lineage: follow manifests from any artifact back to the source video."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.artifacts import find_artifact, read_manifest, verify
from core.errors import InputError
from core.workspace import Workspace


def trace(ws: Workspace, path: Path) -> list[dict[str, Any]]:
    """Steps from the artifact holding `path` to the source, nearest first; each step re-hashed (`verified`)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    start = find_artifact(path, ws.root)
    if start is None:
        raise InputError(f"{path} is not part of an artifact in the workspace {ws.root}")
    steps: list[dict[str, Any]] = []
    queue, seen = [start], set()
    while queue:
        art = queue.pop(0)
        if art in seen:
            continue
        seen.add(art)
        m = read_manifest(art) or {}
        step = {
            "stage": m.get("stage"),
            "identity": m.get("identity"),
            "path": ws.rel(art),
            "output_hash": m.get("output_hash"),
            "verified": verify(art),
            "inputs": m.get("inputs", []),
            "params_section": m.get("params_section"),
            "params": m.get("params"),
            "params_hash": m.get("params_hash"),
            "code_version": m.get("code_version", {}),
            "started_at": m.get("started_at"),
            "finished_at": m.get("finished_at"),
            "host": m.get("host"),
        }
        if m.get("stage") == "source":
            step["source_sha256"] = m.get("summary", {}).get("source_sha256")
            step["source_path"] = next((i.get("path") for i in m.get("inputs", []) if i.get("kind") == "external"),
                                       None)
        steps.append(step)
        for inp in m.get("inputs", []):
            if "stage" in inp:
                queue.append((ws.root / inp["path"]).resolve())
    return steps
