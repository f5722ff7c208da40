"""The studio's HTTP API over one workspace: identities, jobs that onboard or render, and what the jobs made.

A job is a Prefect flow run of one of the workspace's job deployments (flows/jobs.py): the API validates what it is
given, stores uploads in the workspace, creates the run and reads its state and artifacts back from Prefect. It
keeps no queue and no job table of its own, so a restarted server, Prefect's UI and another machine's worker all
see the same jobs.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.middleware.trustedhost import TrustedHostMiddleware
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from core.errors import AnchorError
from core.workspace import Workspace, check_identity_name, render_subject
from flows.jobs import RESULT, STATES

API = "/api/v1"
UPLOADS = "uploads"  # under the workspace's state directory: one folder per accepted upload
CHUNK = 1 << 20
WEBHOOK = "called with a POST of {job, kind, state, error} when the job ends"
BEARER = HTTPBearer(auto_error=False)  # module-level: FastAPI reads the endpoints' annotations in this namespace


def _suffix(filename: str | None) -> str:
    """The upload's suffix when it is a plain one (readers of motion files go by it), else none: a client's file
    name never becomes a path."""
    suffix = Path(filename or "").suffix.lower()
    return suffix if re.fullmatch(r"\.[a-z0-9]{1,8}", suffix) else ""


LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")


def create_app(ws: Workspace, deployments: dict[str, uuid.UUID], tokens: frozenset[str], max_upload_mb: int,
               running: Callable[[], bool] = lambda: True) -> FastAPI:
    """`deployments`: the job deployments' ids by kind ("onboard", "render"); `tokens`: the bearer tokens accepted
    (none: every request is, which `anchor serve` allows on loopback only, and then only from this machine's own
    pages: another site's page in a browser here can neither post to it nor, renamed by DNS, read it);
    `running`: whether the runner that starts the jobs is alive (if not, no job is accepted)."""
    limit = max_upload_mb * 1_000_000
    onboarding = asyncio.Lock()  # one name check and one run creation at a time
    app = FastAPI(title="Make-Your-Anchor+", summary="Personal avatar models: onboard an anchor from a video, render "
                  "it from speech or motion.", version="1")

    def authorised(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> None:
        if tokens and (credentials is None or not any(hmac.compare_digest(credentials.credentials.encode(),
                                                                          t.encode()) for t in tokens)):
            raise HTTPException(401, "a valid bearer token is required (Authorization: Bearer TOKEN)",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.middleware("http")
    async def refuse_large_bodies(request: Request, call_next: Any) -> Any:
        """Before a byte of the body is read: a body that is too large, or of unknown size, is refused; without
        tokens, so is a write from another site's page (browsers send its Origin)."""
        if request.method in ("POST", "PUT", "PATCH", "DELETE") and not tokens:
            origin = urlsplit(request.headers.get("origin", "")).hostname
            if origin is not None and origin not in LOOPBACK_NAMES:
                return JSONResponse({"detail": f"requests from {origin} need a bearer token"}, 403)
        if request.method in ("POST", "PUT", "PATCH"):
            length = request.headers.get("content-length")
            if length is None or not length.isdigit():
                return JSONResponse({"detail": "Content-Length is required"}, 411)
            if int(length) > limit:
                return JSONResponse({"detail": f"the request body ({int(length) / 1e6:.0f} MB) is larger than "
                                               f"{max_upload_mb} MB (service.max_upload_mb)"}, 413)
        return await call_next(request)

    if not tokens:  # a loopback server answers only to loopback names (no DNS rebinding onto it)
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=["127.0.0.1", "localhost", "[::1]"])
    api = APIRouter(prefix=API, dependencies=[Depends(authorised)])

    def identity_of(name: str) -> str:
        try:
            check_identity_name(name)
        except AnchorError as exc:
            raise HTTPException(422, str(exc)) from None
        if name not in ws.identities():
            raise HTTPException(404, f"no identity {name!r} in this workspace")
        return name

    async def store(upload: UploadFile, stem: str) -> Path:
        """The upload written into its own folder under the workspace's state, whole or not at all."""
        folder = ws.state / UPLOADS / uuid.uuid4().hex
        folder.mkdir(parents=True)
        target = folder / f"{stem}{_suffix(upload.filename)}"
        part = folder / (target.name + ".part")
        try:
            size = 0
            with open(part, "wb") as f:
                while chunk := await upload.read(CHUNK):
                    size += len(chunk)
                    if size > limit:
                        raise HTTPException(413, f"the upload is larger than {max_upload_mb} MB")
                    f.write(chunk)
            if size == 0:
                raise HTTPException(422, f"{upload.filename or stem}: the upload is empty")
            part.rename(target)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return target

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

    def hook(url: str | None) -> str | None:
        if url and (urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname):
            raise HTTPException(422, f"webhook {url!r}: an http(s) URL is required")
        return url or None

    async def submit(kind: str, upload: Path, parameters: dict[str, Any]) -> JSONResponse:
        """The job's flow run; an upload no run was made for is not kept."""
        from prefect.client.orchestration import get_client

        if not running():
            shutil.rmtree(upload.parent, ignore_errors=True)
            raise HTTPException(503, "the job runner of this server has stopped; restart `anchor serve`")
        try:
            async with get_client() as client:
                run = await client.create_flow_run_from_deployment(deployments[kind], parameters=parameters)
        except BaseException:
            shutil.rmtree(upload.parent, ignore_errors=True)
            raise
        return JSONResponse({"job": str(run.id)}, 202)

    # ----------------------------------------------------------------------------------------------- identities
    @api.get("/identities")
    def identities() -> list[dict[str, Any]]:
        """Every identity with its model versions, whether it has a speech model, and its report's URL."""
        from flows.render import speech_model
        from flows.versions import status

        def speaks(name: str) -> bool:
            try:
                speech_model(ws, name)
            except AnchorError:
                return False
            return True

        out = []
        for row in status(ws):
            name = row["identity"]
            out.append({"name": name, "onboarded": row["onboarded"], "current_version": row["current_version"],
                        "versions": [{"version": v["version"], "made_at": v.get("made_at"), "model": v["finetune"]}
                                     for v in row["versions"]],
                        "speech": speaks(name),
                        "renders": f"{API}/identities/{name}/renders",
                        "report": f"{API}/identities/{name}/report" if row["report"] else None})
        return out

    @api.get("/identities/{name}/report")
    def report(name: str) -> FileResponse:
        """The identity's evaluation report (one self-contained HTML page)."""
        from tasks import registry
        from tasks.stages import report as report_stage

        path = registry.artifact_dir(ws, "report", identity_of(name)) / report_stage.HTML
        if not path.is_file():
            raise HTTPException(404, f"{name} has no report yet (it comes with its finetune)")
        return FileResponse(path, media_type="text/html")

    @api.get("/identities/{name}/renders")
    def renders(name: str) -> list[dict[str, Any]]:
        """The identity's renders (by key), each with its video's URL, when it finished, and whether it is stale
        (and why)."""
        from flows.versions import renders as listed

        return [{"render": r["subject"], "video": f"{API}/renders/{r['subject']}/video",
                 "model_version": r["model_version"], "stale": r["stale"], "why": r["why"],
                 "finished_at": r["finished_at"], "motion": (r["motion"] or {}).get("kind")}
                for r in listed(ws, identity_of(name))]

    @api.post("/identities", status_code=202)
    async def onboard(name: Annotated[str, Form(description="the new identity's name")],
                      video: Annotated[UploadFile, File(description="about a minute of one person")],
                      webhook: Annotated[str | None, Form(description=WEBHOOK)] = None) -> JSONResponse:
        """Onboard a new identity from its video, then train its model and evaluate it: one job."""
        from tasks import video as vio

        try:
            check_identity_name(name)
        except AnchorError as exc:
            raise HTTPException(422, str(exc)) from None
        url = hook(webhook)
        await taken(name)
        path = await store(video, "video")
        await checked(path, vio.probe)
        async with onboarding:  # checked again where no other onboarding of this server can slip in between
            try:
                await taken(name)
            except BaseException:
                shutil.rmtree(path.parent, ignore_errors=True)
                raise
            return await submit("onboard", path, {"workspace": str(ws.root), "identity": name, "video": str(path),
                                                  "webhook": url})

    async def taken(name: str) -> None:
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

        if name in ws.identities():
            raise HTTPException(409, f"identity {name!r} exists; onboard another name")
        ended = [StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED]
        async with get_client() as client:
            runs = await client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployments["onboard"]])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(not_any_=ended))))
        if any((run.parameters or {}).get("identity") == name for run in runs):
            raise HTTPException(409, f"identity {name!r} is being onboarded by another job")

    # ---------------------------------------------------------------------------------------------------- renders
    @api.post("/renders", status_code=202)
    async def render(identity: Annotated[str, Form()],
                     audio: Annotated[UploadFile | None, File(description="speech: the anchor speaks it")] = None,
                     motion: Annotated[UploadFile | None, File(description="a motion file (.npz/.npy/.pkl/"
                                                               ".parquet) or a video of anyone")] = None,
                     seed: Annotated[int | None, Form(ge=0)] = None,
                     version: Annotated[int | None, Form(ge=1, description="must be the identity's current "
                                                         "model version")] = None,
                     webhook: Annotated[str | None, Form(description=WEBHOOK)] = None) -> JSONResponse:
        """A new video of an identity, from speech (`audio`) or from a motion (`motion`): one job."""
        from flows.render import speech_model
        from flows.versions import current_model, version_of, versions
        from tasks.audio import check as check_audio

        name = identity_of(identity)
        if (audio is None) == (motion is None):
            raise HTTPException(422, "send exactly one of `audio` and `motion`")
        url = hook(webhook)
        model = current_model(ws, name)
        if model is None:
            raise HTTPException(409, f"{name} has no trained model yet")
        current = version_of(versions(ws), name, model)
        if version is not None and version != current:
            raise HTTPException(409, f"{name} renders with its current model "
                                     f"{'v' + str(current) if current else '(not numbered)'}; v{version} is not loaded")
        if audio is not None:
            try:
                speech_model(ws, name)
            except AnchorError as exc:
                raise HTTPException(409, str(exc)) from None
            path = await store(audio, "audio")
            await checked(path, check_audio)
        else:
            assert motion is not None
            path = await store(motion, "motion")
        return await submit("render", path, {"workspace": str(ws.root), "identity": name, "motion": str(path),
                                             "seed": seed, "speech": audio is not None, "webhook": url})

    def finished(name: str, key: str) -> Path:
        """A finished render's video."""
        from tasks import registry
        from tasks.stages import assemble

        try:
            subject = render_subject(identity_of(name), key)
        except AnchorError as exc:
            raise HTTPException(422, str(exc)) from None
        path = registry.artifact_dir(ws, "assemble", subject) / assemble.VIDEO
        if not path.is_file():
            raise HTTPException(404, f"no finished render {subject}")
        return path

    @api.get("/renders/{name}/{key}/video")
    def video(name: str, key: str) -> FileResponse:
        """The render's mp4 (range requests answered, so a player can seek)."""
        return FileResponse(finished(name, key), media_type="video/mp4", filename=f"{name}-{key}.mp4",
                            content_disposition_type="inline")

    @api.get("/renders/{name}/{key}/lineage")
    def lineage(name: str, key: str) -> list[dict[str, Any]]:
        """Every step from the video back to the source video, nearest first, each re-hashed (`verified`): what
        `anchor lineage` prints."""
        from core.lineage import trace

        return json.loads(json.dumps(trace(ws, finished(name, key)), default=str))

    # ------------------------------------------------------------------------------------------------------- jobs
    async def flow_run(job: str) -> Any:
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
        if run.deployment_id not in deployments.values():
            raise HTTPException(404, f"no job {job}")
        return run

    @api.get("/jobs/{job}")
    async def job_status(job: str) -> dict[str, Any]:
        """A job's state, its stage and progress (0–1), and what it made once completed."""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        run = await flow_run(job)
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
        return {"job": str(run.id), "kind": next(k for k, d in deployments.items() if d == run.deployment_id),
                "state": state, "stage": progress.description if progress and state == "running" else None,
                "progress": 1.0 if state == "completed" else
                round(float(progress.data) / 100, 4) if progress and progress.data is not None else 0.0,
                "result": result, "error": (run.state.message or "failed") if state == "failed" else None,
                "created": run.created.isoformat() if run.created else None}

    @api.delete("/jobs/{job}", status_code=202)
    async def cancel(job: str) -> dict[str, Any]:
        """Cancel a pending or running job (a finished one stays as it is)."""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.responses import SetStateStatus
        from prefect.states import Cancelling

        run = await flow_run(job)
        if run.state and run.state.is_final():
            raise HTTPException(409, f"job {job} has already ended ({STATES.get(run.state.type.value)})")
        async with get_client() as client:  # not forced: a run that ended meanwhile keeps its end
            answer = await client.set_flow_run_state(run.id, Cancelling(message="cancelled through the API"))
        if answer.status != SetStateStatus.ACCEPT:
            raise HTTPException(409, f"job {job} could not be cancelled: {answer.details}")
        return {"job": job, "state": "cancelled"}

    app.include_router(api)
    return app
