"""Runs one stage for one identity under the stage contract (DESIGN §4), with no orchestrator involved.

Both the Prefect flows and `dvc repro` (through `anchor stage run`) come here, so they produce the same artifacts.
"""

from __future__ import annotations

import importlib
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from core import ledger
from core.artifacts import (
    atomic_dir,
    code_version,
    host,
    now_iso,
    package_versions,
    read_manifest,
    sweep_partials,
    verify,
    write_json,
)
from core.errors import StageError
from core.hashing import MANIFEST, hash_obj, hash_tree, sha256_file
from core.monitor import PeakRSS
from core.params import Section
from core.progress import NullProgress, Progress
from core.registry import StageSpec
from core.workspace import SHARED, Workspace, check_identity_name, split_render_subject
from models.base import BasePaths
from tasks import base_models, body_model, registry


@dataclass
class StageResult:
    stage: str
    identity: str
    path: str  # workspace-relative artifact directory
    output_hash: str
    cache_key: str
    params_hash: str | None
    input_hashes: dict[str, str]
    started_at: str = ""
    duration_s: float = 0.0
    peak_rss_mb: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def module_of(spec: StageSpec) -> Any:
    return importlib.import_module(spec.module)


def _section(ws: Workspace, spec: StageSpec, overrides: dict[str, Any] | None = None) -> Section | None:
    """The stage's params section, with per-run `overrides` (e.g. `anchor render --seed`) validated like the file."""
    if not spec.params:
        return None
    section = ws.params().section(spec.params)
    if overrides:
        try:
            section = type(section).model_validate({**section.model_dump(), **overrides})
        except ValueError as exc:
            raise StageError(f"{spec.params}: invalid override {overrides}: {exc}") from None
    return section


def resolve_path(ws: Workspace, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else ws.root / path


def base_paths(ws: Workspace) -> BasePaths:
    return base_models.resolve(ws.params(), ws.root, ws.state / "base_models")


def body_model_path(ws: Workspace) -> Path:
    return body_model.resolve(ws.params().body_model, ws.root, ws.state / "body_models")


def input_dirs(ws: Workspace, spec: StageSpec, identity: str) -> dict[str, tuple[str, str, Path]]:
    """Upstream artifacts by input key: (stage, owner, directory). A shared stage reads its inputs from every
    identity (keys `stage@identity`); an identity's stage reads shared inputs from data/checkpoints."""
    out: dict[str, tuple[str, str, Path]] = {}
    if spec.shared:
        names = ws.identities()
        if not names:
            raise StageError(f"{spec.name} needs at least one onboarded identity (identities.yaml is empty)")
        for ident in names:
            for name in spec.inputs:
                out[f"{name}@{ident}"] = (name, ident, ws.artifact_dir(name, ident))
        return out
    render = split_render_subject(identity) if spec.render else None
    for name in spec.inputs:
        upstream = registry.get(name)
        if upstream.shared:
            owner = SHARED
        elif render is not None and not upstream.render:
            owner = render[0]  # a render reads its identity's models and fit
        else:
            owner = identity
        out[name] = (name, owner, ws.artifact_dir(name, owner))
    return out


def extra_params_digest(ws: Workspace, spec: StageSpec) -> str:
    params = ws.params()
    return hash_obj({"profile": params.profile, **{n: params.section(n).digest() for n in spec.extra_params}})


def input_hashes(ws: Workspace, spec: StageSpec, identity: str, external: Path | None = None,
                 check: bool = True, overrides: dict[str, Any] | None = None) -> dict[str, str]:
    """Content hashes of everything the stage reads; with `check`, each upstream artifact is re-hashed first."""
    hashes: dict[str, str] = {}
    for key, (name, owner, art) in input_dirs(ws, spec, identity).items():
        manifest = read_manifest(art)
        if manifest is None:
            how = (f"`anchor stage run {name}`" if owner == SHARED else
                   f"`anchor onboard {owner} --video ...` or `anchor stage run {name} {owner}`")
            raise StageError(f"{spec.name} of {identity!r} needs {name}, which is missing ({ws.rel(art)}); "
                             f"run {how}")
        if check and not verify(art):
            raise StageError(f"{spec.name} of {identity!r}: input {ws.rel(art)} does not match its manifest "
                             f"(changed or damaged); rerun {name}")
        hashes[key] = manifest["output_hash"]
    if spec.extra_params:
        hashes["params:" + "+".join(("profile", *spec.extra_params))] = extra_params_digest(ws, spec)
    section = _section(ws, spec, overrides)
    for param in spec.weight_params:
        value = getattr(section, param, None)
        if value:
            path = resolve_path(ws, value)
            if not path.is_file():
                raise StageError(f"{spec.params}.{param}: no such file: {path}")
            hashes[param] = sha256_file(path)
    if spec.body_model:
        hashes["body_model"] = sha256_file(body_model_path(ws))
    if spec.base_models:
        hashes["base_models"] = base_models.fingerprint(base_paths(ws))
    if spec.external_input:
        if external is None:
            raise StageError(f"stage {spec.name} needs --{spec.external_input}")
        hashes[spec.external_input] = hash_tree(external) if external.is_dir() else sha256_file(external)
    return hashes


def cache_key(ws: Workspace, spec: StageSpec, identity: str, hashes: dict[str, str],
              overrides: dict[str, Any] | None = None) -> str:
    section = _section(ws, spec, overrides)
    return spec.cache_key(identity, section.digest() if section else None, hashes)


def check_owner(spec: StageSpec, identity: str) -> str:
    """The artifact owner the stage takes: the shared owner, a render subject, or an identity name."""
    if spec.shared:
        if identity not in (SHARED, ""):
            raise StageError(f"{spec.name} is built from all identities at once; run it without an identity")
        return SHARED
    if spec.render:
        if split_render_subject(identity) is None:
            raise StageError(f"{spec.name} belongs to a render: use `anchor render IDENTITY --motion ...`")
        return identity
    return check_identity_name(identity)


def execute(ws: Workspace, stage: str, identity: str, *, external: Path | None = None,
            progress: Progress | None = None, overrides: dict[str, Any] | None = None) -> StageResult:
    """Compute the artifact of `stage` for `identity` from its current inputs and params, atomically.
    `overrides` replace values of the stage's params section for this run (and its cache key)."""
    spec = registry.get(stage)
    identity = check_owner(spec, identity)
    section = _section(ws, spec, overrides)
    params_hash = section.digest() if section else None
    hashes = input_hashes(ws, spec, identity, external, overrides=overrides)
    key = spec.cache_key(identity, params_hash, hashes)
    target = ws.artifact_dir(stage, identity)
    lock = FileLock(ws.state / "locks" / f"{stage}@{identity.replace('/', '@')}.lock")
    waited = False
    try:
        lock.acquire(timeout=0)
    except Timeout:
        wait = ws.params().storage.lock_wait_s
        (progress or NullProgress()).start(f"{stage}: waiting for another run writing {ws.rel(target)}", 0)
        try:
            lock.acquire(timeout=wait)
        except Timeout:
            raise StageError(f"{stage} of {identity!r}: another run is writing {ws.rel(target)} (waited {wait:g} s, "
                             f"storage.lock_wait_s); run again when it has finished") from None
        waited = True
    try:
        done = read_manifest(target) if waited else None
        if done and done.get("cache_key") == key and verify(target):
            # the other run made exactly this artifact while we waited: take it
            return StageResult(stage, identity, ws.rel(target), done["output_hash"], key, params_hash, hashes,
                               done.get("started_at", ""), done.get("duration_s", 0.0), done.get("peak_rss_mb", 0.0),
                               done.get("summary") or {})
        return _execute_locked(ws, spec, identity, target, section, params_hash, hashes, key, external, progress)
    finally:
        lock.release()


def _execute_locked(ws: Workspace, spec: StageSpec, identity: str, target: Path, section: Section | None,
                    params_hash: str | None, hashes: dict[str, str], key: str, external: Path | None,
                    progress: Progress | None) -> StageResult:
    """One writer per artifact (the caller holds its lock), so sweeping leftovers never hits a live run's work."""
    stage = spec.name
    sweep_partials(target.parent, target.name)

    dirs = input_dirs(ws, spec, identity)
    inputs: dict[str, Path] = {key: art for key, (_, _, art) in dirs.items()}
    for param in spec.weight_params:
        value = getattr(section, param, None)
        if value:
            inputs[param] = resolve_path(ws, value)
    if spec.body_model:
        inputs["body_model"] = body_model_path(ws)
    kwargs: dict[str, Any] = {spec.external_input: external} if spec.external_input else {}
    if spec.extra_params:
        kwargs["settings"] = ws.params()
    if spec.base_models:
        kwargs["base"] = base_paths(ws)
    if getattr(module_of(spec), "READS_LEDGER", False):
        kwargs["ledger_dir"] = ws.ledger_dir  # a report shows how long the runs that made its inputs took
    if getattr(module_of(spec), "RESUMABLE", False):
        # partial work (e.g. training state) survives a kill under the cache key, outside the atomic artifact
        kwargs["scratch"] = ws.state / "scratch" / stage / identity / key[:16]
    module = module_of(spec)

    started, t0 = now_iso(), time.perf_counter()
    with PeakRSS() as mem, atomic_dir(target) as tmp:
        summary = module.run(inputs, tmp, section, progress or NullProgress(), **kwargs) or {}
        output_hash = hash_tree(tmp)
        manifest_inputs: list[dict[str, Any]] = [
            {"stage": name, "identity": owner, "path": ws.rel(art), "output_hash": hashes[key]}
            for key, (name, owner, art) in dirs.items()]
        manifest_inputs += [{"kind": "weights", "param": f"{spec.params}.{p}", "path": str(inputs[p]),
                             "sha256": hashes[p]} for p in spec.weight_params if p in inputs]
        if spec.base_models:
            manifest_inputs.append({"kind": "base_models", "hash": hashes["base_models"],
                                    "paths": {k: str(v) for k, v in vars(kwargs["base"]).items()}})
        if spec.body_model:
            manifest_inputs.append({"kind": "body_model", "path": str(inputs["body_model"]),
                                    "sha256": hashes["body_model"]})
        if external is not None:
            manifest_inputs.append({"kind": "external", "name": spec.external_input, "path": str(external.resolve()),
                                    "sha256": hashes[spec.external_input]})
        write_json(tmp / MANIFEST, {
            "stage": stage,
            "identity": identity,
            "output_hash": output_hash,
            "cache_key": key,
            "inputs": manifest_inputs,
            "params_section": spec.params,
            "params": section.model_dump(mode="json") if section else None,
            "params_hash": params_hash,
            "code_version": {**code_version(), "stage_code_hash": spec.code_hash()},
            "packages": package_versions(),
            "started_at": started,
            "finished_at": now_iso(),
            "duration_s": round(time.perf_counter() - t0, 3),
            "peak_rss_mb": mem.peak_mb,
            "host": host(),
            "pid": os.getpid(),  # which worker process made it (threads share one; Dask workers do not)
            "summary": summary,
        })
    if "scratch" in kwargs:
        shutil.rmtree(kwargs["scratch"], ignore_errors=True)
    return StageResult(stage, identity, ws.rel(target), output_hash, key, params_hash, hashes, started,
                       round(time.perf_counter() - t0, 3), mem.peak_mb, summary)


def record(ws: Workspace, *, run_id: str, flow: str, stage: str, identity: str, status: str, cache_hit: bool,
           result: dict[str, Any] | None = None, started_at: str | None = None, duration_s: float | None = None,
           error: str | None = None) -> None:
    """One ledger row per stage execution, cached or not, failed or not."""
    result = result or {}
    ledger.append(ws.ledger_dir, {
        "run_id": run_id,
        "flow": flow,
        "stage": stage,
        "identity": identity,
        "status": status,
        "cache_hit": cache_hit,
        "input_hashes": result.get("input_hashes") or {},
        "output_hash": result.get("output_hash"),
        "params_hash": result.get("params_hash"),
        "cache_key": result.get("cache_key"),
        "code_version": code_version(),
        "started_at": started_at or result.get("started_at") or now_iso(),
        "duration_s": duration_s if duration_s is not None else result.get("duration_s"),
        "peak_rss_mb": None if cache_hit else result.get("peak_rss_mb"),
        "host": host(),
        "error": error,
    })
