"""Training flows: pretrain once over every onboarded identity, then finetune each identity from it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from core.workspace import SHARED, Workspace
from flows.dvc_store import commit_identity, commit_shared
from flows.evaluate import evaluation
from flows.render import stage_summary
from flows.stage_task import StageRunner
from flows.versions import record_version, tag_version
from tasks import registry
from tasks.stages.report import HTML as REPORT_HTML


def pretrain_shared(ws: Workspace, stages: StageRunner) -> list[str]:
    """The pretrain flow's stages (shared: built once from every identity)."""
    names = registry.in_flow("pretrain")
    stages.run_steps(registry.layers(names), SHARED)
    return [t for name in names for t in commit_shared(ws, name)]


def finetune_identity(ws: Workspace, stages: StageRunner, identity: str, evaluate: bool = True) -> dict[str, Any]:
    """finetune → dvc.lock and a version number for the new weights → (held-out render, metrics, report)."""
    stages.run_steps(registry.layers(registry.in_flow("finetune")), identity)
    # numbered before the evaluation, committed and tagged after it whatever its outcome: a failed evaluation
    # leaves the new model a version (and a good one is tagged with its report's dvc.lock entry)
    version = record_version(ws, identity, stages.run_id, commit=False)
    out: dict[str, Any] = {"dvc": commit_identity(ws, identity), "version": version}
    try:
        if evaluate:
            report = evaluation(ws, stages, identity)
            out["dvc"] = sorted({*out["dvc"], *commit_identity(ws, identity)})
            out["report"] = str(ws.root / report["path"] / REPORT_HTML)
            out["report_summary"] = report["summary"]
    finally:
        if version["new"]:
            version["git_tag"] = tag_version(ws, identity, version["version"])
    return out


@flow(name="pretrain", log_prints=False)
def pretrain(workspace: str) -> dict[str, Any]:
    ws = Workspace(Path(workspace))
    stages = StageRunner.of_this_run(ws, "pretrain")
    committed = pretrain_shared(ws, stages)
    return {"run_id": stages.run_id, "stages": stage_summary(stages, qualified=True), "dvc": committed}


@flow(name="finetune", flow_run_name="finetune-{identity}", log_prints=False)
def finetune(workspace: str, identity: str, evaluate: bool = True) -> dict[str, Any]:
    """Then, unless told not to, the evaluation protocol: the held-out clips rendered, scored and reported."""
    ws = Workspace(Path(workspace))
    stages = StageRunner.of_this_run(ws, "finetune")
    out = finetune_identity(ws, stages, identity, evaluate)
    return {"run_id": stages.run_id, "stages": stage_summary(stages, qualified=True), **out}
