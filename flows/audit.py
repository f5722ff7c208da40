"""Audit: every artifact re-hashed against its manifest, and every DVC-tracked output against dvc.lock.

A flipped byte anywhere is reported with the artifact and the stage that made it. The DVC side is `dvc status`
on the identity's .dvc file and locked stages (DVC re-hashes any file whose size or modification time changed).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from core.artifacts import read_manifest
from core.hashing import MANIFEST, hash_tree
from core.workspace import Workspace
from flows.dvc_store import dvc, source_target, stage_targets


@dataclass(frozen=True)
class Finding:
    path: str  # workspace-relative artifact directory or file
    stage: str | None  # the stage that made it
    owner: str | None  # identity, render subject or the shared owner
    check: str  # "manifest" or "dvc.lock"
    problem: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def artifacts(ws: Workspace, identity: str | None = None) -> list[Path]:
    """Every artifact directory under data/ (one with a manifest), or those of `identity` and its renders."""
    found = []
    for m in ws.data.rglob(MANIFEST):
        rel = m.relative_to(ws.data).parts
        if not any(part.startswith(".") for part in rel):  # skip half-written `.name.tmp-…` directories
            found.append(m.parent)
    found.sort()
    if identity is None:
        return found
    out = []
    for art in found:
        owner = (read_manifest(art) or {}).get("identity") or ""
        if owner == identity or owner.startswith(identity + "/"):
            out.append(art)
    return out


def check_manifests(ws: Workspace, arts: list[Path]) -> list[Finding]:
    findings = []
    for art in arts:
        m = read_manifest(art)
        if m is None:
            findings.append(Finding(ws.rel(art), None, None, "manifest", "manifest.json unreadable"))
            continue
        now = hash_tree(art)
        if now != m.get("output_hash"):
            findings.append(Finding(ws.rel(art), m.get("stage"), m.get("identity"), "manifest",
                                    f"content differs from its manifest (recorded {str(m.get('output_hash'))[:12]}, "
                                    f"now {now[:12]})"))
    return findings


def check_dvc(ws: Workspace, identities: list[str]) -> list[Finding]:
    """Outputs that differ from dvc.lock (or from the source's .dvc file): modified, deleted, not in cache."""
    targets = []
    for ident in identities:
        if (ws.root / source_target(ws, ident)).is_file():
            targets.append(source_target(ws, ident))
        targets += stage_targets(ws, ident, locked_only=True)
    if not targets:
        return []
    report = json.loads(dvc(ws, "status", "--json", *targets) or "{}")
    findings = []
    for target, entries in report.items():
        stage, _, owner = target.partition("@")
        if target.endswith(".dvc"):
            stage, owner = "source", Path(target).parent.name
        for entry in entries if isinstance(entries, list) else []:
            if not isinstance(entry, dict):
                continue
            for path, state in (entry.get("changed outs") or {}).items():
                findings.append(Finding(path, stage, owner or None, "dvc.lock",
                                        f"{state} since dvc.lock recorded it"))
    return findings


def audit(ws: Workspace, identity: str | None = None) -> tuple[int, list[Finding]]:
    """(artifacts checked, findings); no findings means every byte is what the records say."""
    arts = artifacts(ws, identity)
    findings = check_manifests(ws, arts)
    if (ws.root / ".dvc").is_dir():
        findings += check_dvc(ws, [identity] if identity else ws.identities())
    return len(arts), findings
