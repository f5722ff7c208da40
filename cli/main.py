"""`anchor`: the command line over the pipeline. Errors print as one line on stderr with a non-zero exit."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from core.errors import AnchorError
from core.workspace import Workspace, check_identity_name, find_workspace

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Make-Your-Anchor+ pipeline: onboard anchors, trace and version their artifacts.")
stage_app = typer.Typer(no_args_is_help=True, help="Run or list single stages (dvc.yaml's commands use these).")
dvc_app = typer.Typer(no_args_is_help=True, help="Keep dvc.yaml in step with the stage registry.")
bench_app = typer.Typer(no_args_is_help=True, help="Speed and memory benchmarks (figures, not tests).")
motion_app = typer.Typer(no_args_is_help=True, help="Bring SMPL-X motion (files or another video) to an identity.")
schedule_app = typer.Typer(no_args_is_help=True, help="Register scheduled flows (Prefect deployments); "
                           "`anchor serve` runs them.")
app.add_typer(stage_app, name="stage")
app.add_typer(dvc_app, name="dvc")
app.add_typer(bench_app, name="bench")
app.add_typer(motion_app, name="motion")
app.add_typer(schedule_app, name="schedule")

out = Console()
err = Console(stderr=True)
STATE: dict[str, Any] = {"workspace": None, "verbose": False}

WorkspaceOpt = Annotated[str | None, typer.Option("--workspace", "-w", envvar="ANCHOR_WORKSPACE",
                                                  help="Workspace directory (default: the project root).")]


@app.callback()
def _main(workspace: WorkspaceOpt = None,
          verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Prefect's and DVC's logs.")] = False
          ) -> None:
    STATE["workspace"] = workspace
    STATE["verbose"] = verbose


def _ws() -> Workspace:
    return find_workspace(STATE["workspace"])


def _prefect_env(ws: Workspace) -> None:
    """Prefect reads its settings when imported: point it at the workspace's state directory first."""
    (ws.state / "logs").mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(ws.prefect_home))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO" if STATE["verbose"] else "CRITICAL")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_BATCH_INTERVAL", "0.3")
    os.environ.setdefault("ANCHOR_NATIVE_LOG", str(ws.state / "logs" / "native.log"))
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "info" if STATE["verbose"] else "error")


def _start_ephemeral_server() -> str | None:
    """Start Prefect's embedded server outside the terminal's process group, tied to this process's life.

    Prefect would start the same server lazily in the terminal's group, where Ctrl-C kills it first and the
    interrupted flow then retries a dead server for minutes. In its own session it survives Ctrl-C; the parent-death
    signal ends it with this process however that ends (even SIGKILL). Prefect reuses this default instance.
    """
    if os.environ.get("PREFECT_API_URL"):
        return None  # a shared Prefect server: nothing to start
    from prefect.server.api import server

    popen = subprocess.Popen
    subprocess.Popen = functools.partial(popen, preexec_fn=_detach_but_die_with_parent)  # type: ignore[misc]
    try:
        embedded = server.SubprocessASGIServer()
        embedded.start()
    finally:
        subprocess.Popen = popen  # type: ignore[misc]
    return embedded.api_url


def _detach_but_die_with_parent() -> None:
    import ctypes
    import signal

    os.setsid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG (Linux)


# ---------------------------------------------------------------------------------------------------- workspace
@app.command()
def init(directory: Annotated[Path, typer.Argument(help="Directory to make a workspace in (created if needed).")]
         ) -> None:
    """Create a workspace: git + DVC initialised, params.yaml, identities.yaml and dvc.yaml written."""
    from core.dvcfile import render
    from core.params import default_params_yaml
    from tasks.registry import STAGES

    root = directory.expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    ws = Workspace(root)
    if not (root / ".git").exists():
        subprocess.run(["git", "init", "-q", str(root)], check=True)
    if not (root / ".dvc").exists():
        _dvc(root, "init", "-q")
        _dvc(root, "config", "core.analytics", "false")
    for path, text in ((ws.params_path, default_params_yaml()),
                       (ws.identities_path, "identities: []\n"),
                       (root / ".gitignore", ".anchor/\ndata/renders/\ndvc_plots/\n")):
        if not path.exists():
            path.write_text(text)
    ws.dvc_yaml.write_text(render(STAGES.values()))
    (ws.data / "identities").mkdir(parents=True, exist_ok=True)
    out.print(f"workspace ready: {root}")


def _dvc(root: Path, *args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True)
    if proc.returncode:
        raise AnchorError(f"dvc {' '.join(args)} failed: {proc.stderr.strip().splitlines()[-1:]}")


# ---------------------------------------------------------------------------------------------------- onboard
@app.command()
def onboard(
        targets: Annotated[list[str] | None, typer.Argument(
            help="NAME with --video, or NAME=VIDEO pairs (several identities at once). A name: a-z, 0-9, '_' or "
                 "'-', up to 64.", show_default=False)] = None,
        video: Annotated[Path | None, typer.Option("--video", help="The anchor's video (any common format), for "
                                                   "one NAME.")] = None,
        manifest: Annotated[Path | None, typer.Option("--manifest", help="A CSV with columns name,video (paths "
                                                      "relative to the CSV); added to the pairs.")] = None,
        train: Annotated[bool, typer.Option("--train", help="Then pretrain once over every identity and finetune "
                                            "each new one (several identities only).")] = False,
        evaluate: Annotated[bool, typer.Option("--evaluate/--no-evaluate", help="With --train: render, score and "
                                               "report each identity's held-out clips.")] = True,
) -> None:
    """Onboard anchors from videos: source → ingest → keypoints ∥ matting → SMPL-X fit → perturb → mesh conditions,
    cached and recorded in DVC. Several identities run concurrently (`a=a.mp4 b=b.mp4` or --manifest)."""
    from core.errors import InputError

    targets = targets or []
    if video is not None:
        if len(targets) != 1 or "=" in targets[0] or manifest is not None or train:
            raise InputError("--video goes with exactly one NAME; for several identities give NAME=VIDEO pairs "
                             "or --manifest (and --train to train them)")
        name = check_identity_name(targets[0])
        ws = _ws()
        path = _check_video(ws, name, video)
        _print_summary(ws, _run_flow(ws, "flows.onboard", "onboard", str(ws.root), name, str(path)))
        return
    pairs = _pairs(targets, manifest)
    ws = _ws()
    videos = {name: str(_check_video(ws, name, path)) for name, path in pairs.items()}
    summary = _run_flow(ws, "flows.onboard", "onboard_many", str(ws.root), videos, train, evaluate)
    failed = _print_many(summary)
    if failed:
        raise typer.Exit(1)


def _pairs(targets: list[str], manifest: Path | None) -> dict[str, Path]:
    """NAME=VIDEO arguments and the manifest's rows, names unique."""
    from core.errors import InputError

    rows: list[tuple[str, Path]] = []
    for arg in targets:
        name, sep, path = arg.partition("=")
        if not sep or not path:
            raise InputError(f"{arg!r}: expected NAME=VIDEO (or one NAME with --video)")
        rows.append((name, Path(path)))
    if manifest is not None:
        import pandas as pd

        if not manifest.is_file():
            raise InputError(f"--manifest {manifest}: no such file")
        try:
            table = pd.read_csv(manifest, dtype=str, skipinitialspace=True)
        except (ValueError, pd.errors.ParserError) as exc:
            raise InputError(f"--manifest {manifest}: not a CSV ({exc})") from None
        missing = {"name", "video"} - set(table.columns)
        if missing:
            raise InputError(f"--manifest {manifest}: needs columns name,video (missing {', '.join(sorted(missing))})")
        for i, row in enumerate(table.itertuples(index=False), start=2):
            if not isinstance(row.name, str) or not isinstance(row.video, str):
                raise InputError(f"--manifest {manifest} line {i}: empty name or video")
            path = Path(row.video.strip()).expanduser()
            rows.append((row.name.strip(), path if path.is_absolute() else manifest.parent / path))
    if not rows:
        raise InputError("nothing to onboard: give NAME --video VIDEO, NAME=VIDEO pairs or --manifest CSV")
    out: dict[str, Path] = {}
    for name, path in rows:
        check_identity_name(name)
        if name in out:
            raise InputError(f"identity {name!r} is named twice")
        out[name] = path
    return out


def _check_video(ws: Workspace, name: str, video: Path) -> Path:
    """Readable, and (unless already onboarded from the same file) showing a person: fail before any work."""
    from core.artifacts import read_manifest
    from core.hashing import sha256_file
    from tasks import video as vio
    from tasks.ingest import check_person
    from tasks.source import source_file

    video = video.expanduser()
    vio.probe(video)
    video = video.resolve()
    known = ws.artifact_dir("source", name)
    manifest = read_manifest(known)
    if not (manifest and manifest.get("summary", {}).get("source_sha256") == sha256_file(video)
            and source_file(known).is_file()):
        check_person(video, ws.params().ingest)
    return video


def _print_many(summary: dict[str, Any]) -> list[str]:
    """One row per identity; returns the names that failed."""
    table = Table(title=f"onboard {len(summary['identities'])} identities  (run {summary['run_id'][:8]})")
    for col in ("identity", "status", "stages ran / cached", "model", "details"):
        table.add_column(col)
    failed = []
    for name, o in summary["identities"].items():
        own = [r for key, r in summary["stages"].items() if key.endswith(f"[{name}]")
               or f"[{name}/" in key]
        ran = sum(not r["cache_hit"] for r in own)
        version = o.get("version")
        model = f"v{version['version']}" + ("" if version["new"] else " (unchanged)") if version else "-"
        details = o.get("error") or o.get("report") or ""
        if o["status"] == "failed":
            failed.append(name)
        table.add_row(name, o["status"], f"{ran} / {len(own) - ran}", model, escape(details))
    out.print(table)
    if isinstance(summary.get("pretrain"), list):
        from core.workspace import SHARED

        shared = summary["stages"].get(f"pretrain[{SHARED}]", {})
        out.print(f"pretrain: {'cached' if shared.get('cache_hit') else 'ran'} once for all identities")
    return failed


def _run_flow(ws: Workspace, module: str, name: str, *args: Any) -> Any:
    """A Prefect flow on the workspace's embedded server, with progress bars, on the engine params.yaml chooses.
    Prefect reads its settings when imported, so the flow module is imported only after the environment is set."""
    import importlib

    with _prefect_api(ws):
        from flows import stage_task
        from flows.execution import task_runner

        flow = getattr(importlib.import_module(module), name)
        flow = flow.with_options(task_runner=task_runner(ws.params().execution))
        with _progress() as factory:
            stage_task.progress_factory = factory
            return flow(*args)


@contextlib.contextmanager
def _prefect_api(ws: Workspace) -> Iterator[None]:
    """The workspace's embedded Prefect server (or the shared one PREFECT_API_URL names), its address a setting so
    that other processes (Dask workers, served runs) reach the same server."""
    _prefect_env(ws)
    api_url = _start_ephemeral_server()
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}) if api_url else contextlib.nullcontext():
        if api_url and _alone_on_embedded_database():
            from flows.execution import apply_limits

            apply_limits(ws.params().execution, free_slots=True)
        yield


_DATABASE_LOCK: list[int] = []


def _alone_on_embedded_database() -> bool:
    """True when no other anchor process uses this Prefect home's database: each holds a shared lock on it for
    its life, so an exclusive one succeeds only alone (then becomes shared too)."""
    import fcntl

    path = Path(os.environ["PREFECT_HOME"]) / "anchor-embedded.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        alone = True
    except BlockingIOError:
        alone = False
    fcntl.flock(fd, fcntl.LOCK_SH)
    _DATABASE_LOCK.append(fd)  # held until the process ends
    return alone


class _progress:
    """A rich progress display shared by the stages of a flow (they report from Prefect's worker threads). Without a
    terminal (CI logs, pipes) the bars are off and each phase prints one line instead, so a log still says what a
    run was doing, waiting for another run's lock included."""

    def __enter__(self) -> Any:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=err, transient=False, disable=not err.is_terminal)
        self.bar.start()
        bar = self.bar

        class _Adapter:
            def __init__(self, stage: str, identity: str) -> None:
                self.task: Any = None
                self.identity = identity

            def start(self, description: str, total: int) -> None:
                label = f"[{self.identity}] {description}"
                if not err.is_terminal:
                    err.print(label, markup=False, highlight=False, soft_wrap=True)
                if self.task is None:
                    self.task = bar.add_task(label, total=total)
                else:
                    bar.update(self.task, description=label, total=total, completed=0)

            def advance(self, n: int = 1) -> None:
                if self.task is not None:
                    bar.advance(self.task, n)

        return _Adapter

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()


def _print_summary(ws: Workspace, summary: dict[str, Any]) -> None:
    from core.artifacts import read_manifest

    name = summary["identity"]
    table = Table(title=f"onboard {name}  (run {summary['run_id'][:8]})")
    for col in ("stage", "status", "seconds", "output", "details"):
        table.add_column(col)
    for stage, res in summary["stages"].items():
        man = read_manifest(ws.root / res["path"]) or {}
        s = man.get("summary", {})
        if stage == "ingest":
            detail = (f"{s.get('frames')} frames, clips train {s['clips']['train']} / test {s['clips']['test']}, "
                      f"crop {s['crop']['side']} px")
        elif stage == "keypoints":
            rates = s.get("detection_rate", {})
            detail = ", ".join(f"{k} {v:.1%}" for k, v in rates.items())
        elif stage == "matting":
            detail = f"{s.get('backend')}, {s.get('frames')} frames"
        elif stage == "smplx_fit":
            errs = ", ".join(f"{k} {v:.1f}%" for k, v in (s.get("error_pct") or {}).items() if v is not None)
            detail = f"median error {errs}; jitter x{s.get('jitter_ratio')} of detections"
        elif stage == "perturb":
            detail = f"{s.get('copies')} copies of {s.get('frames_per_copy')} frames, sigma {s.get('sigma_transl_m')} m"
        elif stage == "render_mesh":
            detail = (f"{s.get('frames')} + {s.get('perturbed_frames')} perturbed at {s.get('resolution')} px, "
                      f"faces visible {s.get('faces_visible')}")
        else:
            detail = f"{s.get('original_name')}, sha256 {s.get('source_sha256', '')[:12]}"
        status = "cached" if res["cache_hit"] else "ran"
        seconds = f"{man.get('duration_s', 0):.1f}" if not res["cache_hit"] else "-"
        table.add_row(stage, status, seconds, res["path"], detail)
    out.print(table)
    notes = (read_manifest(ws.artifact_dir("ingest", name)) or {}).get("summary", {}).get("note")
    if notes:
        out.print(f"note: {notes}")


# ---------------------------------------------------------------------------------------------------- stages
@stage_app.command("run")
def stage_run(stage: Annotated[str, typer.Argument(help="Stage name (see `anchor stage list`).")],
              identity: Annotated[str | None, typer.Argument(help="Identity name (none for shared stages such "
                                                             "as pretrain).")] = None,
              video: Annotated[Path | None, typer.Option(help="Source video (the source stage only).")] = None
              ) -> None:
    """Run one stage for one identity now, without Prefect (this is what `dvc repro` calls)."""
    import time
    import uuid

    from core.artifacts import now_iso
    from core.errors import InputError
    from core.workspace import SHARED
    from tasks import registry, runner

    ws = _ws()
    spec = registry.get(stage)
    if spec.command and spec.external_input:
        raise InputError(f"{stage} is made by `{spec.command.format(item=identity or 'NAME')}`")
    if spec.shared:
        if identity:
            raise InputError(f"{stage} is built from all identities at once: run `anchor stage run {stage}`")
        identity = SHARED
    elif identity is None:
        raise InputError(f"stage {stage} runs per identity: `anchor stage run {stage} NAME`")
    else:
        check_identity_name(identity)
    run_id, started, t0 = uuid.uuid4().hex, now_iso(), time.perf_counter()
    flow = "dvc" if _under_dvc() else "cli"
    with _progress() as factory:
        try:
            result = runner.execute(ws, stage, identity, external=video.resolve() if video else None,
                                    progress=factory(stage, identity))
        except Exception as exc:
            runner.record(ws, run_id=run_id, flow=flow, stage=stage, identity=identity, status="failed",
                          cache_hit=False, started_at=started, duration_s=round(time.perf_counter() - t0, 3),
                          error=str(exc))
            raise
    runner.record(ws, run_id=run_id, flow=flow, stage=stage, identity=identity, status="completed",
                  cache_hit=False, result=result.to_dict())
    out.print(f"{stage}[{identity}] → {result.path}  {result.output_hash[:12]}  {result.duration_s:.1f} s",
              markup=False, highlight=False)
    if stage == "finetune":  # every new model is a version, however it was made (`dvc repro` calls this)
        from flows.versions import record_version

        v = record_version(ws, identity, run_id, commit=not _under_dvc())
        _print_version(identity, v, "; commit dvc.lock and versions.yaml after `dvc repro`"
                       if v["new"] and _under_dvc() else "")


@stage_app.command("list")
def stage_list() -> None:
    """The stage registry: inputs, params section, module."""
    from tasks.registry import STAGES

    table = Table("stage", "inputs", "params", "module", "what it makes")
    for spec in STAGES.values():
        inputs = ", ".join(spec.inputs) or (f"--{spec.external_input}" if spec.external_input else "")
        table.add_row(spec.name, inputs, spec.params or "", spec.module, spec.description)
    out.print(table)


# ---------------------------------------------------------------------------------------------------- dvc
@dvc_app.command("sync")
def dvc_sync() -> None:
    """Write dvc.yaml from the stage registry."""
    from core.dvcfile import render
    from tasks.registry import STAGES

    ws = _ws()
    ws.dvc_yaml.write_text(render(STAGES.values()))
    if not ws.identities_path.exists():
        ws.identities_path.write_text("identities: []\n")
    out.print(f"wrote {ws.dvc_yaml}")


@dvc_app.command("check")
def dvc_check() -> None:
    """Exit 1 when dvc.yaml differs from what the stage registry generates."""
    from core.dvcfile import render
    from tasks.registry import STAGES

    ws = _ws()
    current = ws.dvc_yaml.read_text() if ws.dvc_yaml.is_file() else ""
    if current != render(STAGES.values()):
        err.print(f"error: {ws.dvc_yaml} has drifted from the stage registry; run `anchor dvc sync`")
        raise typer.Exit(1)
    out.print("dvc.yaml matches the stage registry")


@app.command()
def push(name: Annotated[str, typer.Argument(help="Identity to push.")]) -> None:
    """Push one identity's source, data and checkpoints to the DVC remote (storage.remote in params.yaml)."""
    from flows.versioning import push as dvc_push

    check_identity_name(name)
    count, url = dvc_push(_ws(), name)
    out.print(f"pushed {count} file(s) of {name} to {url}")


@app.command()
def pull(name: Annotated[str, typer.Argument(help="Identity to pull.")]) -> None:
    """Restore one identity's tracked files from the DVC remote."""
    from flows.versioning import pull as dvc_pull

    check_identity_name(name)
    count, url = dvc_pull(_ws(), name)
    out.print(f"pulled {count} file(s) of {name} from {url}")


# ---------------------------------------------------------------------------------------------------- audit
@app.command()
def status(name: Annotated[str | None, typer.Argument(help="Only this identity.")] = None,
           as_json: Annotated[bool, typer.Option("--json", help="Machine-readable.")] = False) -> None:
    """Identities, their model versions, last runs, and which renders are stale (older model or params)."""
    from flows.versions import status as identity_status

    if name is not None:
        check_identity_name(name)
    rows = identity_status(_ws(), name)
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
        return
    table = Table("identity", "model", "versions", "last run", "renders", "stale")
    for r in rows:
        model = f"v{r['current_version']}" if r["current_version"] else ("-" if not r["current_model"] else
                                                                          r["current_model"][:12])
        last = r["last_run"]
        stale = [x for x in r["renders"] if x["stale"]]
        table.add_row(r["identity"], model, " ".join(f"v{v['version']}" for v in r["versions"]) or "-",
                      f"{last['flow']}/{last['stage']} {last['status']} {last['at']}" if last else "-",
                      str(len(r["renders"])), str(len(stale)))
    out.print(table)
    for r in rows:
        for x in r["renders"]:
            if x["stale"]:
                out.print(f"stale: {x['subject']}: {'; '.join(x['why'])}", markup=False, highlight=False)


@app.command()
def audit(name: Annotated[str | None, typer.Argument(help="Only this identity (and its renders).")] = None,
          as_json: Annotated[bool, typer.Option("--json", help="Machine-readable findings.")] = False) -> None:
    """Re-hash every artifact against its manifest and every DVC-tracked output against dvc.lock; exit 1 on any
    difference, naming the artifact and the stage that made it."""
    from flows.audit import audit as run_audit

    if name is not None:
        check_identity_name(name)
    ws = _ws()
    checked, findings = run_audit(ws, name)
    if as_json:
        print(json.dumps({"checked": checked, "findings": [f.to_dict() for f in findings]}, indent=2))
    else:
        for f in findings:
            err.print(f"{f.path}: {f.problem} (stage {f.stage}, {f.owner}; checked against {f.check})",
                      markup=False, highlight=False)
        out.print(f"{checked} artifacts checked, {len(findings)} problem(s)", highlight=False)
    if findings:
        raise typer.Exit(1)


@app.command()
def lineage(path: Annotated[Path, typer.Argument(help="Any artifact file or directory, or a video that `anchor render "
                                                "--out` wrote anywhere (found by its content).")],
            as_json: Annotated[bool, typer.Option("--json", help="Machine-readable list of steps.")] = False) -> None:
    """The chain from an artifact back to the source video: stage, hashes, params, code version, time."""
    from core.lineage import trace

    ws = _ws()
    steps = trace(ws, path)
    if as_json:
        print(json.dumps(steps, indent=2))
        return
    if steps and steps[0]["stage"] == "copy":
        copy = steps.pop(0)
        out.print(f"{copy['path']}: a copy (sha256 {copy['output_hash'][:16]}) of {copy['copy_of']}", markup=False,
                  highlight=False)
    for i, step in enumerate(steps):
        mark = "ok" if step["verified"] else "[red]MODIFIED[/red]"
        where = escape(f"[{step['identity']}] {step['path']}")
        out.print(f"{'  ' * i}[bold]{step['stage']}[/bold] {where}  {mark}")
        out.print(f"{'  ' * i}  output {step['output_hash'][:16]}  params {step['params_section']} "
                  f"{(step['params_hash'] or '-')[:12]}  code {step['code_version'].get('commit', '?')[:12]}"
                  f"{'+dirty' if step['code_version'].get('dirty') else ''}  at {step['finished_at']}")
        if "source_sha256" in step:
            out.print(f"{'  ' * i}  source sha256 {step['source_sha256']}  from {step['source_path']}")


@app.command()
def ledger(identity: Annotated[str | None, typer.Option(help="Only this identity.")] = None,
           last: Annotated[int, typer.Option(help="Show the last N rows.")] = 30,
           as_json: Annotated[bool, typer.Option("--json", help="All matching rows as JSON.")] = False) -> None:
    """The run ledger: every stage execution, cached or not."""
    from core import ledger as ledger_mod

    df = ledger_mod.read(_ws().ledger_dir)
    if identity:
        df = df[df["identity"] == identity]
    if as_json:
        print(df.to_json(orient="records", indent=2))
        return
    table = Table("started", "flow", "stage", "identity", "status", "cache", "seconds", "output")
    for row in df.tail(last).itertuples():
        table.add_row(row.started_at, row.flow, row.stage, row.identity, row.status, "hit" if row.cache_hit else "",
                      f"{row.duration_s:.2f}" if row.duration_s == row.duration_s else "", (row.output_hash or "")[:12])
    out.print(table)


@app.command()
def pretrain() -> None:
    """Stage 1: train the body and face SGDMs once on every onboarded identity (motion modules frozen)."""
    ws = _ws()
    _print_training(_run_flow(ws, "flows.train", "pretrain", str(ws.root)))


@app.command()
def finetune(name: Annotated[str, typer.Argument(help="Identity to finetune.")],
             evaluate: Annotated[bool, typer.Option("--evaluate/--no-evaluate", help="Then render the held-out "
                                                    "clips, score them and write the report.")] = True) -> None:
    """Stage 2: the identity's own body and face SGDMs, from the pretrained ones; then its evaluation report."""
    check_identity_name(name)
    ws = _ws()
    summary = _run_flow(ws, "flows.train", "finetune", str(ws.root), name, evaluate)
    _print_training(summary)
    _print_version(name, summary["version"])
    if "report" in summary:
        _print_report(summary["report_summary"], summary["report"])


@app.command()
def evaluate(name: Annotated[str, typer.Argument(help="Identity to evaluate (finetuned).")]) -> None:
    """Render NAME's own held-out clips, score them (FID, FVD, LMD, flicker) and write data/reports/NAME/."""
    check_identity_name(name)
    ws = _ws()
    # under `dvc repro`, DVC records the outputs itself (and holds its lock meanwhile)
    summary = _run_flow(ws, "flows.evaluate", "evaluate", str(ws.root), name, not _under_dvc())
    for key, res in summary["stages"].items():
        status = "cached" if res["cache_hit"] else f"ran {res.get('duration_s', 0):.1f} s"
        out.print(f"{key}: {status}", markup=False, highlight=False)
    _print_report(summary["summary"], summary["report"])


def _print_version(name: str, v: dict[str, Any], then: str = "") -> None:
    out.print(f"{name} model v{v['version']} ({'new' if v['new'] else 'unchanged'}, {v['finetune'][:12]})"
              + (f", git tag {v['git_tag']}" if v.get("git_tag") else "") + then, markup=False, highlight=False)


def _under_dvc() -> bool:
    return bool(os.environ.get("DVC_STAGE") or os.environ.get("DVC_ROOT"))


def _print_report(summary: dict[str, Any], path: str) -> None:
    shown = []
    for key, value in summary.get("metrics", {}).items():
        shown.append(f"{key} {value:.4g}" if isinstance(value, int | float) else f"{key} not computed")
    out.print(f"held-out {summary.get('frames')} frames: " + ", ".join(shown), markup=False, highlight=False)
    out.print(f"report: {path}", markup=False, highlight=False, soft_wrap=True)


@app.command()
def render(
        name: Annotated[str, typer.Argument(help="Identity to render (finetuned).")],
        motion: Annotated[str, typer.Option("--motion", "-m", help="NAME:test (an identity's held-out clips), a "
                                            "video of anyone, or a motion file (.npz/.npy/.pkl/.parquet).")],
        out_path: Annotated[Path | None, typer.Option("--out", "-o", help="Where to copy the finished mp4 "
                                                      "(default: leave it under data/renders/).")] = None,
        frames: Annotated[int | None, typer.Option("--frames", min=1, help="Only the first N frames.")] = None,
        seed: Annotated[int | None, typer.Option("--seed", min=0, help="Overrides render_body/face seed.")] = None,
        no_face: Annotated[bool, typer.Option("--no-face", help="Skip the face stage.")] = False,
) -> None:
    """A new video of NAME following a motion: batch-overlapped denoising, face inpainting, H.264 with audio."""
    from core.errors import InputError

    check_identity_name(name)
    if not motion.endswith(":test"):
        path = Path(motion).expanduser()
        if not path.is_file():
            raise InputError(f"--motion {motion}: expected NAME:test, a video file or a motion file; no such file")
        motion = str(path.resolve())
    ws = _ws()
    summary = _run_flow(ws, "flows.render", "render", str(ws.root), name, motion,
                        str(out_path.expanduser().resolve()) if out_path else None, frames, seed, not no_face)
    for key, res in summary["stages"].items():
        status = "cached" if res["cache_hit"] else f"ran {res.get('duration_s', 0):.1f} s"
        out.print(f"{key}: {status}")
    s = summary["summary"]
    out.print(f"{s['frames']} frames at {s['fps']} fps, audio {'yes' if s['audio'] else 'no'}, "
              f"{s['faces_enhanced']} faces enhanced; model {str(s['model_version'])[:12]}, "
              f"motion {str(s['motion_hash'])[:12]}")
    out.print(f"video: {summary['video']}", markup=False, highlight=False, soft_wrap=True)


def _print_training(summary: dict[str, Any]) -> None:
    for key, res in summary["stages"].items():
        status = "cached" if res["cache_hit"] else f"ran {res.get('duration_s', 0):.1f} s"
        out.print(f"{key}: {status} → {res['path']}", markup=False, highlight=False)
        for which in ("body", "face"):
            s = (res.get("summary") or {}).get(which)
            if s:
                out.print(f"  {which}: {s['steps']} steps (from {s['resumed_at']}), loss {s['loss_first']} → "
                          f"{s['loss_last']}, {s['samples']} clips of {s['identities']} identities")


# ---------------------------------------------------------------------------------------------------- schedules
@app.command()
def rerender(name: Annotated[str | None, typer.Argument(help="Only this identity's renders.")] = None) -> None:
    """Re-render every stale render (newer model version or changed render params) now; current ones stay."""
    if name:
        check_identity_name(name)
    ws = _ws()
    summary = _run_flow(ws, "flows.rerender", "rerender", str(ws.root), name)
    for subject, why in summary["redone"].items():
        out.print(f"redone {subject}: {'; '.join(why)}", markup=False, highlight=False)
    out.print(f"{len(summary['redone'])} re-rendered, {len(summary['current'])} already current")


@schedule_app.command("rerender")
def schedule_rerender(
        cron: Annotated[str, typer.Option("--cron", help='When, as a cron line, e.g. "0 3 * * *" (03:00 daily).')],
        timezone: Annotated[str | None, typer.Option("--timezone", help="IANA zone of the cron line (default "
                                                     "UTC), e.g. Europe/Paris.")] = None,
        name: Annotated[str | None, typer.Option("--identity", help="Only this identity's renders.")] = None,
) -> None:
    """Register the re-render of stale renders as a Prefect deployment on a cron schedule."""
    from core.errors import InputError

    if name:
        check_identity_name(name)
    try:
        from prefect.schedules import Cron

        Cron(cron, timezone=timezone)
    except ValueError as exc:
        raise InputError(f"--cron {cron!r} / --timezone {timezone!r}: {exc}") from None
    ws = _ws()
    with _prefect_api(ws):  # flows.rerender imports Prefect, which reads its settings at import: after this
        from flows.rerender import deployments, save_schedule

        save_schedule(ws, cron, timezone, name)
        for deployment in deployments(ws):
            deployment_id = deployment.apply()
            out.print(f"deployment rerender/{deployment.name} ({deployment_id}): {cron}"
                      f"{' ' + timezone if timezone else ' UTC'}; run it with `anchor serve`",
                      markup=False, highlight=False)


@app.command()
def serve() -> None:
    """Serve the workspace's scheduled flows with Prefect until stopped (Ctrl-C); runs appear in Prefect's UI."""
    from core.errors import InputError

    ws = _ws()
    with _prefect_api(ws):  # flows.rerender imports Prefect, which reads its settings at import: after this
        from prefect import serve as prefect_serve

        from flows.rerender import deployments

        found = deployments(ws)
        if not found:
            raise InputError("nothing is scheduled here; first `anchor schedule rerender --cron \"0 3 * * *\"`")
        out.print(f"serving {', '.join('rerender/' + d.name for d in found)}", markup=False, highlight=False)
        prefect_serve(*found)


# ---------------------------------------------------------------------------------------------------- motion
@motion_app.command("import")
def motion_import(
        motion: Annotated[Path, typer.Argument(help="AMASS/BEAT2 .npz, TalkSHOW .npy, SHOW .pkl, a smplx_fit "
                                               "params.parquet (or its folder), or a video of any person.")],
        identity: Annotated[str, typer.Option("--identity", "-i", help="Identity to retarget onto.")],
        out_path: Annotated[Path | None, typer.Option("--out", help="Parquet file to write (default: "
                                                      "data/motions/<identity>/<name>.parquet).")] = None,
        clip: Annotated[str | None, typer.Option(help="One clip of a fit table.")] = None) -> None:
    """Read a motion, resample it to 30 fps and retarget it onto an identity's shape, camera and framing."""
    from core.errors import InputError
    from tasks.motion import is_video

    check_identity_name(identity)
    ws = _ws()
    motion = motion.expanduser()
    if not motion.exists():
        raise InputError(f"{motion}: no such file")
    target = out_path or ws.data / "motions" / identity / f"{motion.stem}.parquet"
    if is_video(motion):
        from tasks import video as vio

        vio.probe(motion)
        info = _run_flow(ws, "flows.motion", "import_motion", str(ws.root), identity, str(motion.resolve()),
                         str(target), clip)
    else:
        from flows.motion import import_motion

        info = import_motion.fn(str(ws.root), identity, str(motion.resolve()), str(target), clip)
    out.print(f"{info['source_format']}: {info['source_frames']} frames at {info['source_fps']:g} fps → "
              f"{info['frames']} frames at 30 fps ({info['seconds']:.1f} s), retargeted onto {identity}")
    out.print(f"wrote {info['out']}")


# ---------------------------------------------------------------------------------------------------- bench
@bench_app.command("preprocess")
def bench_preprocess(video: Annotated[Path, typer.Option("--video", help="Video to preprocess.")],
                     as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False) -> None:
    """Frames/s and peak memory of ingest, keypoints and matting (keypoints ∥ matting, as the flow runs them)."""
    from cli.bench import preprocess
    from tasks import video as vio

    vio.probe(video)
    result = preprocess(video.resolve())
    if as_json:
        print(json.dumps(result))
        return
    table = Table("stage", "frames/s", "seconds", "peak RSS MB",
                  title=f"preprocess {video.name}: {result['frames']} frames")
    for stage in ("ingest", "keypoints", "matting"):
        table.add_row(stage, f"{result['fps'][stage]:.1f}", f"{result['seconds'][stage]:.1f}",
                      f"{result['peak_rss_mb_by_stage'][stage]:.0f}")
    table.add_row("total", f"{result['fps_total']:.1f}", f"{result['seconds']['total']:.1f}",
                  f"{result['peak_rss_mb']:.0f}")
    out.print(table)


@bench_app.command("smplx")
def bench_smplx(video: Annotated[Path, typer.Option("--video", help="Video to fit and render.")],
                as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False) -> None:
    """SMPL-X fit and mesh-render frames/s with the fit's error and jitter (preprocessing runs first, untimed)."""
    from cli.bench import smplx
    from tasks import video as vio

    vio.probe(video)
    result = smplx(video.resolve())
    if as_json:
        print(json.dumps(result))
        return
    table = Table("figure", "value", title=f"smplx {video.name}: {result['frames']} frames")
    table.add_row("fit frames/s", f"{result['fit_fps']:.1f}")
    table.add_row(f"render frames/s ({result['render']['resolution']} px, all outputs)", f"{result['render_fps']:.1f}")
    for part in ("body", "hands", "face"):
        pct, px = result["err_pct"][part], result["err_px"][part]
        table.add_row(f"median error {part}", "n/a (not detected)" if pct is None else f"{pct:.2f} % ({px:.1f} px)")
    table.add_row("jitter fit / detections", f"{result['jitter_ratio']:.3f}")
    out.print(table)


@bench_app.command("train")
def bench_train(profile: Annotated[str, typer.Option("--profile", help="tiny, or sd15-shapes (the full-size "
                                                     "architecture with random weights: one step, no files)")] = "tiny",
                as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False) -> None:
    """Training speed and peak memory: pretrain and finetune steps/s (tiny), or one full-size step (sd15-shapes)."""
    from core.errors import InputError

    if profile == "tiny":
        from cli.bench import train_tiny

        result = train_tiny()
    elif profile == "sd15-shapes":
        from models.shapes import sd15_shapes_models, time_train_step

        timed = time_train_step(sd15_shapes_models(gradient_checkpointing=True), size=256, frames=4, batch=1)
        result = {"profile": "sd15-shapes", "step_s": round(timed["step_s"], 2), "peak_rss_mb": timed["peak_rss_mb"],
                  "params_m": timed.get("params_m"), "trainable_m": timed.get("trainable_m")}
    else:
        raise InputError(f"--profile {profile!r}: choose tiny or sd15-shapes")
    if as_json:
        print(json.dumps(result))
        return
    table = Table("figure", "value", title=f"bench train --profile {profile}")
    for key, value in result.items():
        table.add_row(key, str(value))
    out.print(table)


@bench_app.command("render")
def bench_render(profile: Annotated[str, typer.Option("--profile", help="tiny (random weights, no files)")] = "tiny",
                 frames: Annotated[int, typer.Option("--frames", min=1, help="Motion length.")] = 300,
                 steps: Annotated[int, typer.Option("--steps", min=1, help="DDIM steps.")] = 20,
                 as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False) -> None:
    """render_body frames/s, denoiser frame evaluations per step and peak memory: overlapped windows (16/4),
    disjoint windows and frame by frame, on a synthetic gesturing mannequin."""
    from core.errors import InputError

    if profile != "tiny":
        raise InputError(f"--profile {profile!r}: only tiny (the others need trained weights)")
    from cli.bench import render_tiny

    result = render_tiny(frames, steps)
    if as_json:
        print(json.dumps(result))
        return
    table = Table("layout", "frames/s", "frame evals / step", "peak RSS MB", "seconds",
                  title=f"bench render --profile tiny --frames {frames} ({steps} steps)")
    for mode in ("overlapped", "disjoint", "framewise"):
        r = result[mode]
        table.add_row(mode, str(r["fps"]), str(r["frame_evals_per_step"]), str(r["peak_rss_mb"]), str(r["seconds"]))
    out.print(table)
    out.print("paper (Algorithm 1, 300 frames, window 16, overlap 4): 400 frame evaluations per step")


@bench_app.command("quality")
def bench_quality(video: Annotated[Path, typer.Option("--video", help="Video of one person, about a minute.")],
                  profile: Annotated[str, typer.Option("--profile", help="cpu (trains from scratch), or sd15 with "
                                                       "local weights set in a --workspace's params.yaml")] = "cpu",
                  workspace: Annotated[Path | None, typer.Option("--workspace", help="Run here and keep everything "
                                                                 "(report included); default: a temporary "
                                                                 "directory, removed afterwards.")] = None,
                  as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False) -> None:
    """Learns the person from the first 70% of the video and renders the last 30% from its own fitted motion:
    MediaPipe pose/face found in the generated frames, body landmark distance (% of the frame) and SSIM inside the
    person against the real frames, the same for the "nearest training frame" baseline, and training minutes.
    Runs the `make demo` commands (about 23 minutes on 2 cores for a 20 s clip); their progress goes to stderr."""
    import shutil
    import tempfile

    from cli.bench import QUALITY_KEYS, quality
    from core.errors import InputError
    from tasks import video as vio

    if profile not in ("cpu", "sd15", "tiny"):
        raise InputError(f"--profile {profile!r}: choose cpu, sd15 or tiny")
    vio.probe(video)
    root = workspace.expanduser().resolve() if workspace else Path(tempfile.mkdtemp(prefix="anchor-quality-"))
    try:
        result = quality(video.resolve(), root, profile, log=sys.stderr)
    finally:
        if workspace is None:
            shutil.rmtree(root, ignore_errors=True)
    if as_json:
        print(json.dumps({k: result[k] for k in QUALITY_KEYS}))
        return
    table = Table("figure", "model", "nearest training frame", "target",
                  title=f"bench quality {video.name}: {result['frames']} held-out frames at {result['resolution']} px")
    def num(v: float | None, fmt: str) -> str:
        return "—" if v is None else fmt.format(v)

    table.add_row("pose found", num(result["pose_rate"], "{:.1%}"), num(result["nn_pose_rate"], "{:.1%}"), "≥ 98%")
    table.add_row("face found", num(result["face_rate"], "{:.1%}"), num(result["nn_face_rate"], "{:.1%}"), "≥ 95%")
    table.add_row("LMD body, % of frame", num(result["lmd_body_pct"], "{:.2f}"), num(result["nn_lmd_body_pct"],
                  "{:.2f}"), "≤ 1.5, below baseline")
    table.add_row("SSIM in the person", num(result["ssim_person"], "{:.3f}"), num(result["nn_ssim_person"], "{:.3f}"),
                  "≥ 0.80, above baseline")
    table.add_row("training minutes", f"{result['train_min']:.1f}", "", "≤ 20")
    table.add_row("total minutes (onboard → report)", f"{result['total_min']:.1f}", "", "≤ 30")
    out.print(table)
    if workspace is not None:
        out.print(f"report: {result['report']}")


def main() -> None:
    try:
        app()
    except AnchorError as exc:
        err.print(f"error: {exc}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted: completed stages are kept; run the same command to resume", highlight=False)
        sys.exit(130)


if __name__ == "__main__":
    main()
