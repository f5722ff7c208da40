"""Onboard one identity: source → ingest → (keypoints ∥ matting) → smplx_fit → perturb → render_mesh, then record
the outputs in DVC."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.context import get_run_context

from core.workspace import Workspace
from flows.stage_task import StageRunner
from flows.versioning import commit_identity


@flow(name="onboard", flow_run_name="onboard-{identity}", log_prints=False)
def onboard(workspace: str, identity: str, video: str) -> dict[str, Any]:
    ws = Workspace(Path(workspace))
    ws.register_identity(identity)
    ctx = get_run_context()
    stages = StageRunner(ws, str(ctx.flow_run.id), flow="onboard")  # type: ignore[union-attr]
    stages.run("source", identity, external=Path(video))
    stages.run("ingest", identity)
    stages.run_many(["keypoints", "matting"], identity)
    stages.run("smplx_fit", identity)
    stages.run("perturb", identity)
    stages.run("render_mesh", identity)
    committed = commit_identity(ws, identity)
    return {
        "identity": identity,
        "run_id": stages.run_id,
        "stages": {stage: {**result, "cache_hit": stages.cache_hits[(stage, ident)]}
                   for (stage, ident), result in stages.results.items()},
        "dvc": committed,
    }
