"""Training flows: pretrain once over every onboarded identity, then finetune each identity from it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.context import get_run_context

from core.workspace import SHARED, Workspace
from flows.evaluate import evaluation
from flows.render import stage_summary
from flows.stage_task import StageRunner
from flows.versioning import commit_identity, commit_shared
from flows.versions import record_version
from tasks.report import HTML as REPORT_HTML


def _runner(ws: Workspace, name: str) -> StageRunner:
    ctx = get_run_context()
    return StageRunner(ws, str(ctx.flow_run.id), flow=name)  # type: ignore[union-attr]


def _summary(stages: StageRunner, committed: list[str]) -> dict[str, Any]:
    return {"run_id": stages.run_id, "stages": stage_summary(stages, qualified=True), "dvc": committed}


@flow(name="pretrain", log_prints=False)
def pretrain(workspace: str) -> dict[str, Any]:
    ws = Workspace(Path(workspace))
    stages = _runner(ws, "pretrain")
    stages.run("pretrain", SHARED)
    return _summary(stages, commit_shared(ws, "pretrain"))


@flow(name="finetune", flow_run_name="finetune-{identity}", log_prints=False)
def finetune(workspace: str, identity: str, evaluate: bool = True) -> dict[str, Any]:
    """Then, unless told not to, the evaluation protocol: the held-out clips rendered, scored and reported."""
    ws = Workspace(Path(workspace))
    stages = _runner(ws, "finetune")
    stages.run("finetune", identity)
    report = evaluation(ws, stages, identity) if evaluate else None
    out = _summary(stages, commit_identity(ws, identity))
    out["version"] = record_version(ws, identity, stages.run_id)
    if report is not None:
        out["report"] = str(ws.root / report["path"] / REPORT_HTML)
        out["report_summary"] = report["summary"]
    return out
