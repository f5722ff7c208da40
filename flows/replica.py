"""A workspace as a replica of the studio's shared DVC remote: how an identity, a render and an upload made on one
machine reach another (docs/service.md, "Workers in workspaces of their own").

DVC moves an identity's data: content-addressed objects, each written whole, so a push cut short leaves only whole
objects that nothing names. What DVC leaves to git — the identity's .dvc file, its dvc.lock entries (and the
shared pretraining's it was trained from), its model versions — travels as one small record per identity, written
after its objects in one write: a machine reads the previous record or the new one, never a mix. A render (not a
DVC output) travels as one tar named by its hash, then its record; an upload as itself. Writers of one identity
take its lock on the Prefect server every machine shares (`owner_lock`); its lease lapses when a writer dies.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import tarfile
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from core.artifacts import code_version, host, now_iso, write_text
from core.errors import AnchorError, InputError
from core.hashing import sha256_bytes, sha256_file
from core.workspace import (
    MOTION_KEY_RE,
    NAME_RE,
    SHARED,
    Workspace,
    check_identity_name,
    render_subject,
    split_render_subject,
    worker_elsewhere,
)
from flows.dvc_store import (
    REMOTE,
    commit_identity,
    commit_shared,
    configure_remote,
    count,
    dvc,
    remote_url,
    source_target,
    stage_targets,
)
from tasks import registry

RECORDS = "anchor"  # under the remote's URL, beside DVC's own files/
LEASE_S = 60.0  # a writer's hold on an identity lapses this long after its machine stops renewing it
SHARED_STAGES = tuple(n for n, spec in registry.STAGES.items() if spec.in_dvc and spec.shared)


# ------------------------------------------------------------------------------------------------ the remote
def remote_fs(ws: Workspace) -> tuple[Any, str]:
    """The remote's filesystem (fsspec: s3fs for s3://, the local one for a directory) and its root path there."""
    from fsspec.core import url_to_fs
    from fsspec.implementations.local import LocalFileSystem

    url = remote_url(ws)
    if "://" not in url:
        return LocalFileSystem(auto_mkdir=True), str(Path(url))
    options: dict[str, Any] = {"skip_instance_cache": True}
    if url.startswith("s3://"):
        options["use_listings_cache"] = False
        endpoint = registry.params(ws).storage.endpoint_url
        if endpoint:
            options["endpoint_url"] = endpoint
    fs, root = url_to_fs(url, **options)
    return fs, root.rstrip("/")


def _key(root: str, *parts: str) -> str:
    return "/".join((root, RECORDS, *parts))


def _put(fs: Any, path: str, data: bytes | Path) -> None:
    """One object, whole or not at all: an object store writes it in one request; a directory gets it by rename."""
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        part = f"{path}.part-{uuid.uuid4().hex}"
        if isinstance(data, Path):
            fs.put_file(str(data), part)
        else:
            fs.pipe_file(part, data)
        fs.mv(part, path)
    elif isinstance(data, Path):
        fs.put_file(str(data), path)
    else:
        fs.pipe_file(path, data)


def _read(fs: Any, path: str) -> bytes | None:
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        return None


def _names(fs: Any, folder: str, suffix: str) -> list[str]:
    try:
        entries = fs.ls(folder, detail=False)
    except FileNotFoundError:
        return []
    return sorted(Path(e).name.removesuffix(suffix) for e in entries if str(e).endswith(suffix))


def _applied_path(ws: Workspace, kind: str, name: str) -> Path:
    return ws.state / "replica" / kind / f"{name.replace('/', '@')}.sha256"


def _applied(ws: Workspace, kind: str, name: str) -> str | None:
    path = _applied_path(ws, kind, name)
    return path.read_text().strip() if path.is_file() else None


def _remember(ws: Workspace, kind: str, name: str, digest: str) -> None:
    path = _applied_path(ws, kind, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, digest + "\n")


# ------------------------------------------------------------------------------------------------ the lock
@contextlib.contextmanager
def owner_lock(ws: Workspace, owner: str) -> Iterator[None]:
    """Held while one machine makes and publishes `owner` (an identity): a Prefect global concurrency limit of one,
    named after the remote, on the Prefect server every machine shares. Its lease is renewed while held and lapses
    LEASE_S after a dead holder's last renewal; waits up to storage.lock_wait_s (at least a second). A renewal
    that fails (the Prefect server away for a while) is logged, not fatal: a long training run is not thrown away
    for it, and `publish_identity` still refuses to replace a record another machine wrote meanwhile."""
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists

    name = f"anchor-write-{hashlib.sha256(remote_url(ws).encode()).hexdigest()[:12]}-{owner}"
    with get_client(sync_client=True) as client, contextlib.suppress(ObjectAlreadyExists):
        client.upsert_global_concurrency_limit_by_name(name, 1)  # not atomic: two first users may both create it
    wait = max(registry.params(ws).storage.lock_wait_s, 1.0)
    try:
        with concurrency(name, occupy=1, timeout_seconds=wait, lease_duration=LEASE_S, strict=True,
                         raise_on_lease_renewal_failure=False):
            yield
    except TimeoutError:
        raise AnchorError(f"{owner} is being written to the remote by another machine for over {wait:.0f} s "
                          f"(lock {name}); try again later") from None


# ------------------------------------------------------------------------------------------------ identities
def _lock_table(ws: Workspace) -> dict[str, Any]:
    lock = ws.root / "dvc.lock"
    return (yaml.safe_load(lock.read_text()) or {}) if lock.is_file() else {}


def _trained_from(ws: Workspace, identity: str, stages: dict[str, Any]) -> list[str]:
    """The shared stages (pretraining) whose output, as this workspace has it now, is what the identity's stages
    were made from (their manifests' inputs, which a later `dvc commit` does not rewrite): those travel with its
    record."""
    from core.artifacts import read_manifest

    used = {i.get("output_hash") for name, spec in registry.STAGES.items() if spec.in_dvc and not spec.shared
            for i in (read_manifest(registry.artifact_dir(ws, name, identity)) or {}).get("inputs", [])
            if i.get("identity") == SHARED}
    return [s for s in SHARED_STAGES if s in stages
            and (read_manifest(registry.artifact_dir(ws, s, SHARED)) or {}).get("output_hash") in used]


def published_identities(ws: Workspace) -> list[str]:
    fs, root = remote_fs(ws)
    return [n for n in _names(fs, _key(root, "identities"), ".json") if NAME_RE.fullmatch(n)]


def _record(ws: Workspace, identity: str) -> tuple[bytes | None, dict[str, Any] | None]:
    """The identity's record in the remote (its bytes and, checked, its content), or (None, None)."""
    fs, root = remote_fs(ws)
    data = _read(fs, _key(root, "identities", f"{identity}.json"))
    if data is None:
        return None, None
    return data, _checked(ws, identity, data)


def _checked(ws: Workspace, identity: str, data: bytes) -> dict[str, Any]:
    """A record as `publish_identity` writes it, naming only this identity's stages and files (and the shared
    pretraining's): whoever can write the bucket must not reach another identity or any other file of a workspace
    through it."""
    names = {f"{n}@{identity}" for n, spec in registry.STAGES.items() if spec.in_dvc and not spec.shared}

    def within(path: Any, folder: Path) -> bool:
        want = ws.rel(folder)
        return isinstance(path, str) and ".." not in Path(path).parts and (path == want or path.startswith(want + "/"))

    try:
        record = json.loads(data)
        source = yaml.safe_load(record["source"])
        ok = (record["identity"] == identity and set(record["stages"]) <= names
              and set(record["shared"]) <= set(SHARED_STAGES) and isinstance(record["versions"], list)
              and all(isinstance(v["version"], int) and isinstance(v["finetune"], str) for v in record["versions"])
              and isinstance(record["host"], str) and isinstance(record["published_at"], str)
              and set(source) == {"outs"} and [o["path"] for o in source["outs"]] == ["source"])
        for target, entry in {**record["stages"], **record["shared"]}.items():
            stage, _, owner = target.partition("@")
            folder = registry.artifact_dir(ws, stage, owner or SHARED)
            ok = ok and bool(entry["outs"]) and all(within(o["path"], folder) for o in entry["outs"])
    except (ValueError, KeyError, TypeError, AttributeError, yaml.YAMLError):
        ok = False
    if not ok:
        raise AnchorError(f"the remote's record of {identity} is not one `anchor push` writes (or names files "
                          "that are not its own); not taken")
    return record


def _foreign(ws: Workspace, identity: str) -> None:
    """Refuse when the remote's record of the identity is another machine's that this workspace has not taken:
    neither the one it last fetched or published, nor one whose files are what this workspace has."""
    try:
        data, theirs = _record(ws, identity)
    except AnchorError:
        raise AnchorError(f"the remote's record of {identity} is not one `anchor push` writes, so it is not "
                          f"replaced: remove anchor/identities/{identity}.json from the remote if it must go") from None
    if data is None or theirs is None or sha256_bytes(data) == _applied(ws, "identities", identity):
        return
    here = _lock_table(ws).get("stages", {})
    source = ws.root / source_target(ws, identity)
    if (source.is_file() and source.read_text() == theirs["source"]
            and all(here.get(t) == entry for t, entry in theirs["stages"].items())):
        return  # the same files (this workspace's state was lost, or it fetched them otherwise)
    raise AnchorError(f"the remote's {identity} was written by {theirs['host']} at {theirs['published_at']}, which "
                      f"this workspace does not have: `anchor pull {identity} --latest` takes it first (or onboard "
                      "another name)")


def publish_identity(ws: Workspace, identity: str) -> int:
    """Push the identity's DVC outputs (and the pretraining it was trained from), then its record; the number of
    files pushed. Refused when the remote's record is another machine's that this workspace does not have (checked
    before the push and again just before the record is written)."""
    from flows.versions import versions

    check_identity_name(identity)
    _foreign(ws, identity)
    commit_identity(ws, identity)
    for stage in SHARED_STAGES:
        if registry.artifact_dir(ws, stage, SHARED).is_dir():
            commit_shared(ws, stage)
    configure_remote(ws)
    stages = _lock_table(ws).get("stages", {})
    targets = stage_targets(ws, identity, locked_only=True)
    source = ws.root / source_target(ws, identity)
    if not source.is_file() or not targets:
        raise AnchorError(f"{identity} has nothing recorded to publish in {ws.root}")
    shared = _trained_from(ws, identity, stages)
    pushed = count(dvc(ws, "push", "-r", REMOTE, source_target(ws, identity), *targets, *shared))
    record = {"identity": identity, "source": source.read_text(), "stages": {t: stages[t] for t in targets},
              "shared": {s: stages[s] for s in shared}, "versions": versions(ws).get(identity, []),
              "published_at": now_iso(), "host": host(), "code_version": code_version()}
    data = json.dumps(record, indent=1, sort_keys=True).encode()
    fs, root = remote_fs(ws)
    with ws.records_lock():  # a sync of this workspace does not fetch it back meanwhile
        _foreign(ws, identity)  # the push took a while: another machine may have written it since
        _put(fs, _key(root, "identities", f"{identity}.json"), data)
        _remember(ws, "identities", identity, sha256_bytes(data))
    return pushed


def fetch_identity(ws: Workspace, identity: str, force: bool = False) -> int | None:
    """Make the identity here what its record in the remote says (records, then `dvc pull`): the number of files
    pulled, or None when it was so already (unless `force`d). Raises when the remote has no record of it.

    The pretraining it was trained from comes along only into a workspace that has none: a workspace keeps one
    pretraining (its own, or the first it fetched), which renders never read (only training and its report do)."""
    check_identity_name(identity)
    with ws.records_lock():  # the record read under it too: a slower fetch never applies an older one
        data, record = _record(ws, identity)
        if data is None or record is None:
            raise InputError(f"no identity {identity!r} in the remote {remote_url(ws)}")
        digest = sha256_bytes(data)
        if not force and _applied(ws, "identities", identity) == digest:
            return None
        dot_dvc = ws.root / source_target(ws, identity)
        dot_dvc.parent.mkdir(parents=True, exist_ok=True)
        write_text(dot_dvc, record["source"])
        table = _lock_table(ws) or {"schema": "2.0"}
        here = table.setdefault("stages", {})
        shared = [s for s in record["shared"] if s not in here]
        here.update({**{s: record["shared"][s] for s in shared}, **record["stages"]})
        write_text(ws.root / "dvc.lock", yaml.safe_dump(table, sort_keys=False))
        ws.register_identity(identity)
        _merge_versions(ws, identity, record["versions"])
        configure_remote(ws)
        pulled = count(dvc(ws, "pull", "-f", "-r", REMOTE, source_target(ws, identity), *record["stages"], *shared))
        _remember(ws, "identities", identity, digest)
    return pulled


def _merge_versions(ws: Workspace, identity: str, rows: list[dict[str, Any]]) -> None:
    from flows.versions import VERSIONS_FILE, versions

    table = versions(ws)
    table[identity] = rows
    write_text(ws.root / VERSIONS_FILE, yaml.safe_dump(table, sort_keys=False))


def refresh(ws: Workspace) -> list[str]:
    """Every identity the remote has, fetched where its record changed; the names fetched. A record that is not
    taken (malformed) is logged and skipped: it does not hide the others."""
    import logging

    fetched = []
    for name in published_identities(ws):
        try:
            if fetch_identity(ws, name) is not None:
                fetched.append(name)
        except AnchorError as exc:  # a bad record, a bad name, its objects missing: that identity alone
            logging.getLogger("anchor.replica").warning("%s not fetched: %s", name, exc)
    return fetched


# ------------------------------------------------------------------------------------------------ renders
def render_dir(ws: Workspace, subject: str) -> Path:
    parts = split_render_subject(subject)
    if parts is None:
        raise InputError(f"{subject!r} is not a render (identity/motion key)")
    return ws.data / "renders" / parts[0] / parts[1]


def publish_render(ws: Workspace, subject: str) -> str:
    """The render's folder as one tar named by its hash, then its record."""
    folder = render_dir(ws, subject)
    fs, root = remote_fs(ws)
    with tempfile.TemporaryDirectory(dir=ws.state) as tmp:
        tar = Path(tmp) / "render.tar"
        with tarfile.open(tar, "w") as out:
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                out.add(path, arcname=str(path.relative_to(folder)))
        digest = sha256_file(tar)
        _put(fs, _key(root, "renders", subject, f"{digest}.tar"), tar)
    record = json.dumps({"render": subject, "sha256": digest, "published_at": now_iso(), "host": host()},
                        indent=1).encode()
    _put(fs, _key(root, "renders", f"{subject}.json"), record)
    _remember(ws, "renders", subject, digest)
    return digest


def published_renders(ws: Workspace, identity: str) -> list[str]:
    fs, root = remote_fs(ws)
    return [render_subject(identity, k) for k in _names(fs, _key(root, "renders", identity), ".json")
            if MOTION_KEY_RE.fullmatch(k)]


def fetch_render(ws: Workspace, subject: str) -> bool:
    """The render's folder as the remote has it (the tar checked against its hash, unpacked beside and renamed
    into place); False when the remote has none or it is here already."""
    fs, root = remote_fs(ws)
    data = _read(fs, _key(root, "renders", f"{subject}.json"))
    if data is None:
        return False
    folder = render_dir(ws, subject)
    try:
        digest = json.loads(data)["sha256"]
        if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
            raise ValueError(digest)
    except (ValueError, KeyError, TypeError):
        raise AnchorError(f"the remote's record of render {subject} is malformed; not taken") from None
    if _applied(ws, "renders", subject) == digest:
        return False
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.tmp-") as tmp:
        tar = Path(tmp) / "render.tar"
        fs.get_file(_key(root, "renders", subject, f"{digest}.tar"), str(tar))
        if sha256_file(tar) != digest:
            raise AnchorError(f"render {subject} in the remote differs from its record; not taken")
        unpacked = Path(tmp) / "render"
        with tarfile.open(tar) as src:
            src.extractall(unpacked, filter="data")
        old = Path(tmp) / "old"
        if folder.exists():
            folder.rename(old)
        unpacked.rename(folder)
    _remember(ws, "renders", subject, digest)
    return True


# ------------------------------------------------------------------------------------------------ uploads
UPLOAD_RE = re.compile(r"[0-9a-f]{32}/[a-z]+(\.[a-z0-9]{1,8})?")  # as service/studio.py names them


def _upload_rel(uploads: Path, path: Path | str) -> Path:
    """An upload's folder and name under `uploads`, exactly as the service names them; nothing else."""
    try:
        rel = Path(path).relative_to(uploads)
    except ValueError:
        rel = None
    if rel is None or not UPLOAD_RE.fullmatch(rel.as_posix()):
        raise InputError(f"{path} is not an upload of the workspace {uploads.parent.parent}")
    return rel


def _upload_key(ws: Workspace, root: str, path: Path) -> str:
    return _key(root, "uploads", *_upload_rel(ws.uploads, path).parts)


def publish_upload(ws: Workspace, path: Path) -> None:
    fs, root = remote_fs(ws)
    _put(fs, _upload_key(ws, root, path), path)


def fetch_upload(ws: Workspace, server_root: Path, path: str) -> Path:
    """The upload a job names by its server's path, here: the same folder under this workspace, fetched from the
    remote when it is not."""
    rel = _upload_rel(Workspace(server_root).uploads, path)
    local = ws.uploads / rel
    if local.is_file():
        return local
    fs, root = remote_fs(ws)
    local.parent.mkdir(parents=True, exist_ok=True)
    part = local.with_name(local.name + ".part")
    try:
        fs.get_file(_upload_key(ws, root, local), str(part))
        part.rename(local)
    except FileNotFoundError:
        shutil.rmtree(local.parent, ignore_errors=True)
        raise InputError(f"the upload {rel} is not in the remote {remote_url(ws)}") from None
    except BaseException:  # the store unreachable, the job cancelled: no part-file left to look like an upload
        part.unlink(missing_ok=True)
        raise
    return local


# ------------------------------------------------------------------------------------------------ jobs
def job_workspace(workspace: str, remote: str | None) -> tuple[Workspace, Path | None]:
    """Where a job runs: its own workspace, or, on a worker serving another workspace that shares its remote, the
    worker's — then also the server's root (whose uploads the job names). Otherwise refused, naming both."""
    mine = worker_elsewhere(workspace)
    if mine is None:
        return Workspace(Path(workspace)), None
    if remote is None or remote_url(mine) != remote:
        raise InputError(f"this worker serves the workspace {mine.root}, whose remote is {remote_url(mine)}; the run "
                         f"is for {workspace}, whose remote is {remote or 'not shared'}: a worker runs another "
                         "workspace's jobs only through the same shared remote (storage.remote), or on that "
                         "workspace itself")
    return mine, Path(workspace)
