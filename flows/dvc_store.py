"""DVC's side of a flow run: record what the flow produced in dvc.lock, and move identities to and from a remote.

After `commit_identity`, `dvc status` shows the identity's stages up to date and `dvc repro` does nothing: the
lock file holds the same deps, params and outs that `dvc repro` would have produced. DVC runs as its own
process in the workspace (its API assumes the working directory is the repository). A flow that made nothing new
touches no DVC file: what was last recorded (each target's output hash, and the bytes of the files DVC wrote) is
remembered in the state directory, and a target is recorded again only when one of them differs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from core.artifacts import read_manifest, write_json
from core.errors import AnchorError
from core.hashing import sha256_file
from core.workspace import Workspace
from tasks import registry
from tasks.runner import resolve_path

REMOTE = "anchor"
SOURCE = "source"


def dvc(ws: Workspace, *args: str) -> str:
    if not (ws.root / ".dvc").is_dir():
        raise AnchorError(f"{ws.root} is not a DVC workspace; create one with `anchor init DIR`")
    with ws.records_lock():  # one DVC command at a time per workspace: they all rewrite dvc.lock
        proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=ws.root, capture_output=True, text=True)
    if proc.returncode:
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        errors = [ln.removeprefix("ERROR: ") for ln in lines if ln.startswith("ERROR")]  # not DVC's "support" line
        said = errors[-1] if errors else lines[-1] if lines else f"exit code {proc.returncode}"
        raise AnchorError(f"dvc {args[0]} failed: {said}")
    return proc.stdout


def source_target(ws: Workspace, identity: str) -> str:
    return ws.rel(registry.artifact_dir(ws, SOURCE, identity)) + ".dvc"


def stage_targets(ws: Workspace, identity: str, locked_only: bool = False) -> list[str]:
    names = [f"{name}@{identity}" for name, spec in registry.STAGES.items() if spec.in_dvc and not spec.shared]
    if locked_only:
        lock = ws.root / "dvc.lock"
        locked = set((yaml.safe_load(lock.read_text()) or {}).get("stages", {})) if lock.is_file() else set()
        return [n for n in names if n in locked]
    return [n for n in names if registry.artifact_dir(ws, n.split("@")[0], identity).is_dir()]


def _recorded_path(ws: Workspace) -> Path:
    return ws.state / "dvc-recorded.json"


def _file_hash(path: Path) -> str | None:
    return sha256_file(path) if path.is_file() else None


def _recorded(ws: Workspace) -> dict[str, Any]:
    try:
        return json.loads(_recorded_path(ws).read_text())
    except (OSError, ValueError):
        return {}


def _output_hash(ws: Workspace, stage: str, owner: str) -> str | None:
    return (read_manifest(registry.artifact_dir(ws, stage, owner)) or {}).get("output_hash")


def _record(ws: Workspace, outputs: dict[str, str | None], files: list[Path]) -> None:
    table = _recorded(ws)
    table.setdefault("outputs", {}).update(outputs)
    table.setdefault("files", {}).update({ws.rel(f): _file_hash(f) for f in files})
    write_json(_recorded_path(ws), table)


def _unchanged(ws: Workspace, outputs: dict[str, str | None], files: list[Path]) -> bool:
    """True when every target was recorded with the same output hash and DVC's files are as they were left."""
    table = _recorded(ws)
    return (all(table.get("outputs", {}).get(t) == h and h is not None for t, h in outputs.items())
            and all(table.get("files", {}).get(ws.rel(f)) == _file_hash(f) is not None for f in files))


def commit_identity(ws: Workspace, identity: str, results: dict[str, Any] | None = None) -> list[str]:
    """Track the source with `dvc add` and record the produced stage outputs in dvc.lock; nothing when all of it
    is recorded already. Returns the targets written."""
    committed = []
    with ws.records_lock():
        source_dir = registry.artifact_dir(ws, SOURCE, identity)
        dot_dvc = ws.root / source_target(ws, identity)
        if source_dir.is_dir():
            outputs = {source_target(ws, identity): _output_hash(ws, SOURCE, identity)}
            if not _unchanged(ws, outputs, [dot_dvc]):
                dvc(ws, "add", "-q", ws.rel(source_dir))
                committed.append(source_target(ws, identity))
                _record(ws, outputs, [dot_dvc])
        stages = stage_targets(ws, identity)
        lock = ws.root / "dvc.lock"
        outputs = {t: _output_hash(ws, t.split("@")[0], identity) for t in stages}
        if stages and not _unchanged(ws, outputs, [lock]):
            dvc(ws, "commit", "-f", "-q", *stages)
            committed += stages
            _record(ws, outputs, [lock])
    return committed


def commit_shared(ws: Workspace, stage: str) -> list[str]:
    """Record a shared stage's output (e.g. the pretrained checkpoints) in dvc.lock, unless it is already."""
    from core.workspace import SHARED

    with ws.records_lock():
        lock = ws.root / "dvc.lock"
        outputs = {stage: _output_hash(ws, stage, SHARED)}
        if _unchanged(ws, outputs, [lock]):
            return []
        dvc(ws, "commit", "-f", "-q", stage)
        _record(ws, outputs, [lock])
    return [stage]


def remote_url(ws: Workspace) -> str:
    url = registry.params(ws).storage.remote
    return url if "://" in url else str(resolve_path(ws, url))


def configure_remote(ws: Workspace) -> str:
    """The workspace's DVC remote as params.yaml's storage section names it (in .dvc/config.local)."""
    storage = registry.params(ws).storage
    url = remote_url(ws)
    if "://" not in url:
        Path(url).mkdir(parents=True, exist_ok=True)
    dvc(ws, "remote", "add", "-f", "-d", "--local", REMOTE, url)
    if storage.endpoint_url and url.startswith("s3://"):
        dvc(ws, "remote", "modify", "--local", REMOTE, "endpointurl", storage.endpoint_url)
    return url


def count(output: str) -> int:
    for word in output.split():
        if word.isdigit():
            return int(word)
    return 0


def _tracked(ws: Workspace, identity: str, verb: str) -> list[str]:
    """The identity's source .dvc file and its stages recorded in dvc.lock."""
    targets = [source_target(ws, identity)] if (ws.root / source_target(ws, identity)).is_file() else []
    targets += stage_targets(ws, identity, locked_only=True)
    if not targets:
        raise AnchorError(f"nothing to {verb} for {identity!r}: no .dvc file or dvc.lock entry names it in {ws.root}")
    return targets


def pull(ws: Workspace, identity: str) -> tuple[int, str]:
    """Restore an identity's tracked files from the remote, as dvc.lock and its .dvc file describe them."""
    targets = _tracked(ws, identity, "pull")
    url = configure_remote(ws)
    return count(dvc(ws, "pull", "-f", "-r", REMOTE, *targets)), url
