"""The service's jobs: flows a client starts through the HTTP API, each one Prefect flow run of a deployment.

A job does what the command line does (onboard + pretrain + finetune + evaluation; a render from a motion or a
speech file) and leaves two things in Prefect for whoever watches it, beside the run's own state: a progress
artifact (0–100, its description the stage at work) and, when it completes, a table artifact with what it made.
The API reads both from Prefect, so it never needs the job's process or its machine.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.deployments.runner import EntrypointType, RunnerDeployment

from core.errors import InputError
from core.workspace import Workspace, check_identity_name
from flows import replica, stage_task
from flows.onboard import preprocess
from flows.render import render_stages, stage_summary
from flows.stage_task import StageRunner
from flows.train import finetune_identity, pretrain_shared
from tasks import registry
from tasks.stages import assemble

RESULT = "anchor job result"  # the description of a job's result artifact, how the API finds it
STATES = {"SCHEDULED": "pending", "PENDING": "pending", "PAUSED": "pending", "RUNNING": "running",
          "COMPLETED": "completed", "FAILED": "failed", "CRASHED": "failed", "CANCELLING": "cancelled",
          "CANCELLED": "cancelled"}  # Prefect's state types → a job's
ONBOARD_FLOWS = ("onboard", "pretrain", "finetune", "render", "evaluate")  # an onboard job's stages, by flow
RENDER_FLOWS = ("render",)


class JobProgress:
    """Progress of a job's stages as one Prefect progress artifact: stages finished (from the runner's results)
    plus the running stages' current phase, over the stages the job has to run; never going back. Stages report
    from worker threads; the artifact is written at most every `every` seconds, and whenever the phase changes."""

    def __init__(self, flows: tuple[str, ...], every: float = 1.0) -> None:
        self.total = sum(len(registry.in_flow(f)) for f in flows)
        self.every = every
        self.stages: StageRunner | None = None
        self.phases: dict[str, tuple[int, int]] = {}  # a running stage's current phase: done, total
        self.lock, self.writing, self.written = threading.Lock(), threading.Lock(), 0.0
        self.shown, self.label, self.sent = 0.0, "starting", 0.0
        self.artifact = create_progress_artifact(progress=0.0, description=self.label)

    def update(self, stage: str, label: str, done: int, total: int) -> None:
        with self.lock:
            self.phases[stage] = (done, total)
            # a snapshot taken in one step (the flow's thread adds results while stages report from theirs)
            finished = {s for s, _ in tuple(self.stages.results)} if self.stages else set()
            running = sum(d / t for s, (d, t) in self.phases.items() if s not in finished and t)
            self.shown = max(self.shown, min(1.0, (len(finished) + running) / max(self.total, 1)))
            if label == self.label and time.monotonic() - self.sent < self.every:
                return
            self.label, self.sent, shown = label, time.monotonic(), self.shown
        self._send(shown, label)

    def _send(self, shown: float, label: str) -> None:
        """Outside the stages' lock (a slow write holds up no stage), in order (a value older than the one written
        is dropped), and never the stage's failure: progress that cannot be written is only logged."""
        with self.writing:
            if shown < self.written:
                return
            try:
                update_progress_artifact(self.artifact, round(100 * shown, 2), description=label)
                self.written = shown
            except Exception as exc:  # noqa: BLE001 - a watcher's problem, not the job's
                from prefect.logging import get_logger

                get_logger("anchor.jobs").warning("progress of the job not written: %s", exc)

    def __enter__(self) -> JobProgress:
        self.previous = stage_task.progress_factory
        stage_task.progress_factory = lambda stage, identity: _StageHandle(self, stage)
        return self

    def __exit__(self, *exc: object) -> None:
        stage_task.progress_factory = self.previous
        if exc[0] is None:
            self._send(1.0, "done")


class _StageHandle:
    """One stage's core.progress.Progress, reporting into the job's."""

    def __init__(self, job: JobProgress, stage: str) -> None:
        self.job, self.stage, self.label, self.done, self.total = job, stage, stage, 0, 0

    def start(self, description: str, total: int) -> None:
        self.label = description if description.startswith(self.stage) else f"{self.stage}: {description}"
        self.done, self.total = 0, max(int(total), 0)
        self.job.update(self.stage, self.label, 0, self.total)

    def advance(self, n: int = 1) -> None:
        self.done = min(self.done + n, self.total)
        self.job.update(self.stage, self.label, self.done, self.total)


def notify(flow: Any, flow_run: Any, state: Any) -> None:
    """A Prefect state hook: when the job ends (completed, failed, crashed or cancelled), POST
    {"job", "kind", "state", "error"} to the job's `webhook`, if it has one; the receiver reads the rest with GET
    /api/v1/jobs/{job}. A receiver that is down or slow is logged, never fails the job."""
    import httpx
    from prefect.logging import get_logger

    url = (flow_run.parameters or {}).get("webhook")
    if not url:
        return
    job = STATES.get(state.type.value, "failed")
    body = {"job": str(flow_run.id), "kind": flow.name.removeprefix("anchor-").removesuffix("-job"), "state": job,
            "error": (state.message or "failed") if job == "failed" else None}
    try:
        httpx.post(url, json=body, timeout=10).raise_for_status()
    except httpx.HTTPError as exc:
        get_logger("anchor.jobs").warning("webhook %s for job %s: %s", url, flow_run.id, exc)


HOOKS = {f"on_{event}": [notify] for event in ("completion", "failure", "crashed", "cancellation")}


def _publish(result: dict[str, Any]) -> None:
    create_table_artifact(table=[{k: v if isinstance(v, str | int | float | bool) or v is None else str(v)
                                  for k, v in result.items()}], description=RESULT)


@flow(name="anchor-onboard-job", flow_run_name="job-onboard-{identity}", log_prints=False, **HOOKS)
def onboard_job(workspace: str, identity: str, video: str, webhook: str | None = None,
                remote: str | None = None) -> dict[str, Any]:
    """A new identity from its video: onboard, the shared pretrain, its finetune and its evaluation. On a worker
    of another workspace (same `remote`): the studio's identities fetched first, so pretraining sees them all, and
    the new identity published to the remote at the end, all under the identity's lock."""
    ws, server = replica.job_workspace(workspace, remote)
    check_identity_name(identity)
    shared = remote is not None  # jobs of a pool: published, wherever they ran (workers elsewhere render them)
    locked = replica.owner_lock(ws, identity) if shared else contextlib.nullcontext()
    with JobProgress(ONBOARD_FLOWS) as progress, locked:
        if shared:
            if identity in replica.published_identities(ws):
                raise InputError(f"identity {identity!r} exists in the remote {remote}; onboard another name")
            replica.refresh(ws)
        if server is not None:
            video = str(replica.fetch_upload(ws, server, video))
        stages = progress.stages = StageRunner.of_this_run(ws, "onboard")
        preprocess(ws, stages, identity, Path(video))
        pretrain_shared(ws, stages)  # this workspace's, over every identity it has; it travels in their records
        out = finetune_identity(ws, stages, identity, evaluate=True)
        if shared:
            progress.update("publish", "publishing to the remote", 0, 1)
            replica.publish_identity(ws, identity)
    result = {"identity": identity, "version": out["version"]["version"], "report": out.get("report")}
    _publish(result)
    return {**result, "run_id": stages.run_id, "stages": stage_summary(stages, qualified=True)}


@flow(name="anchor-render-job", flow_run_name="job-render-{identity}", log_prints=False, **HOOKS)
def render_job(workspace: str, identity: str, motion: str, seed: int | None = None, speech: bool = False,
               webhook: str | None = None, remote: str | None = None) -> dict[str, Any]:
    """A video of the identity following a motion file or video (`speech`: driven by an audio file). On a worker
    of another workspace (same `remote`): the identity fetched first, the render published at the end."""
    ws, server = replica.job_workspace(workspace, remote)
    check_identity_name(identity)
    with JobProgress(RENDER_FLOWS) as progress:
        if server is not None:
            replica.fetch_identity(ws, identity)
            motion = str(replica.fetch_upload(ws, server, motion))
        stages = progress.stages = StageRunner.of_this_run(ws, "render")
        subject, made = render_stages(ws, stages, identity, motion, None, seed, None, speech)
        if server is not None:
            replica.publish_render(ws, subject)
    result = {"render": subject, "video": str(Path(made["path"]) / assemble.VIDEO)}
    _publish(result)
    return {**result, "run_id": stages.run_id, "stages": stage_summary(stages)}


JOBS = {"onboard": onboard_job, "render": render_job}


def deployments(ws: Workspace) -> dict[str, RunnerDeployment]:
    """The workspace's job deployments by kind: no schedule, started by the API (or Prefect's UI); named like its
    scheduled ones, so workspaces sharing one Prefect server keep their jobs apart."""
    from flows.rerender import deployment_name

    return {kind: RunnerDeployment.from_flow(
        job, name=deployment_name(ws), entrypoint_type=EntrypointType.MODULE_PATH, tags=["anchor"],
        description=f"{kind} jobs of {ws.root}") for kind, job in JOBS.items()}
