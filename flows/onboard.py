"""Onboard identities: the stages declared for the onboard flow (source → ingest → keypoints ∥ matting → smplx_fit →
perturb → render_mesh, in the order their inputs give), then the outputs recorded in DVC. `onboard_many` does several
identities at once and, if asked, trains them: the shared pretrain once, after every identity is preprocessed, then
the finetunes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from core.workspace import Workspace, check_identity_name
from flows.dvc_store import commit_identity
from flows.execution import concurrently
from flows.render import stage_summary
from flows.stage_task import StageRunner
from flows.train import finetune_identity, pretrain_shared
from tasks import registry


def preprocess(ws: Workspace, stages: StageRunner, identity: str, video: Path) -> list[str]:
    """The identity's onboard stages, then its name in identities.yaml and its outputs in dvc.lock (a name is
    listed only once it is whole, so a failed onboarding never breaks the shared pretrain)."""
    check_identity_name(identity)
    steps = registry.layers(registry.in_flow("onboard"))
    results = stages.run_steps(steps, identity, external={s: video for s in registry.in_flow("onboard")
                                                          if registry.get(s).external == "video"})
    ws.register_identity(identity)
    return commit_identity(ws, identity, results)


@flow(name="onboard", flow_run_name="onboard-{identity}", log_prints=False)
def onboard(workspace: str, identity: str, video: str) -> dict[str, Any]:
    ws = Workspace(Path(workspace))
    stages = StageRunner.of_this_run(ws, "onboard")
    committed = preprocess(ws, stages, identity, Path(video))
    return {"identity": identity, "run_id": stages.run_id, "stages": stage_summary(stages), "dvc": committed}


@flow(name="onboard-many", log_prints=False)
def onboard_many(workspace: str, videos: dict[str, str], train: bool = False,
                 evaluate: bool = True) -> dict[str, Any]:
    """Every identity concurrently; one that fails is reported and the others go on. With `train`, the shared
    pretrain runs once over every whole identity of the workspace, then each new one is finetuned (and, unless
    `evaluate` is off, evaluated and versioned)."""
    ws = Workspace(Path(workspace))
    for name in videos:
        check_identity_name(name)
    stages = StageRunner.of_this_run(ws, "onboard")
    outcome: dict[str, dict[str, Any]] = {}
    for name, res in concurrently(lambda name: preprocess(ws, stages, name, Path(videos[name])), videos).items():
        outcome[name] = ({"status": "failed", "error": f"{type(res).__name__}: {res}"}
                         if isinstance(res, BaseException) else {"status": "onboarded", "dvc": res})
    whole = [name for name, o in outcome.items() if o["status"] != "failed"]
    pretrained: list[str] | str | None = None
    if train and whole:
        try:
            pretrained = pretrain_shared(ws, stages)
        except Exception as exc:  # noqa: BLE001 - reported per identity below
            pretrained = f"{type(exc).__name__}: {exc}"
            for name in whole:
                outcome[name] = {"status": "failed", "error": f"pretrain: {pretrained}"}
        else:
            tuned = concurrently(lambda name: finetune_identity(ws, stages, name, evaluate), whole)
            for name, res in tuned.items():
                outcome[name] = ({"status": "failed", "error": f"{type(res).__name__}: {res}"}
                                 if isinstance(res, BaseException) else {"status": "trained", **res})
    return {"run_id": stages.run_id, "identities": outcome, "pretrain": pretrained,
            "stages": stage_summary(stages, qualified=True)}
