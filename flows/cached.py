"""A run whose every stage is already made needs no orchestrator.

Starting Prefect's embedded server and importing its engine take most of a cached command's time, and a cached
run never uses them. So the command line first asks the runner whether each stage of the flow has its artifact
under its current cache key (verified against its manifest); when all do, the run is recorded in the ledger as
cache hits, as a flow run would record it, and nothing starts. This module imports no Prefect.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from core.artifacts import now_iso
from core.workspace import Workspace, check_identity_name
from flows.dvc_store import commit_identity
from tasks import registry, runner


def onboard(ws: Workspace, identity: str, video: Path) -> dict[str, Any] | None:
    """The onboard flow's summary when every one of its stages is cached for `identity` from `video`; None when
    any would run."""
    check_identity_name(identity)
    started, t0 = now_iso(), time.perf_counter()
    results: dict[str, runner.StageResult] = {}
    for step in registry.layers(registry.in_flow("onboard")):
        for stage in step:
            hit = runner.cached(ws, stage, identity, video if registry.get(stage).external == "video" else None)
            if hit is None:
                return None
            results[stage] = hit
    run_id = str(uuid.uuid4())
    took = round(time.perf_counter() - t0, 3)
    for stage, res in results.items():
        runner.record(ws, run_id=run_id, flow="onboard", stage=stage, identity=identity, status="completed",
                      cache_hit=True, result=res.to_dict(), started_at=started, duration_s=took)
    ws.register_identity(identity)
    return {"identity": identity, "run_id": run_id,
            "stages": {s: {**r.to_dict(), "cache_hit": True} for s, r in results.items()},
            "dvc": commit_identity(ws, identity)}
