"""anchor init, stage run/list, dvc sync/check, push, pull: the workspace, its stages and its DVC side."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cli import show
from cli.app import app, dvc_app, err, out, say, stage_app
from cli.env import dvc, under_dvc, workspace
from cli.progress import ProgressDisplay
from core.workspace import Workspace, check_identity_name


@app.command()
def init(directory: Annotated[Path, typer.Argument(help="Directory to make a workspace in (created if needed).")]
         ) -> None:
    """Create a workspace: git + DVC initialised, params.yaml, identities.yaml and dvc.yaml written."""
    from core.dvcfile import generate
    from tasks import registry

    root = directory.expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    ws = Workspace(root)
    if not (root / ".git").exists():
        subprocess.run(["git", "init", "-q", str(root)], check=True)
    if not (root / ".dvc").exists():
        dvc(root, "init", "-q")
        dvc(root, "config", "core.analytics", "false")
    for path, text in ((ws.params_path, registry.default_params_yaml()),
                       (ws.identities_path, "identities: []\n"),
                       (root / ".gitignore", ".anchor/\ndata/renders/\ndvc_plots/\n")):
        if not path.exists():
            path.write_text(text)
    ws.dvc_yaml.write_text(generate(registry.STAGES.values()))
    (ws.data / "identities").mkdir(parents=True, exist_ok=True)
    say(f"workspace ready: {root}")


@stage_app.command("run")
def stage_run(stage: Annotated[str, typer.Argument(help="Stage name (see `anchor stage list`).")],
              identity: Annotated[str | None, typer.Argument(help="Identity name (none for shared stages such "
                                                             "as pretrain).")] = None,
              video: Annotated[Path | None, typer.Option(help="Source video (the source stage only).")] = None
              ) -> None:
    """Run one stage for one identity now, without Prefect (this is what `dvc repro` calls)."""
    from core.errors import InputError
    from core.workspace import SHARED
    from flows.versions import record_if_model
    from tasks import registry, runner

    ws = workspace()
    spec = registry.get(stage)
    if spec.command and spec.external:
        raise InputError(f"{stage} is made by `{spec.command.format(item=identity or 'NAME')}`")
    if spec.shared:
        if identity:
            raise InputError(f"{stage} is built from all identities at once: run `anchor stage run {stage}`")
        identity = SHARED
    elif identity is None:
        raise InputError(f"stage {stage} runs per identity: `anchor stage run {stage} NAME`")
    else:
        check_identity_name(identity)
    run_id = uuid.uuid4().hex
    with ProgressDisplay(err) as factory:
        result = runner.execute_recorded(ws, stage, identity, run_id=run_id, flow="dvc" if under_dvc() else "cli",
                                         external=video.resolve() if video else None,
                                         progress=factory(stage, identity))
    say(f"{stage}[{identity}] → {result.path}  {result.output_hash[:12]}  "
        + ("cached" if result.reused else f"{result.duration_s:.1f} s"))
    # every new model is a version, however it was made (`dvc repro` calls this)
    version = record_if_model(ws, stage, identity, run_id, commit=not under_dvc())
    if version:
        show.version(identity, version, "; commit dvc.lock and versions.yaml after `dvc repro`"
                      if version["new"] and under_dvc() else "")


@stage_app.command("list")
def stage_list(as_json: Annotated[bool, typer.Option("--json", help="One JSON list: name, inputs, params, the "
                                                     "modules of its code and their hash.")] = False) -> None:
    """The stage registry: inputs, params section, module (and, with --json, the code in each cache key)."""
    from tasks import registry

    if as_json:
        print(json.dumps([{"name": s.name, "inputs": list(s.inputs), "params": s.section, "flow": s.flow,
                           "scope": s.scope, "module": s.module, "code_modules": s.code_modules(),
                           "code_hash": s.code_hash()} for s in registry.STAGES.values()], indent=2))
        return
    table = Table("stage", "flow", "inputs", "params", "module", "what it makes")
    for spec in registry.STAGES.values():
        inputs = ", ".join(spec.inputs) or (f"--{spec.external}" if spec.external else "")
        table.add_row(spec.name, spec.flow, inputs, spec.section or "", spec.module, spec.description)
    out.print(table)


@dvc_app.command("sync")
def dvc_sync() -> None:
    """Write dvc.yaml from the stage registry."""
    from core.dvcfile import generate
    from tasks import registry

    ws = workspace()
    ws.dvc_yaml.write_text(generate(registry.STAGES.values()))
    if not ws.identities_path.exists():
        ws.identities_path.write_text("identities: []\n")
    say(f"wrote {ws.dvc_yaml}")


@dvc_app.command("check")
def dvc_check() -> None:
    """Exit 1 when dvc.yaml differs from what the stage registry generates."""
    from core.dvcfile import generate
    from tasks import registry

    ws = workspace()
    current = ws.dvc_yaml.read_text() if ws.dvc_yaml.is_file() else ""
    if current != generate(registry.STAGES.values()):
        err.print(f"error: {ws.dvc_yaml} has drifted from the stage registry; run `anchor dvc sync`", markup=False,
                  highlight=False)
        raise typer.Exit(1)
    say("dvc.yaml matches the stage registry")


@app.command()
def push(name: Annotated[str, typer.Argument(help="Identity to push.")]) -> None:
    """Push one identity's source, data and checkpoints (and the pretraining it was trained from) to the DVC remote
    (storage.remote in params.yaml), then its record, from which another workspace can `anchor pull` it."""
    from flows.dvc_store import remote_url
    from flows.replica import publish_identity

    check_identity_name(name)
    ws = workspace()
    count = publish_identity(ws, name)
    say(f"pushed {count} file(s) of {name} to {remote_url(ws)}")


@app.command()
def pull(name: Annotated[str, typer.Argument(help="Identity to pull.")],
         latest: Annotated[bool, typer.Option("--latest", help="As the remote's record says (the last `anchor push` "
                                              "of any machine), even when this workspace has the identity.")]
         = False) -> None:
    """Restore one identity's tracked files from the DVC remote as this workspace's dvc.lock and .dvc file say
    (so a version checked out with git comes back); an identity this workspace has no record of, or with
    --latest, as its record in the remote says (another machine's `anchor push`)."""
    from flows.dvc_store import pull as dvc_pull
    from flows.dvc_store import remote_url, source_target
    from flows.replica import fetch_identity

    check_identity_name(name)
    ws = workspace()
    known = name in ws.identities() and (ws.root / source_target(ws, name)).is_file()
    count = dvc_pull(ws, name)[0] if known and not latest else fetch_identity(ws, name, force=True)
    say(f"pulled {count} file(s) of {name} from {remote_url(ws)}")
