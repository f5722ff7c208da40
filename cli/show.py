"""How commands show results: the stages a flow ran, each in its own words (its declared summary)."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.table import Table

from cli.app import out, say
from core.workspace import Workspace


def runs(stages: dict[str, dict[str, Any]]) -> None:
    """One line per stage a flow ran: cached or its time, then the stage's own summary."""
    from tasks import registry

    for key, res in stages.items():
        status = "cached" if res["cache_hit"] else f"ran {res.get('duration_s', 0):.1f} s"
        line = registry.get(key.split("[")[0]).summary_line(res.get("summary") or {})
        say(f"{key}: {status}" + (f": {line}" if line else ""))


def stage_table(ws: Workspace, summary: dict[str, Any], title: str | None = None) -> None:
    """A flow's stages as a table: cached or ran, seconds, output, and each stage's own one-line summary."""
    from core.artifacts import read_manifest
    from tasks import registry

    table = Table(title=title or f"onboard {summary['identity']}  (run {summary['run_id'][:8]})")
    for col in ("stage", "status", "seconds", "output", "details"):
        table.add_column(col)
    for key, res in summary["stages"].items():
        man = read_manifest(ws.root / res["path"]) or {}
        stage = registry.get(key.split("[")[0])
        detail = stage.summary_line(man.get("summary") or {})
        status = "cached" if res["cache_hit"] else "ran"
        seconds = f"{man.get('duration_s', 0):.1f}" if not res["cache_hit"] else "-"
        table.add_row(escape(key), status, seconds, escape(res["path"]), escape(detail))
    out.print(table)
    if "identity" in summary:
        notes = (read_manifest(registry.artifact_dir(ws, "ingest", summary["identity"])) or {}).get(
            "summary", {}).get("note")
        if notes:
            say(f"note: {notes}")


def version(name: str, v: dict[str, Any], then: str = "") -> None:
    say(f"{name} model v{v['version']} ({'new' if v['new'] else 'unchanged'}, {v['finetune'][:12]})"
        + (f", git tag {v['git_tag']}" if v.get("git_tag") else "") + then)
