"""Turn a motion (file or video) into SMPL-X parameters for one identity, ready for render_mesh.

A driving video is processed like an anchor's own (source → ingest → keypoints → smplx_fit, all cached) under a
motion name derived from its content hash; it is not registered as an identity, so DVC and the training flows never
treat it as one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from core.errors import InputError
from core.hashing import sha256_file
from core.workspace import Workspace
from flows.stage_task import StageRunner
from models.motion_io import Motion
from tasks import registry
from tasks.runner import body_model_path, hand_basis
from tasks.stages import motion as motion_task

FIT = "smplx_fit"


def motion_name(video: Path) -> str:
    return f"motion-{sha256_file(video)[:12]}"


def fit_video(ws: Workspace, stages: StageRunner, video: Path) -> tuple[Motion, Path]:
    """A driving video through the stages its SMPL-X fit needs (source → ingest → keypoints → smplx_fit, cached)
    under its motion name; returns its fit as a motion and its ingest directory (which holds its audio)."""
    name = motion_name(video)
    needed = [*registry.upstream(FIT), FIT]
    stages.run_steps(registry.layers(needed), name,
                     external={s: video for s in needed if registry.get(s).external == "video"})
    ingest = registry.artifact_dir(ws, "ingest", name)
    return motion_task.fit_as_motion(registry.artifact_dir(ws, "smplx_fit", name), ingest), ingest


@flow(name="import-motion", flow_run_name="motion-{identity}", log_prints=False)
def import_motion(workspace: str, identity: str, motion: str, out: str, clip: str | None = None) -> dict[str, Any]:
    ws = Workspace(Path(workspace))
    fit_dir = registry.artifact_dir(ws, "smplx_fit", identity)
    if not (fit_dir / "manifest.json").is_file():
        raise InputError(f"identity {identity!r} has no smplx_fit yet: run `anchor onboard {identity} --video ...`")
    path = Path(motion)
    params = registry.params(ws).motion
    info: dict[str, Any] = {"identity": identity, "motion": str(path)}
    if motion_task.is_video(path):
        stages = StageRunner.of_this_run(ws, "import-motion")
        loaded, _ = fit_video(ws, stages, path)
        info["motion_fit"] = ws.rel(registry.artifact_dir(ws, "smplx_fit", motion_name(path)))
    else:
        loaded = motion_task.load_file(path, clip, hands=hand_basis(ws))
    ref = motion_task.reference(fit_dir, body_model_path(ws))
    blocks, described = motion_task.prepare(loaded, ref, params)
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    motion_task.write(target, blocks)
    return {**info, **described, "out": str(target)}
