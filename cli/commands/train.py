"""anchor pretrain, finetune, evaluate: the two training stages and the evaluation report."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from cli import show
from cli.app import app, out, say
from cli.env import run_flow, under_dvc, workspace
from core.workspace import check_identity_name


@app.command()
def pretrain() -> None:
    """Stage 1: train the body and face SGDMs once on every onboarded identity (motion modules frozen)."""
    ws = workspace()
    show_training(run_flow(ws, "flows.train", "pretrain", str(ws.root)))


@app.command()
def finetune(name: Annotated[str, typer.Argument(help="Identity to finetune.")],
             evaluate: Annotated[bool, typer.Option("--evaluate/--no-evaluate", help="Then render the held-out "
                                                    "clips, score them and write the report.")] = True) -> None:
    """Stage 2: the identity's own body and face SGDMs, from the pretrained ones; then its evaluation report."""
    check_identity_name(name)
    ws = workspace()
    summary = run_flow(ws, "flows.train", "finetune", str(ws.root), name, evaluate)
    show_training(summary)
    show.version(name, summary["version"])
    if "report" in summary:
        from tasks.stages import report

        say(report.STAGE.summary_line(summary["report_summary"]))
        say(f"report: {summary['report']}")


@app.command()
def evaluate(name: Annotated[str, typer.Argument(help="Identity to evaluate (finetuned).")]) -> None:
    """Render NAME's own held-out clips, score them (FID, FVD, LMD, flicker) and write data/reports/NAME/."""
    check_identity_name(name)
    ws = workspace()
    # under `dvc repro`, DVC records the outputs itself (and holds its lock meanwhile)
    summary = run_flow(ws, "flows.evaluate", "evaluate", str(ws.root), name, not under_dvc())
    show.runs(summary["stages"])
    say(f"report: {summary['report']}")


def show_training(summary: dict[str, Any]) -> None:
    """Each training stage's output, and per model its steps, loss and data."""
    for key, res in summary["stages"].items():
        status = "cached" if res["cache_hit"] else f"ran {res.get('duration_s', 0):.1f} s"
        out.print(f"{key}: {status} → {res['path']}", markup=False, highlight=False)
        for which in ("body", "face"):
            s = (res.get("summary") or {}).get(which)
            if s:
                out.print(f"  {which}: {s['steps']} steps (from {s['resumed_at']}), loss {s['loss_first']} → "
                          f"{s['loss_last']}, {s['samples']} clips of {s['identities']} identities")
