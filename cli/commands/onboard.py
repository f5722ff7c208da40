"""anchor onboard: one identity from its video, or several at once (and, with --train, trained)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from cli import show
from cli.app import app, out
from cli.env import run_flow, workspace
from core.workspace import Workspace, check_identity_name


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
        ws = workspace()
        path = _check_video(ws, name, video)
        from flows import cached
        from tasks import devices, registry

        devices.check(registry.params(ws).execution.device)  # refused as every flow command refuses it
        summary = cached.onboard(ws, name, path) or run_flow(ws, "flows.onboard", "onboard", str(ws.root), name,
                                                             str(path))
        show.stage_table(ws, summary)
        return
    pairs = _pairs(targets, manifest)
    ws = workspace()
    videos = {name: str(_check_video(ws, name, path)) for name, path in pairs.items()}
    summary = run_flow(ws, "flows.onboard", "onboard_many", str(ws.root), videos, train, evaluate)
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
    from tasks import registry
    from tasks import video as vio
    from tasks.stages.ingest import check_person
    from tasks.stages.source import source_file

    video = video.expanduser()
    vio.probe(video)
    video = video.resolve()
    known = registry.artifact_dir(ws, "source", name)
    manifest = read_manifest(known)
    if not (manifest and manifest.get("summary", {}).get("source_sha256") == sha256_file(video)
            and source_file(known).is_file()):
        check_person(video, registry.params(ws).ingest)
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
