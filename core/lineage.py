"""Lineage: follow manifests from any artifact back to the source video."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.artifacts import find_artifact, read_manifest, verify
from core.errors import InputError
from core.hashing import sha256_file
from core.workspace import Workspace


def trace(ws: Workspace, path: Path) -> list[dict[str, Any]]:
    """Steps from the artifact holding `path` to the source, nearest first; each step re-hashed (`verified`)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    start = find_artifact(path, ws.root)
    steps: list[dict[str, Any]] = []
    if start is None:
        # a copy written outside data/ (`anchor render --out`): found by its content hash among the renders
        digest = sha256_file(path) if path.is_file() else None
        start = _render_with_video(ws, digest) if digest else None
        if start is None:
            raise InputError(f"{path} is not part of an artifact in the workspace {ws.root}, and no render there "
                             f"made a file with its content" + (f" (sha256 {digest[:16]})" if digest else ""))
        steps.append({"stage": "copy", "identity": None, "path": str(path.resolve()), "output_hash": digest,
                      "verified": True, "copy_of": ws.rel(start), "inputs": [], "params_section": None,
                      "params": None, "params_hash": None, "code_version": {}, "started_at": None,
                      "finished_at": None, "host": None})
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
        summary = m.get("summary") or {}
        if m.get("stage") == "motion" and summary.get("speech_model"):
            # a speech render: the audio it spoke and the speech model (an artifact of the identity) that moved it
            step["audio_source"] = summary.get("audio_source")
            step["audio_sha256"] = summary.get("audio_sha256")
            step["speech_model"] = summary["speech_model"]
            model = ws.artifact_dir("speech", str(m.get("identity", "")).split("/")[0], "identities")
            if (read_manifest(model) or {}).get("output_hash") == summary["speech_model"]:
                queue.append(model.resolve())
        steps.append(step)
        for inp in m.get("inputs", []):
            if "stage" in inp:
                queue.append((ws.root / inp["path"]).resolve())
    return steps


def _render_with_video(ws: Workspace, digest: str) -> Path | None:
    """The assemble artifact whose video has this sha256 (recorded in its manifest summary), newest first."""
    hits = [m.parent for m in (ws.data / "renders").glob("*/*/assemble/manifest.json")
            if ((read_manifest(m.parent) or {}).get("summary") or {}).get("video_sha256") == digest]
    return max(hits, key=lambda p: (p / "manifest.json").stat().st_mtime) if hits else None
