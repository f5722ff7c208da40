"""Where a pipeline lives: params.yaml, dvc.yaml, data/ and the git-ignored state directory (.anchor/).

The workspace is the project root by default; `--workspace DIR` (or ANCHOR_WORKSPACE) points elsewhere and
`anchor init DIR` makes a new one. Tests always run in a temporary workspace.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml
from filelock import FileLock

from core.artifacts import write_text
from core.errors import InputError

CODE_ROOT = Path(__file__).resolve().parent.parent
NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
MOTION_KEY_RE = re.compile(r"[0-9a-f]{12}")
IDENTITIES_FILE = "identities.yaml"


# The owner of artifacts built from all identities at once (pretraining). No identity name can take it: names
# start with a letter or digit.
SHARED = "_shared"


# set by `anchor worker` for the runs it starts: the workspace it serves (not ANCHOR_WORKSPACE, which is `-w`'s
# default for any command, and which a runner's or the command line's own runs inherit)
WORKER_WORKSPACE_ENV = "ANCHOR_WORKER_WORKSPACE"


def worker_elsewhere(workspace: str) -> Workspace | None:
    """The workspace of the worker that started this run when it is not `workspace`; None when no worker did, or
    when it serves that very place (however the path is spelt)."""
    bound = os.environ.get(WORKER_WORKSPACE_ENV)
    if not bound or Path(bound).expanduser().resolve() == Path(workspace).expanduser().resolve():
        return None
    return Workspace(Path(bound))


def bound_workspace(workspace: str) -> Workspace:
    """A deployment run's workspace, which must be the one the worker running it serves: a run that writes its
    workspace in place (a scheduled re-render) needs it on a shared filesystem."""
    mine = worker_elsewhere(workspace)
    if mine is not None:
        raise InputError(f"this worker serves the workspace {mine.root}; the run is for {workspace}, which a worker "
                         "reaches only on a shared filesystem (start the worker with `-w` on that path)")
    return Workspace(Path(workspace))


def check_identity_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        shown = name if not isinstance(name, str) or len(name) <= 40 else name[:37] + "..."
        raise InputError(
            f"invalid identity name {shown!r}: use 1-64 characters of a-z, 0-9, '_' and '-', "
            "starting with a letter or digit"
        )
    return name


def render_subject(identity: str, motion_key: str) -> str:
    """The owner of a render's artifacts: one identity driven by one motion (named by the motion's content hash)."""
    check_identity_name(identity)
    if not MOTION_KEY_RE.fullmatch(motion_key):
        raise InputError(f"invalid motion key {motion_key!r}: expected 12 hex digits")
    return f"{identity}/{motion_key}"


def split_render_subject(subject: str) -> tuple[str, str] | None:
    """(identity, motion key) of a render subject; None for an identity or the shared owner."""
    if "/" not in subject:
        return None
    identity, key = subject.split("/", 1)
    render_subject(identity, key)
    return identity, key


@dataclass(frozen=True)
class Workspace:
    root: Path

    @property
    def params_path(self) -> Path:
        return self.root / "params.yaml"

    @property
    def dvc_yaml(self) -> Path:
        return self.root / "dvc.yaml"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def state(self) -> Path:
        return self.root / ".anchor"

    @property
    def uploads(self) -> Path:
        """Files the service received: one folder per upload."""
        return self.state / "uploads"

    @property
    def ledger_dir(self) -> Path:
        return self.state / "ledger"

    @property
    def prefect_home(self) -> Path:
        return self.state / "prefect"

    @property
    def identities_path(self) -> Path:
        return self.root / IDENTITIES_FILE

    def identity_dir(self, identity: str) -> Path:
        return self.data / "identities" / check_identity_name(identity)

    def artifact_dir(self, stage: str, owner: str, home: str = "identities") -> Path:
        """Where the artifact of `stage` for `owner` lives. An identity's under data/<home>/<identity>/<stage>, where
        the stage declares its home: "identities" for data, "checkpoints" for its models (kept apart, so that
        pretraining can depend on the whole identities tree without depending on its own descendants), "reports"
        for what people read (data/reports/<identity>, the artifact itself). The shared owner's under
        data/checkpoints/<stage>; a render's (identity × motion) under data/renders/<identity>/<motion key>/<stage>."""
        if owner == SHARED:
            return self.data / "checkpoints" / stage
        render = split_render_subject(owner)
        if render is not None:
            return self.data / "renders" / render[0] / render[1] / stage
        check_identity_name(owner)
        if home == "checkpoints":
            return self.data / "checkpoints" / "identities" / owner / stage
        if home == "reports":
            return self.data / "reports" / owner
        return self.identity_dir(owner) / stage

    def rel(self, path: Path) -> str:
        """Workspace-relative POSIX path: what manifests and the ledger record."""
        return Path(os.path.relpath(Path(path).resolve(), self.root.resolve())).as_posix()

    def identities(self) -> list[str]:
        if not self.identities_path.is_file():
            return []
        data = yaml.safe_load(self.identities_path.read_text()) or {}
        return list(data.get("identities") or [])

    def records_lock(self) -> FileLock:
        """Serialises writers of the workspace's records (identities.yaml, versions.yaml, DVC and git commands)
        across threads and processes; re-entrant in one thread."""
        path = self.state / "locks" / "records.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(path, is_singleton=True)

    def register_identity(self, identity: str) -> None:
        """Add the name to identities.yaml, over which dvc.yaml's stages iterate (foreach)."""
        check_identity_name(identity)
        with self.records_lock():
            names = self.identities()
            if identity in names:
                return
            text = "# Identities onboarded in this workspace; dvc.yaml's stages run once per name.\n"
            text += yaml.safe_dump({"identities": sorted({*names, identity})}, default_flow_style=False)
            write_text(self.identities_path, text)


def find_workspace(explicit: str | Path | None = None) -> Workspace:
    """--workspace, then $ANCHOR_WORKSPACE, then the working directory if it holds params.yaml, then the project."""
    for candidate in (explicit, os.environ.get("ANCHOR_WORKSPACE")):
        if candidate:
            root = Path(candidate).expanduser().resolve()
            if not (root / "params.yaml").is_file():
                raise InputError(f"{root} is not a workspace (no params.yaml); create one with `anchor init {root}`")
            return Workspace(root)
    cwd = Path.cwd().resolve()
    if (cwd / "params.yaml").is_file() and (cwd / "dvc.yaml").is_file():
        return Workspace(cwd)
    return Workspace(CODE_ROOT)
