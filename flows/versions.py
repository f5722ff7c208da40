"""Model versions of an identity (v1, v2, …) and which renders are stale.

A version is one finetune output (its content hash). Each new one is numbered in versions.yaml (tracked in git
beside dvc.lock), recorded in the run ledger, and, when the workspace is a git repository, committed with dvc.lock
and tagged `<identity>-v<N>`, so `git checkout <identity>-v1 -- dvc.lock && anchor pull <identity>` brings it back.
A render is stale when the identity's current model or the current render params differ from what made it.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import yaml

from core import ledger
from core.artifacts import code_version, host, now_iso, read_manifest, write_text
from core.hashing import sha256_file
from core.workspace import Workspace, render_subject, split_render_subject
from flows.dvc_store import source_target
from tasks import registry
from tasks.stages import report

VERSIONS_FILE = "versions.yaml"
MODEL_STAGE = "finetune"  # each distinct output of this stage is a version of the identity's model
# a render's stages whose params shape its video and so can make it stale (the motion stage has none: its content
# names the render; a stage that only scores the video, such as follow, does not make the video stale)
RENDER_STAGES = tuple(s for s in registry.in_flow("render") if registry.get(s).params is not None
                      and (s == "assemble" or s in registry.upstream("assemble")))
SUPERSEDED = "superseded.json"  # in a render's folder: the render that replaced it
PER_RUN = {"seed": None, "enabled": "face"}  # `anchor render --seed/--no-face` choices (for every stage / that one
# stage), not params that went stale


def versions(ws: Workspace) -> dict[str, list[dict[str, Any]]]:
    path = ws.root / VERSIONS_FILE
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def current_model(ws: Workspace, identity: str) -> str | None:
    return (read_manifest(registry.artifact_dir(ws, MODEL_STAGE, identity)) or {}).get("output_hash")


def version_of(table: dict[str, list[dict[str, Any]]], identity: str, model_hash: str | None) -> int | None:
    return next((v["version"] for v in table.get(identity, []) if v["finetune"] == model_hash), None)


def record_if_model(ws: Workspace, stage: str, identity: str, run_id: str, commit: bool = True
                    ) -> dict[str, Any] | None:
    """A version for the identity's model when `stage` made it (however it ran); None for any other stage."""
    return record_version(ws, identity, run_id, commit) if stage == MODEL_STAGE else None


def record_version(ws: Workspace, identity: str, run_id: str, commit: bool = True) -> dict[str, Any]:
    """Number the identity's current finetune output, if new; commit and tag it in git when there is a repository
    and `commit` (under `dvc repro`, dvc.lock is written after the stage: the user commits and tags then)."""
    model = current_model(ws, identity)
    if model is None:
        raise ValueError(f"{identity!r} has no finetune to version")
    with ws.records_lock():
        return _record(ws, identity, run_id, model, commit)


def _record(ws: Workspace, identity: str, run_id: str, model: str, commit: bool) -> dict[str, Any]:
    table = versions(ws)
    known = next((v for v in table.get(identity, []) if v["finetune"] == model), None)
    if known is not None:
        return {**known, "new": False}
    entry = {"version": len(table.get(identity, [])) + 1, "finetune": model, "made_at": now_iso(), "run_id": run_id}
    table.setdefault(identity, []).append(entry)
    write_text(ws.root / VERSIONS_FILE,
               "# Model versions per identity: vN = the Nth distinct finetune output (content hash).\n"
               + yaml.safe_dump(table, sort_keys=True))
    ledger.append(ws.ledger_dir, {"run_id": run_id, "flow": "finetune", "stage": "version", "identity": identity,
                                  "status": f"v{entry['version']}", "cache_hit": False, "output_hash": model,
                                  "code_version": code_version(), "started_at": entry["made_at"], "host": host()})
    tag = tag_version(ws, identity, entry["version"]) if commit else None
    return {**entry, "new": True, "git_tag": tag}


def tag_version(ws: Workspace, identity: str, number: int) -> str | None:
    """Commit the pipeline's records and tag them `<identity>-v<number>`; None without git."""
    with ws.records_lock():
        return _git_commit_and_tag(ws, identity, number)


def _git(ws: Workspace, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=ws.root, capture_output=True, text=True)


def _git_commit_and_tag(ws: Workspace, identity: str, number: int) -> str | None:
    """Commit only the pipeline's records (never the user's other changes) and tag them; None without git."""
    if _git(ws, "rev-parse", "--show-toplevel").returncode:
        return None
    paths = [p for p in ("dvc.lock", "dvc.yaml", "params.yaml", VERSIONS_FILE, "identities.yaml",
                         source_target(ws, identity)) if (ws.root / p).exists()]
    paths += [ws.rel(p) for p in ws.data.rglob(".gitignore")]
    who = [] if _git(ws, "config", "user.email").stdout.strip() else ["-c", "user.name=anchor",
                                                                       "-c", "user.email=anchor@localhost"]
    _git(ws, "add", "--", *paths)
    commit = _git(ws, *who, "commit", "-q", "--allow-empty", "-m", f"{identity} v{number}", "--", *paths)
    if commit.returncode:
        raise RuntimeError(f"git commit of {identity} v{number} failed: {commit.stderr.strip()}")
    tag = f"{identity}-v{number}"
    made = _git(ws, "tag", tag)  # an existing tag is never moved
    return tag if made.returncode == 0 else None


def renders(ws: Workspace, identity: str) -> list[dict[str, Any]]:
    """Every render of the identity with why it is stale (older model version, older params), if it is."""
    root = ws.data / "renders" / identity
    model = current_model(ws, identity)
    params = registry.params(ws)
    table = versions(ws)
    out = []
    for motion_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) \
            if root.is_dir() else []:
        subject = render_subject(identity, motion_dir.name)
        manifests = {s: read_manifest(registry.artifact_dir(ws, s, subject)) for s in RENDER_STAGES}
        body = manifests["render_body"]
        if body is None:
            continue
        made_by = next((i["output_hash"] for i in body.get("inputs", []) if i.get("stage") == "finetune"), None)
        reasons = []
        if made_by != model:
            was = version_of(table, identity, made_by)
            reasons.append(f"made by model {'v' + str(was) if was else (made_by or '?')[:12]}, now "
                           f"v{version_of(table, identity, model) or '?'}")
        for stage, m in manifests.items():
            if m is None:
                reasons.append(f"{stage} missing")
            elif (_settled(stage, m.get("params") or {})
                  != _settled(stage, params.section(stage).model_dump(mode="json"))):
                reasons.append(f"{stage} params changed")
        assemble = manifests["assemble"] or {}
        motion = (read_manifest(registry.artifact_dir(ws, "motion", subject)) or {}).get("summary") or {}
        if motion.get("kind") == "speech":
            reasons += speech_reasons(ws, identity, motion)
        superseded = superseded_by(motion_dir)
        out.append({"identity": identity, "motion_key": motion_dir.name, "subject": subject,
                    "model_version": version_of(table, identity, made_by),
                    "stale": bool(reasons) and superseded is None, "why": reasons,
                    "finished_at": assemble.get("finished_at") or body.get("finished_at"), "motion": motion}
                   | ({"superseded_by": superseded} if superseded else {}))
    return out


def speech_reasons(ws: Workspace, identity: str, motion: dict[str, Any]) -> list[str]:
    """Why a speech render is stale beyond the model and params: a new speech model, or its audio file changed."""
    out = []
    now = (read_manifest(registry.artifact_dir(ws, "speech", identity)) or {}).get("output_hash")
    if motion.get("speech_model") != now:
        out.append(f"speech model {(motion.get('speech_model') or '?')[:12]}, now {(now or 'none')[:12]}")
    source = Path(motion.get("audio_source") or "")
    if source.is_file() and sha256_file(source) != motion.get("audio_sha256"):
        out.append(f"audio {source.name} changed")
    return out


def superseded_by(render_dir: Path) -> str | None:
    """The render that re-made this one under another motion key (a speech render whose motion was re-made)."""
    path = render_dir / SUPERSEDED
    return json.loads(path.read_text())["subject"] if path.is_file() else None


def mark_superseded(ws: Workspace, old: str, new: str) -> None:
    identity, key = split_render_subject(old)  # type: ignore[misc]
    write_text(ws.data / "renders" / identity / key / SUPERSEDED,
               json.dumps({"subject": new, "at": now_iso()}, indent=2) + "\n")


def _settled(stage: str, values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if k not in PER_RUN or PER_RUN[k] not in (None, stage)}


def status(ws: Workspace, identity: str | None = None) -> list[dict[str, Any]]:
    names = [identity] if identity else ws.identities()
    runs = ledger.read(ws.ledger_dir)
    table = versions(ws)
    out = []
    for name in names:
        rows = runs[(runs["identity"] == name) | runs["identity"].str.startswith(name + "/")]
        last = rows.iloc[-1] if len(rows) else None
        model = current_model(ws, name)
        out.append({
            "identity": name,
            "onboarded": (read_manifest(registry.artifact_dir(ws, "render_mesh", name)) is not None),
            "versions": table.get(name, []),
            "current_version": version_of(table, name, model),
            "current_model": model,
            "last_run": None if last is None else {"flow": last["flow"], "stage": last["stage"],
                                                   "status": last["status"], "at": last["started_at"]},
            "renders": renders(ws, name),
            "report": str(registry.artifact_dir(ws, "report", name) / report.HTML)
            if read_manifest(registry.artifact_dir(ws, "report", name)) else None,
        })
    return out
