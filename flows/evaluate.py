"""Evaluate one identity: render its own held-out clips with its finetuned model, score them, write its report.

This is the evaluation protocol of the paper (Table I) run per identity, and what `anchor finetune` does after
training. The render goes through the same cached stages as `anchor render NAME --motion NAME:test`, so either one
makes the other a cache hit. The report (data/reports/<identity>/) is a DVC stage whose metrics and plots
`dvc metrics show/diff` and `dvc plots show` read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from core.workspace import Workspace, check_identity_name
from flows.dvc_store import commit_identity
from flows.render import TEST_SUFFIX, render_stages, stage_summary
from flows.stage_task import StageRunner
from tasks import registry
from tasks.stages import report


def evaluation(ws: Workspace, stages: StageRunner, identity: str) -> dict[str, Any]:
    """held-out render, then the evaluate flow's stages (metrics on the render, the identity's report); returns the
    report's result."""
    subject, _ = render_stages(ws, stages, identity, identity + TEST_SUFFIX)
    render_dir = registry.artifact_dir(ws, "motion", subject).parent
    results: dict[str, Any] = {}
    for step in registry.layers(registry.in_flow("evaluate")):
        for name in step:
            spec = registry.get(name)
            owner = subject if spec.render else identity
            results[name] = stages.run(name, owner, external=render_dir if spec.external == "evaluation" else None)
    return results[report.STAGE.name]


@flow(name="evaluate", flow_run_name="evaluate-{identity}", log_prints=False)
def evaluate(workspace: str, identity: str, commit: bool = True) -> dict[str, Any]:
    """`commit=False` under `dvc repro`, which records the outputs itself (and holds DVC's lock meanwhile)."""
    ws = Workspace(Path(workspace))
    check_identity_name(identity)
    stages = StageRunner.of_this_run(ws, "evaluate")
    result = evaluation(ws, stages, identity)
    return {"identity": identity, "run_id": stages.run_id, "report": str(ws.root / result["path"] / report.HTML),
            "summary": result["summary"], "stages": stage_summary(stages, qualified=True),
            "dvc": commit_identity(ws, identity) if commit else []}
