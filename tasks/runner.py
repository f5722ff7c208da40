"""Runs one stage for one owner under the stage contract, with no orchestrator involved.

The contract (docs/architecture.md): a stage is a function of its input artifacts and its params section, writing
one artifact directory atomically with a manifest; its cache key is hash(stage code, params section, input content
hashes). Both the Prefect flows and `dvc repro` (through `anchor stage run`) come here, so they produce the same
artifacts. An artifact already made under the same cache key, and still matching its manifest, is taken as it is.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock, Timeout

from core import contract, ledger
from core.artifacts import (
    CODE_CONFIG,
    atomic_dir,
    code_version,
    host,
    now_iso,
    read_manifest,
    sweep_partials,
    verify,
    write_json,
)
from core.errors import StageError
from core.hashing import MANIFEST, hash_obj, hash_tree, sha256_file
from core.interrupt import Interruptible
from core.monitor import PeakRSS
from core.progress import NullProgress, Progress
from core.section import Section
from core.stage import Stage
from core.workspace import SHARED, Workspace, check_identity_name, split_render_subject
from models.motion_io import HandBasis
from tasks import base_weights, body_file, devices, registry

if TYPE_CHECKING:  # diffusers takes seconds to import; a cached run never needs it
    from models.parts import BasePaths


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
    reused: bool = False  # an artifact made earlier under the same cache key, verified, taken as it is

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_path(ws: Workspace, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else ws.root / path


def base_paths(ws: Workspace) -> BasePaths:
    return base_weights.resolve(registry.params(ws), ws.root, ws.state / "base_models")


def body_model_path(ws: Workspace) -> Path:
    return body_file.resolve(registry.params(ws).body_model, ws.root, ws.state / "body_models")


def hand_basis(ws: Workspace) -> HandBasis | None:
    """The body model's hand PCA, to expand PCA hand poses; faithful only for the user's real SMPL-X."""
    return body_file.hand_basis(body_model_path(ws), real=bool(registry.params(ws).body_model.path))


def input_dirs(ws: Workspace, spec: Stage, identity: str) -> dict[str, tuple[str, str, Path]]:
    """Upstream artifacts by input key: (stage, owner, directory). A shared stage reads its inputs from every
    identity (keys `stage@identity`); an identity's stage reads shared inputs from data/checkpoints."""
    out: dict[str, tuple[str, str, Path]] = {}
    if spec.shared:
        names = ws.identities()
        if not names:
            raise StageError(f"{spec.name} needs at least one onboarded identity (identities.yaml is empty)")
        for ident in names:
            for name in spec.inputs:
                out[f"{name}@{ident}"] = (name, ident, registry.artifact_dir(ws, name, ident))
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
        out[name] = (name, owner, registry.artifact_dir(ws, name, owner))
    return out


def reads_digest(ws: Workspace, spec: Stage) -> str:
    params = registry.params(ws)
    return hash_obj({"profile": params.profile, **{n: params.section(n).digest() for n in spec.reads}})


def input_hashes(ws: Workspace, spec: Stage, identity: str, external: Path | None = None,
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
    if spec.reads:
        hashes["params:" + "+".join(("profile", *spec.reads))] = reads_digest(ws, spec)
    section = registry.section(ws, spec, overrides)
    for param in spec.weights:
        value = getattr(section, param, None)
        if value:
            path = resolve_path(ws, value)
            if not path.is_file():
                raise StageError(f"{spec.section}.{param}: no such file: {path}")
            hashes[param] = sha256_file(path)
    if spec.body_model:
        hashes["body_model"] = sha256_file(body_model_path(ws))
    if spec.base_weights:
        hashes["base_models"] = base_weights.fingerprint(base_paths(ws))
    if spec.external:
        if external is None:
            raise StageError(f"stage {spec.name} needs --{spec.external}")
        hashes[spec.external] = hash_tree(external) if external.is_dir() else sha256_file(external)
    return hashes


def cache_key(ws: Workspace, spec: Stage, identity: str, hashes: dict[str, str],
              overrides: dict[str, Any] | None = None) -> str:
    section = registry.section(ws, spec, overrides)
    return spec.cache_key(identity, section.digest() if section else None, hashes)


def check_owner(spec: Stage, identity: str) -> str:
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
    section = registry.section(ws, spec, overrides)
    params_hash = section.digest() if section else None
    hashes = input_hashes(ws, spec, identity, external, overrides=overrides)
    key = spec.cache_key(identity, params_hash, hashes)
    target = registry.artifact_dir(ws, stage, identity)
    lock = FileLock(ws.state / "locks" / f"{stage}@{identity.replace('/', '@')}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        wait = registry.params(ws).storage.lock_wait_s
        (progress or NullProgress()).start(f"{stage}: waiting for another run writing {ws.rel(target)}", 0)
        try:
            lock.acquire(timeout=wait)
        except Timeout:
            raise StageError(f"{stage} of {identity!r}: another run is writing {ws.rel(target)} (waited {wait:g} s, "
                             f"storage.lock_wait_s); run again when it has finished") from None
    try:
        # made under this very cache key (earlier, by `dvc repro`, or by another run while we waited): take it
        return (_made(ws, spec, identity, target, params_hash, hashes, key)
                or _execute_locked(ws, spec, identity, target, section, params_hash, hashes, key, external, progress))
    finally:
        lock.release()


def _made(ws: Workspace, spec: Stage, owner: str, target: Path, params_hash: str | None, hashes: dict[str, str],
          key: str) -> StageResult | None:
    """The artifact at `target` when it was made under `key` and still matches its manifest."""
    done = read_manifest(target)
    if not (done and done.get("cache_key") == key and verify(target)):
        return None
    return StageResult(spec.name, owner, ws.rel(target), done["output_hash"], key, params_hash, hashes,
                       done.get("started_at", ""), done.get("duration_s", 0.0), done.get("peak_rss_mb", 0.0),
                       done.get("summary") or {}, reused=True)


def cached(ws: Workspace, stage: str, owner: str, external: Path | None = None) -> StageResult | None:
    """The stage's artifact when one made under its current cache key is in place and intact, without running or
    locking anything; None when it would run (or cannot yet: an input is missing)."""
    spec = registry.get(stage)
    owner = check_owner(spec, owner)
    target = registry.artifact_dir(ws, stage, owner)
    if read_manifest(target) is None:
        return None  # never made: no need to hash its inputs to know
    try:
        hashes = input_hashes(ws, spec, owner, external, check=False)
    except StageError:
        return None
    section = registry.section(ws, spec)
    params_hash = section.digest() if section else None
    return _made(ws, spec, owner, target, params_hash, hashes, spec.cache_key(owner, params_hash, hashes))


def _execute_locked(ws: Workspace, spec: Stage, identity: str, target: Path, section: Section | None,
                    params_hash: str | None, hashes: dict[str, str], key: str, external: Path | None,
                    progress: Progress | None) -> StageResult:
    """One writer per artifact (the caller holds its lock), so sweeping leftovers never hits a live run's work."""
    stage = spec.name
    sweep_partials(target.parent, target.name)

    dirs = input_dirs(ws, spec, identity)
    inputs: dict[str, Any] = {}
    for input_key, (name, owner, art) in dirs.items():
        if spec.shared:
            inputs.setdefault(owner, {})[name] = art  # a shared stage reads each identity's artifacts
        else:
            inputs[input_key] = art
    files: dict[str, Path] = {}
    for param in spec.weights:
        value = getattr(section, param, None)
        if value:
            files[param] = resolve_path(ws, value)
    if spec.body_model:
        files["body_model"] = body_model_path(ws)
    inputs.update(files)
    kwargs: dict[str, Any] = {spec.external: external} if spec.external else {}
    if spec.reads:
        kwargs["settings"] = registry.settings(ws, spec)
    if spec.base_weights:
        kwargs["base"] = base_paths(ws)
    if spec.resumable:
        # partial work (e.g. training state) survives a kill under the cache key, outside the atomic artifact
        kwargs["scratch"] = ws.state / "scratch" / stage / identity / key[:16]
        kwargs["scratch"].mkdir(parents=True, exist_ok=True)  # the stage's own: it writes inside, never beside
    if spec.encodings:
        kwargs["encoded"] = ws.state / "encoded"
        kwargs["encoded"].mkdir(parents=True, exist_ok=True)
    module = registry.module_of(spec)
    execution = registry.params(ws).execution

    started, t0 = now_iso(), time.perf_counter()
    with PeakRSS() as mem, atomic_dir(target) as tmp, \
            devices.claim(execution.device if spec.device is True else "cpu") as device, \
            devices.threads_kept():
        if spec.device:
            kwargs["compute"] = devices.Compute(device, execution.max_latent_mb << 20,
                                                on_demand=execution.device if spec.device == "part" else None)
        reads = [art for _, _, art in dirs.values()] + list(files.values())
        reads += [external] if external is not None else []
        reads += [p for p in vars(kwargs["base"]).values() if p] if spec.base_weights else []
        writes = [tmp] + [kwargs[k] for k in ("scratch", "encoded") if k in kwargs]
        with contract.watch(stage, ws.root, reads, writes):
            try:
                summary = module.run(inputs, tmp, section, Interruptible(progress), **kwargs) or {}
            except Exception as exc:
                if devices.is_out_of_memory(exc):
                    raise devices.out_of_memory(stage, device, type(section).model_fields if section else (),
                                                exc) from None
                raise
        _check_outputs(spec, tmp)
        output_hash = hash_tree(tmp)
        manifest_inputs: list[dict[str, Any]] = [
            {"stage": name, "identity": owner, "path": ws.rel(art), "output_hash": hashes[key]}
            for key, (name, owner, art) in dirs.items()]
        manifest_inputs += [{"kind": "weights", "param": f"{spec.section}.{p}", "path": str(files[p]),
                             "sha256": hashes[p]} for p in spec.weights if p in files]
        if spec.base_weights:
            manifest_inputs.append({"kind": "base_models", "hash": hashes["base_models"],
                                    "paths": {k: str(v) for k, v in vars(kwargs["base"]).items()}})
        if spec.body_model:
            manifest_inputs.append({"kind": "body_model", "path": str(files["body_model"]),
                                    "sha256": hashes["body_model"]})
        if external is not None:
            manifest_inputs.append({"kind": "external", "name": spec.external, "path": str(external.resolve()),
                                    "sha256": hashes[spec.external]})
        write_json(tmp / MANIFEST, {
            "stage": stage,
            "identity": identity,
            "output_hash": output_hash,
            "cache_key": key,
            "inputs": manifest_inputs,
            "params_section": spec.section,
            "params": section.model_dump(mode="json") if section else None,
            "params_hash": params_hash,
            "code_version": {**code_version((*spec.code_files(), *CODE_CONFIG)),
                             "stage_code_hash": spec.code_hash()},
            "packages": spec.packages(),
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


def _check_outputs(spec: Stage, out: Path) -> None:
    """The stage wrote what it declares (a pattern ending in "?" may be absent)."""
    missing = [o for o in spec.outputs if not o.endswith("?") and not any(out.glob(o.rstrip("/")))]
    if missing:
        raise StageError(f"{spec.name} did not write its declared output(s) {', '.join(missing)} ({spec.module})")


def execute_recorded(ws: Workspace, stage: str, owner: str, *, run_id: str, flow: str, external: Path | None = None,
                     progress: Progress | None = None) -> StageResult:
    """`execute` outside a flow (`anchor stage run`, `dvc repro`), with its ledger row, failed or not."""
    started, t0 = now_iso(), time.perf_counter()
    try:
        result = execute(ws, stage, owner, external=external, progress=progress)
    except Exception as exc:
        record(ws, run_id=run_id, flow=flow, stage=stage, identity=owner, status="failed", cache_hit=False,
               started_at=started, duration_s=round(time.perf_counter() - t0, 3), error=str(exc))
        raise
    record(ws, run_id=run_id, flow=flow, stage=stage, identity=owner, status="completed", cache_hit=result.reused,
           result=result.to_dict(), duration_s=round(time.perf_counter() - t0, 3) if result.reused else None)
    return result


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
