"""anchor status, audit, lineage, ledger: what exists, whether it is intact, where it came from, what ran."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from cli.app import app, err, out
from cli.env import workspace
from core.workspace import check_identity_name


@app.command()
def status(name: Annotated[str | None, typer.Argument(help="Only this identity.")] = None,
           as_json: Annotated[bool, typer.Option("--json", help="Machine-readable.")] = False) -> None:
    """Identities, their model versions, last runs, and which renders are stale (older model or params)."""
    from flows.versions import status as identity_status

    if name is not None:
        check_identity_name(name)
    rows = identity_status(workspace(), name)
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
            motion = x.get("motion") or {}
            if motion.get("kind") == "speech":
                out.print(f"speech: {x['subject']}: audio {motion.get('audio_source')} (sha256 "
                          f"{(motion.get('audio_sha256') or '?')[:12]}), speech model "
                          f"{(motion.get('speech_model') or '?')[:12]}"
                          + (f", superseded by {x['superseded_by']}" if x.get("superseded_by") else ""),
                          markup=False, highlight=False, soft_wrap=True)
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
    ws = workspace()
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

    ws = workspace()
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
                  f"{'+dirty' if step['code_version'].get('dirty') else ''}  at {step['finished_at']}", markup=False,
                  highlight=False)
        if step.get("speech_model"):
            out.print(f"{'  ' * i}  speech: audio {step['audio_source']} (sha256 {step['audio_sha256'][:16]}), speech "
                      f"model {step['speech_model'][:16]}", markup=False, highlight=False)
        if "source_sha256" in step:
            out.print(f"{'  ' * i}  source sha256 {step['source_sha256']}  from {step['source_path']}", markup=False,
                      highlight=False)


@app.command()
def ledger(identity: Annotated[str | None, typer.Option(help="Only this identity.")] = None,
           last: Annotated[int, typer.Option(help="Show the last N rows.")] = 30,
           as_json: Annotated[bool, typer.Option("--json", help="All matching rows as JSON.")] = False) -> None:
    """The run ledger: every stage execution, cached or not."""
    from core import ledger as ledger_mod

    df = ledger_mod.read(workspace().ledger_dir)
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
