"""What the studio can do over one workspace, once, for both of its faces: the HTTP API (service/api.py) and the
browser UI (service/ui.py) call these and nothing else.

A job is a Prefect flow run of one of the workspace's job deployments (flows/jobs.py): a call here validates what it
is given, stores uploads in the workspace, creates the run and reads its state and artifacts back from Prefect. It
keeps no queue and no job table of its own, so a restarted server, Prefect's UI and another machine's worker all
see the same jobs. Refusals are `HTTPException`s (status and one sentence); the UI shows their sentence.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import HTTPException, UploadFile
from fastapi.concurrency import run_in_threadpool

from core.errors import AnchorError
from core.workspace import Workspace, check_identity_name, render_subject
from flows import replica
from flows.jobs import RESULT, STATES

API = "/api/v1"
CHUNK = 1 << 20
ENDED = ("completed", "failed", "cancelled")
SYNC_S = 2.0  # a server whose workers publish to the remote looks there at most this often


def _suffix(filename: str | None) -> str:
    """The upload's suffix when it is a plain one (readers of motion files go by it), else none: a client's file
    name never becomes a path."""
    suffix = Path(filename or "").suffix.lower()
    return suffix if re.fullmatch(r"\.[a-z0-9]{1,8}", suffix) else ""


class Studio:
    """`deployments`: the job deployments' ids by kind ("onboard", "render"); `running`: whether the runner that
    starts the jobs is alive (if not, no job is accepted); `shared`: the jobs may run on workers of other
    workspaces (a work pool), so uploads go to the shared remote too, and what the workers publish there —
    identities and renders — is fetched into this workspace before it is listed or served (flows/replica.py)."""

    def __init__(self, ws: Workspace, deployments: dict[str, uuid.UUID], max_upload_mb: int,
                 running: Callable[[], bool] = lambda: True, shared: bool = False) -> None:
        self.ws, self.deployments, self.running, self.shared = ws, deployments, running, shared
        self.synced, self.syncing = 0.0, threading.Lock()
        self.max_upload_mb = max_upload_mb
        self.limit = max_upload_mb * 1_000_000
        self.onboarding = asyncio.Lock()  # one name check and one run creation at a time

    # ------------------------------------------------------------------------------------------------- checks
    @contextlib.contextmanager
    def _from_remote(self, what: str) -> Iterator[None]:
        """One fetch at a time (two would swap one folder); a remote that fails answers 503, saying what."""
        with self.syncing:
            try:
                yield
            except (OSError, AnchorError) as exc:
                said = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise HTTPException(503, f"{what} cannot be fetched from the shared remote "
                                         f"{replica.remote_url(self.ws)}: {said}") from None

    def sync(self, force: bool = False) -> None:
        """With workers elsewhere: the identities the remote has, fetched where they changed (at most every
        SYNC_S unless `force`d)."""
        if not self.shared:
            return
        with self._from_remote("the identities"):
            if force or time.monotonic() - self.synced >= SYNC_S:
                replica.refresh(self.ws)
                self.synced = time.monotonic()

    def fetch_render(self, subject: str) -> None:
        """A render a worker published, here."""
        with self._from_remote(f"render {subject}"):
            replica.fetch_render(self.ws, subject)

    def identity_of(self, name: str) -> str:
        try:
            check_identity_name(name)
        except AnchorError as exc:
            raise HTTPException(422, str(exc)) from None
        if name not in self.ws.identities():
            self.sync()  # one a worker published since the last look (at most every SYNC_S: names are cheap to try)
        if name not in self.ws.identities():
            raise HTTPException(404, f"no identity {name!r} in this workspace")
        return name

    @staticmethod
    def hook(url: str | None) -> str | None:
        if url and (urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname):
            raise HTTPException(422, f"webhook {url!r}: an http(s) URL is required")
        return url or None

    async def store(self, upload: UploadFile | Path, stem: str) -> Path:
        """The upload (a request's file, or a file the UI received) written into its own folder under the
        workspace's state, whole or not at all."""
        folder = self.ws.uploads / uuid.uuid4().hex
        folder.mkdir(parents=True)
        name = upload.name if isinstance(upload, Path) else upload.filename
        target = folder / f"{stem}{_suffix(name)}"
        part = folder / (target.name + ".part")
        try:
            size = 0
            with open(part, "wb") as f, contextlib.ExitStack() as stack:
                source = stack.enter_context(upload.open("rb")) if isinstance(upload, Path) else None

                async def read() -> bytes:
                    return source.read(CHUNK) if source is not None else await upload.read(CHUNK)  # type: ignore[union-attr]

                while chunk := await read():
                    size += len(chunk)
                    if size > self.limit:
                        raise HTTPException(413, f"the upload is larger than {self.max_upload_mb} MB")
                    f.write(chunk)
            if size == 0:
                raise HTTPException(422, f"{name or stem}: the upload is empty")
            part.rename(target)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return target

    @staticmethod
    async def checked(path: Path, check: Any) -> None:
        """A decoding check on a stored upload; what fails it is removed and answered 422 in one line."""
        try:
            await run_in_threadpool(check, path)
        except AnchorError as exc:
            shutil.rmtree(path.parent, ignore_errors=True)
            raise HTTPException(422, str(exc).replace(str(path), path.name)) from None
        except BaseException:  # the client gone mid-check, or the check itself broken: nothing kept either way
            shutil.rmtree(path.parent, ignore_errors=True)
            raise

    async def submit(self, kind: str, upload: Path, parameters: dict[str, Any]) -> str:
        """The job's flow run; an upload no run was made for is not kept."""
        from prefect.client.orchestration import get_client

        if not self.running():
            shutil.rmtree(upload.parent, ignore_errors=True)
            raise HTTPException(503, "the job runner of this server has stopped; restart `anchor serve`")
        try:
            if self.shared:  # a worker elsewhere takes it from there
                await run_in_threadpool(replica.publish_upload, self.ws, upload)
                parameters = {**parameters, "remote": replica.remote_url(self.ws)}
            async with get_client() as client:
                run = await client.create_flow_run_from_deployment(self.deployments[kind], parameters=parameters)
        except BaseException:
            shutil.rmtree(upload.parent, ignore_errors=True)
            raise
        return str(run.id)

    # --------------------------------------------------------------------------------------------- identities
    def identities(self) -> list[dict[str, Any]]:
        """Every identity with its model versions (`trained`: it has a model, numbered or not), whether it has a
        speech model, and its report's URL."""
        from flows.render import speech_model
        from flows.versions import current_model, status

        def speaks(name: str) -> bool:
            try:
                speech_model(self.ws, name)
            except AnchorError:
                return False
            return True

        self.sync()
        out = []
        for row in status(self.ws):
            name = row["identity"]
            out.append({"name": name, "onboarded": row["onboarded"],
                        "trained": current_model(self.ws, name) is not None, "current_version": row["current_version"],
                        "versions": [{"version": v["version"], "made_at": v.get("made_at"), "model": v["finetune"]}
                                     for v in row["versions"]],
                        "speech": speaks(name),
                        "renders": f"{API}/identities/{name}/renders",
                        "report": f"{API}/identities/{name}/report" if row["report"] else None})
        return out

    def report(self, name: str) -> Path:
        """The identity's evaluation report (one self-contained HTML page)."""
        from tasks import registry
        from tasks.stages import report as report_stage

        path = registry.artifact_dir(self.ws, "report", self.identity_of(name)) / report_stage.HTML
        if not path.is_file():
            raise HTTPException(404, f"{name} has no report yet (it comes with its finetune)")
        return path

    def renders(self, name: str) -> list[dict[str, Any]]:
        """The identity's renders (by key), newest first, each with its video's URL, when it finished, and
        whether it is stale (and why)."""
        from flows.versions import renders as listed

        name = self.identity_of(name)
        if self.shared:
            for subject in replica.published_renders(self.ws, name):
                self.fetch_render(subject)
        rows = sorted(listed(self.ws, name), key=lambda r: r["finished_at"] or "", reverse=True)
        return [{"render": r["subject"], "video": f"{API}/renders/{r['subject']}/video",
                 "model_version": r["model_version"], "stale": r["stale"], "why": r["why"],
                 "finished_at": r["finished_at"], "motion": (r["motion"] or {}).get("kind")} for r in rows]

    async def taken(self, name: str) -> None:
        """409 for a name the workspace has, or that a job not yet ended is onboarding."""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import (
            DeploymentFilter,
            DeploymentFilterId,
            FlowRunFilter,
            FlowRunFilterState,
            FlowRunFilterStateType,
        )
        from prefect.client.schemas.objects import StateType

        await run_in_threadpool(self.sync, True)
        if name in self.ws.identities():
            raise HTTPException(409, f"identity {name!r} exists; onboard another name")
        ended = [StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED]
        async with get_client() as client:
            runs = await client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[self.deployments["onboard"]])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(not_any_=ended))))
        if any((run.parameters or {}).get("identity") == name for run in runs):
            raise HTTPException(409, f"identity {name!r} is being onboarded by another job")

    async def onboard(self, name: str, video: UploadFile | Path, webhook: str | None = None) -> str:
        """Onboard a new identity from its video, then train its model and evaluate it: one job."""
        from tasks import video as vio

        try:
            check_identity_name(name)
        except AnchorError as exc:
            raise HTTPException(422, str(exc)) from None
        url = self.hook(webhook)
        await self.taken(name)
        path = await self.store(video, "video")
        await self.checked(path, vio.probe)
        async with self.onboarding:  # checked again where no other onboarding of this server can slip in between
            try:
                await self.taken(name)
            except BaseException:
                shutil.rmtree(path.parent, ignore_errors=True)
                raise
            return await self.submit("onboard", path, {"workspace": str(self.ws.root), "identity": name,
                                                       "video": str(path), "webhook": url})

    # ------------------------------------------------------------------------------------------------ renders
    async def render(self, identity: str, audio: UploadFile | Path | None = None,
                     motion: UploadFile | Path | None = None, seed: int | None = None, version: int | None = None,
                     webhook: str | None = None) -> str:
        """A new video of an identity, from speech (`audio`) or from a motion (`motion`): one job."""
        from flows.render import speech_model
        from flows.versions import current_model, version_of, versions
        from tasks.audio import check as check_audio

        name = await run_in_threadpool(self.identity_of, identity)  # may fetch it from the remote
        if (audio is None) == (motion is None):
            raise HTTPException(422, "send exactly one of `audio` and `motion`")
        url = self.hook(webhook)
        model = current_model(self.ws, name)
        if model is None:
            raise HTTPException(409, f"{name} has no trained model yet")
        current = version_of(versions(self.ws), name, model)
        if version is not None and version != current:
            raise HTTPException(409, f"{name} renders with its current model "
                                     f"{'v' + str(current) if current else '(not numbered)'}; v{version} is not loaded")
        if audio is not None:
            try:
                speech_model(self.ws, name)
            except AnchorError as exc:
                raise HTTPException(409, str(exc)) from None
            path = await self.store(audio, "audio")
            await self.checked(path, check_audio)
        else:
            assert motion is not None
            path = await self.store(motion, "motion")
        return await self.submit("render", path, {"workspace": str(self.ws.root), "identity": name,
                                                  "motion": str(path), "seed": seed, "speech": audio is not None,
                                                  "webhook": url})

    def finished(self, name: str, key: str) -> Path:
        """A finished render's video."""
        from tasks import registry
        from tasks.stages import assemble

        try:
            subject = render_subject(self.identity_of(name), key)
        except AnchorError as exc:
            raise HTTPException(422, str(exc)) from None
        path = registry.artifact_dir(self.ws, "assemble", subject) / assemble.VIDEO
        if not path.is_file() and self.shared:
            self.fetch_render(subject)
        if not path.is_file():
            raise HTTPException(404, f"no finished render {subject}")
        return path

    def lineage(self, name: str, key: str) -> list[dict[str, Any]]:
        """Every step from the video back to the source video, nearest first, each re-hashed (`verified`): what
        `anchor lineage` prints."""
        from core.lineage import trace

        return json.loads(json.dumps(trace(self.ws, self.finished(name, key)), default=str))

    # --------------------------------------------------------------------------------------------------- jobs
    async def flow_run(self, job: str) -> Any:
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound

        try:
            job_id = uuid.UUID(job)
        except ValueError:
            raise HTTPException(404, f"no job {job}") from None
        async with get_client() as client:
            try:
                run = await client.read_flow_run(job_id)
            except ObjectNotFound:
                raise HTTPException(404, f"no job {job}") from None
        if run.deployment_id not in self.deployments.values():
            raise HTTPException(404, f"no job {job}")
        return run

    async def job(self, job: str) -> dict[str, Any]:
        """A job's state, its stage and progress (0–1), and what it made once completed."""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        run = await self.flow_run(job)
        async with get_client() as client:
            artifacts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
        state = STATES.get(run.state.type.value if run.state else "PENDING", "pending")
        progress = next((a for a in artifacts if a.type == "progress"), None)
        made = next((a for a in artifacts if a.type == "table" and a.description == RESULT), None)
        result = None
        if made is not None and state == "completed":
            row = json.loads(made.data)[0] if isinstance(made.data, str) else made.data[0]
            result = ({"render": row["render"], "video": f"{API}/renders/{row['render']}/video"} if "render" in row
                      else {"identity": row["identity"], "version": row["version"],
                            "report": f"{API}/identities/{row['identity']}/report"})
        return {"job": str(run.id), "kind": next(k for k, d in self.deployments.items() if d == run.deployment_id),
                "state": state, "stage": progress.description if progress and state == "running" else None,
                "progress": 1.0 if state == "completed" else
                round(float(progress.data) / 100, 4) if progress and progress.data is not None else 0.0,
                "result": result, "error": (run.state.message or "failed") if state == "failed" else None,
                "created": run.created.isoformat() if run.created else None}

    async def cancel(self, job: str) -> dict[str, Any]:
        """Cancel a pending or running job (a finished one stays as it is)."""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.responses import SetStateStatus
        from prefect.states import Cancelling

        run = await self.flow_run(job)
        if run.state and run.state.is_final():
            raise HTTPException(409, f"job {job} has already ended ({STATES.get(run.state.type.value)})")
        async with get_client() as client:  # not forced: a run that ended meanwhile keeps its end
            answer = await client.set_flow_run_state(run.id, Cancelling(message="cancelled through the API"))
        if answer.status != SetStateStatus.ACCEPT:
            raise HTTPException(409, f"job {job} could not be cancelled: {answer.details}")
        return {"job": job, "state": "cancelled"}

    async def wait(self, job: str, poll_s: float) -> AsyncIterator[dict[str, Any]]:
        """The job's status each time it changes, until it ends (the UI's live progress)."""
        last: dict[str, Any] | None = None
        while True:
            status = await self.job(job)
            if status != last:
                yield status
                last = status
            if status["state"] in ENDED:
                return
            await asyncio.sleep(poll_s)
