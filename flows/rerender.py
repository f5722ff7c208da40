"""Re-render what went stale, and the Prefect deployment that does it on a schedule.

A render is stale when its identity has a newer model version or the render params changed (flows/versions.py);
a speech render also when the identity's speech model or its audio file changed.
`rerender` redoes exactly those, each from its own motion and with the per-render choices it was made with
(`--seed`, `--no-face`); current renders are left alone. `anchor schedule rerender --cron ...` registers the flow as
a deployment of the workspace (schedules.yaml keeps it beside params.yaml); `anchor serve` serves it with Prefect.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import yaml
from prefect import flow
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron
from prefect.types.entrypoint import EntrypointType

from core.artifacts import read_manifest, write_text
from core.hashing import sha256_file
from core.workspace import Workspace, bound_workspace, render_subject, split_render_subject
from flows.execution import WORKER_TAG, concurrently
from flows.render import render_staged, stage_speech
from flows.stage_task import StageRunner
from flows.versions import mark_superseded, renders
from tasks import registry
from tasks.stages import motion as motion_task

SCHEDULES_FILE = "schedules.yaml"


def _choices(ws: Workspace, subject: str) -> tuple[int | None, bool | None]:
    """The seed and face choice the render was made with, as overrides when they differ from params.yaml."""
    params = registry.params(ws)
    body = (read_manifest(registry.artifact_dir(ws, "render_body", subject)) or {}).get("params") or {}
    face = (read_manifest(registry.artifact_dir(ws, "face", subject)) or {}).get("params") or {}
    seed = body.get("seed")
    enabled = face.get("enabled")
    return (seed if seed is not None and seed != params.render_body.seed else None,
            enabled if enabled is not None and enabled != params.face.enabled else None)


def rerender_one(ws: Workspace, stages: StageRunner, subject: str) -> dict[str, Any]:
    """The render again from its own motion; a speech render's motion is made again first (the speech model or the
    audio changed), so it lands under a new motion key and the old render is marked superseded."""
    seed, face = _choices(ws, subject)
    motion_dir = registry.artifact_dir(ws, "motion", subject)
    motion = (read_manifest(motion_dir) or {}).get("summary") or {}
    if motion.get("kind") != "speech":
        staged = motion_task.restage(motion_dir, ws.state / "motions")
        return render_staged(stages, subject, staged, seed, face)
    identity, _ = split_render_subject(subject)  # type: ignore[misc]
    source = Path(motion.get("audio_source") or "")
    audio = source if source.is_file() else motion_dir / motion_task.AUDIO  # the render's own copy if it moved
    same_audio = audio != source or sha256_file(source) == motion.get("audio_sha256")
    key, staged = stage_speech(ws, identity, audio, motion.get("frames") if same_audio else None, motion.get("seed"))
    new = render_subject(identity, key)
    result = render_staged(stages, new, staged, seed, face)
    if new != subject:
        mark_superseded(ws, subject, new)
    return result


@flow(name="rerender", log_prints=False)
def rerender(workspace: str, identity: str | None = None) -> dict[str, Any]:
    """Every stale render of the workspace (or of one identity) again; the rest untouched."""
    ws = bound_workspace(workspace)
    stages = StageRunner.of_this_run(ws, "rerender")
    listed = [r for name in ([identity] if identity else ws.identities()) for r in renders(ws, name)]
    stale = {r["subject"]: r["why"] for r in listed if r["stale"]}
    done = concurrently(lambda subject: rerender_one(ws, stages, subject), stale)
    failed = {s: f"{type(r).__name__}: {r}" for s, r in done.items() if isinstance(r, BaseException)}
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(stale)} stale renders failed: "
                           + "; ".join(f"{s}: {e}" for s, e in failed.items()))
    return {"run_id": stages.run_id, "redone": {s: stale[s] for s in done},
            "current": sorted(r["subject"] for r in listed if not r["stale"])}


# ------------------------------------------------------------------------------------------------- deployments
def deployment_name(ws: Workspace) -> str:
    """Unique per workspace on a shared Prefect server: the directory name plus a hash of its path."""
    return f"{ws.root.name}-{hashlib.sha256(str(ws.root).encode()).hexdigest()[:8]}"


def schedules(ws: Workspace) -> dict[str, dict[str, Any]]:
    path = ws.root / SCHEDULES_FILE
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def save_schedule(ws: Workspace, cron: str, timezone: str | None, identity: str | None) -> None:
    with ws.records_lock():
        table = schedules(ws)
        table["rerender"] = {"cron": cron, "timezone": timezone, "identity": identity}
        write_text(ws.root / SCHEDULES_FILE,
                   "# Scheduled flows of this workspace (`anchor schedule`); `anchor serve` runs them.\n"
                   + yaml.safe_dump(table, sort_keys=True))


def deployments(ws: Workspace) -> list[RunnerDeployment]:
    """The workspace's scheduled flows as Prefect deployments (imported by module path, so any directory works);
    tagged for the pool's automation when the workspace's jobs go to a work pool (service.pool), so registering a
    schedule again while a pool serves it keeps its runs watched."""
    entry = schedules(ws).get("rerender")
    if entry is None:
        return []
    pooled = [WORKER_TAG] if registry.params(ws).service.pool else []
    return [RunnerDeployment.from_flow(
        rerender, name=deployment_name(ws), schedules=[Cron(entry["cron"], timezone=entry.get("timezone"))],
        concurrency_limit=1, parameters={"workspace": str(ws.root), "identity": entry.get("identity")},
        entrypoint_type=EntrypointType.MODULE_PATH, tags=["anchor", *pooled],
        description=f"re-render the stale renders of {ws.root}")]
