"""The studio's HTTP API over one workspace (service/studio.py does the work): identities, jobs that onboard or
render, and what the jobs made; bearer tokens, and refusals of what is too large before it is read."""

from __future__ import annotations

import hmac
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.middleware.cors import CORSMiddleware
from fastapi.middleware.trustedhost import TrustedHostMiddleware
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.studio import API, Studio

WEBHOOK = "called with a POST of {job, kind, state, error} when the job ends"
BEARER = HTTPBearer(auto_error=False)  # module-level: FastAPI reads the endpoints' annotations in this namespace
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")


def create_app(studio: Studio, tokens: frozenset[str]) -> FastAPI:
    """`tokens`: the bearer tokens accepted (none: every request is, which `anchor serve` allows on loopback only,
    and then only from this machine's own pages: another site's page in a browser here can neither post to it nor,
    renamed by DNS, read it)."""
    limit, max_upload_mb = studio.limit, studio.max_upload_mb
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
        if request.method in ("POST", "PUT", "PATCH", "DELETE"):
            origin = urlsplit(request.headers.get("origin", "")).hostname
            if origin is not None and not tokens and origin not in LOOPBACK_NAMES:
                return JSONResponse({"detail": f"requests from {origin} need a bearer token"}, 403)
            # the UI's sign-in is a cookie, which a browser sends from any site's page: its writes come from its own
            if (origin is not None and tokens and not request.url.path.startswith(API)
                    and origin != urlsplit(f"//{request.headers.get('host', '')}").hostname):
                return JSONResponse({"detail": f"requests from {origin} are not accepted here"}, 403)
        if request.method in ("POST", "PUT", "PATCH"):
            length = request.headers.get("content-length")
            if length is None or not length.isdigit():
                return JSONResponse({"detail": "Content-Length is required"}, 411)
            if int(length) > limit:
                return JSONResponse({"detail": f"the request body ({int(length) / 1e6:.0f} MB) is larger than "
                                               f"{max_upload_mb} MB (service.max_upload_mb)"}, 413)
        return await call_next(request)

    # no page of another site may read an answer (Gradio, mounted in this app, then adds no CORS of its own)
    app.add_middleware(CORSMiddleware, allow_origins=[])
    if not tokens:  # a loopback server answers only to loopback names (no DNS rebinding onto it)
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=["127.0.0.1", "localhost", "[::1]"])
    api = APIRouter(prefix=API, dependencies=[Depends(authorised)])

    @api.get("/identities")
    def identities() -> list[dict[str, Any]]:
        """Every identity with its model versions, whether it has a speech model, and its report's URL."""
        return studio.identities()

    @api.get("/identities/{name}/report")
    def report(name: str) -> FileResponse:
        """The identity's evaluation report (one self-contained HTML page)."""
        return FileResponse(studio.report(name), media_type="text/html")

    @api.get("/identities/{name}/renders")
    def renders(name: str) -> list[dict[str, Any]]:
        """The identity's renders (by key), newest first, each with its video's URL, when it finished, and whether
        it is stale (and why)."""
        return studio.renders(name)

    @api.post("/identities", status_code=202)
    async def onboard(name: Annotated[str, Form(description="the new identity's name")],
                      video: Annotated[UploadFile, File(description="about a minute of one person")],
                      webhook: Annotated[str | None, Form(description=WEBHOOK)] = None) -> JSONResponse:
        """Onboard a new identity from its video, then train its model and evaluate it: one job."""
        return JSONResponse({"job": await studio.onboard(name, video, webhook)}, 202)

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
        job = await studio.render(identity, audio=audio, motion=motion, seed=seed, version=version, webhook=webhook)
        return JSONResponse({"job": job}, 202)

    @api.get("/renders/{name}/{key}/video")
    def video(name: str, key: str) -> FileResponse:
        """The render's mp4 (range requests answered, so a player can seek)."""
        return FileResponse(studio.finished(name, key), media_type="video/mp4", filename=f"{name}-{key}.mp4",
                            content_disposition_type="inline")

    @api.get("/renders/{name}/{key}/lineage")
    def lineage(name: str, key: str) -> list[dict[str, Any]]:
        """Every step from the video back to the source video, nearest first, each re-hashed (`verified`): what
        `anchor lineage` prints."""
        return studio.lineage(name, key)

    @api.get("/jobs/{job}")
    async def job_status(job: str) -> dict[str, Any]:
        """A job's state, its stage and progress (0–1), and what it made once completed."""
        return await studio.job(job)

    @api.delete("/jobs/{job}", status_code=202)
    async def cancel(job: str) -> dict[str, Any]:
        """Cancel a pending or running job (a finished one stays as it is)."""
        return await studio.cancel(job)

    app.include_router(api)
    return app
