"""`anchor serve`: the HTTP API, the browser UI and the Prefect runner of the workspace's deployments in one process.

The runner (Prefect's, in a thread of its own with its own event loop) polls the Prefect server for runs of the
job deployments and the scheduled ones and starts each in a process of its own; uvicorn serves the API in the main
thread, which owns the signals: Ctrl-C or SIGTERM stops the API, then the runner, which cancels the jobs still
running (they end `cancelled`, their webhooks called; submit them again after a restart).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ipaddress
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from core.errors import InputError
from core.workspace import WORKER_WORKSPACE_ENV, Workspace

TOKENS_ENV = "ANCHOR_API_TOKENS"
HEARTBEAT_S = 30  # a worker's runs say they are alive this often (Prefect's shortest)
UNRESPONSIVE = "anchor-unresponsive-worker-runs"


def tokens(ws: Workspace, tokens_file: str | None) -> frozenset[str]:
    """Bearer tokens from $ANCHOR_API_TOKENS (comma-separated) and the file params name (one per line)."""
    found = {t.strip() for t in os.environ.get(TOKENS_ENV, "").split(",")}
    if tokens_file:
        path = Path(tokens_file).expanduser()
        path = path if path.is_absolute() else ws.root / path
        if not path.is_file():
            raise InputError(f"service.tokens_file {tokens_file}: no such file")
        found |= {line.strip() for line in path.read_text().splitlines() if not line.strip().startswith("#")}
    return frozenset(t for t in found if t)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RunnerThread:
    """Prefect's runner on an event loop of its own, serving `deployments`; their ids once registered."""

    def __init__(self, name: str, deployments: dict[str, Any], poll_s: float) -> None:
        from prefect.runner import Runner

        self.runner = Runner(name=name, query_seconds=poll_s)
        self.deployments = deployments
        self.loop = asyncio.new_event_loop()
        self.ids: dict[str, Any] = {}
        self.error: BaseException | None = None
        # the thread runs in this thread's context: Prefect's settings (the API URL of the workspace's embedded
        # server among them) live in context variables, and the runner hands them to every job's process
        self.thread = threading.Thread(target=contextvars.copy_context().run, args=(self._main,),
                                       name="anchor-runner", daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            self.error = exc

    async def _serve(self) -> None:
        for kind, deployment in self.deployments.items():
            self.ids[kind] = await self.runner.aadd_deployment(deployment)
        await self.runner.start()  # `started` once it polls: every deployment is registered by then

    def start(self, timeout: float = 120.0) -> dict[str, Any]:
        """The deployments' ids, once the runner polls for their runs; its failure to get there, raised here."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.runner.started and self.error is None:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise InputError(f"Prefect's runner did not start within {timeout:.0f} s")
            time.sleep(0.05)
        if self.error is not None:
            raise self.error
        return self.ids

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and self.error is None

    def stop(self, timeout: float = 30.0) -> None:
        """Stops polling and cancels the runs in progress (Prefect's runner does; they end `cancelled`)."""
        if self.thread.is_alive() and self.runner.started:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self.runner.astop(), self.loop).result(timeout)
        self.thread.join(timeout)


def shared_prefect(what: str) -> None:
    """Work pools need a Prefect server every machine reaches: the embedded one lives and dies with one process."""
    if not os.environ.get("PREFECT_API_URL"):
        raise InputError(f"{what} needs a Prefect server every machine reaches: start one (`prefect server start`) "
                         "and set PREFECT_API_URL to its API (http://HOST:4200/api) on every machine")


def to_pool(deployments: dict[str, Any], pool: str) -> dict[str, Any]:
    """The deployments registered on `pool` (made a process pool if it does not exist), their ids by key: the
    pool's workers run them from then on, whether this process runs or not."""
    from flows.execution import WORKER_TAG

    ensure_pool(pool)
    for d in deployments.values():
        d.tags = sorted({*d.tags, WORKER_TAG})
    return {key: d.apply(work_pool_name=pool) for key, d in deployments.items()}  # by module path: no code storage


def ensure_pool(pool: str) -> None:
    """The pool (a process pool if it is new), and the automation that ends the runs of workers that died."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    async def ensure() -> None:
        async with get_client() as client:
            try:
                await client.read_work_pool(pool)
            except ObjectNotFound:
                with contextlib.suppress(ObjectAlreadyExists):  # another machine made it meanwhile
                    await client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            if not await client.read_automations_by_name(UNRESPONSIVE):
                await client.create_automation(unresponsive_runs())
                # a server and a worker starting at once may both have made it: one stays, the same for both
                made = sorted(await client.read_automations_by_name(UNRESPONSIVE), key=lambda a: str(a.id))
                for extra in made[1:]:
                    with contextlib.suppress(ObjectNotFound):
                        await client.delete_automation(extra.id)

    asyncio.run(ensure())


def unresponsive_runs() -> Any:
    """Prefect's way to end a run whose process died with its worker (killed, machine lost): a run of a worker
    sends a heartbeat every HEARTBEAT_S; one silent for three of them is marked crashed (a job `failed`), so it
    is neither shown running forever nor holds its identity. Only runs tagged WORKER_TAG are watched: other runs
    (the server's own runner, the command line) beat at Prefect's default, far more slowly."""
    from datetime import timedelta

    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    from flows.execution import WORKER_TAG

    ended = {f"prefect.flow-run.{s}" for s in ("Completed", "Failed", "Cancelled", "Crashed")}
    return AutomationCore(
        name=UNRESPONSIVE, description="anchor: a worker's run that stopped sending heartbeats is crashed",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"}, expect={"prefect.flow-run.heartbeat", *ended},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=ResourceSpecification({"prefect.resource.id": [f"prefect.tag.{WORKER_TAG}"]}),
            for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
            within=timedelta(seconds=3 * HEARTBEAT_S)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"its worker stopped answering (no heartbeat for {3 * HEARTBEAT_S} s)")])


def serve(ws: Workspace, host: str, port: int, say: Any, pool: str | None = None) -> None:
    """Serve until stopped. Refuses, before anything starts, to bind beyond loopback without tokens. With a work
    `pool`, the jobs and the schedules go to the pool's workers (`anchor worker`); else this process runs them."""
    import uvicorn
    from fastapi import FastAPI

    os.environ.setdefault("GRADIO_TEMP_DIR", str(ws.state / "gradio"))  # the UI's uploads: in the workspace's state
    from flows import jobs, rerender
    from service import ui
    from service.api import create_app
    from service.studio import Studio
    from tasks import registry

    settings = registry.params(ws).service
    pool = pool or settings.pool
    accepted = tokens(ws, settings.tokens_file)
    if not accepted and not is_loopback(host):
        raise InputError(f"--host {host}: serving beyond loopback needs bearer tokens (${TOKENS_ENV} or "
                         "service.tokens_file)")
    if pool:
        shared_prefect(f"--pool {pool}")
    scheduled = {f"rerender/{d.name}": d for d in rerender.deployments(ws)}
    deployments = {**jobs.deployments(ws), **scheduled}
    runner = None if pool else RunnerThread(f"anchor-{rerender.deployment_name(ws)}", deployments, settings.poll_s)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:  # inside uvicorn's shutdown: after it the process may be ended by the signal it caught
            if runner:
                await asyncio.to_thread(runner.stop)

    ids = to_pool(deployments, pool) if pool else runner.start()  # type: ignore[union-attr]
    try:
        studio = Studio(ws, {kind: ids[kind] for kind in jobs.JOBS}, settings.max_upload_mb,
                        running=(lambda: runner.alive) if runner else (lambda: True), shared=bool(pool))
        app = create_app(studio, accepted)
        app.router.lifespan_context = lifespan  # before the UI's mount, which wraps it in its own (its queue)
        ui.mount(app, studio, accepted, settings.poll_s)
        say(f"UI on http://{host}:{port}/, API under /api/v1, its docs at /docs"
            f"{'' if accepted else ' (no tokens: loopback only)'}")
        for name in scheduled:
            say(f"{'on pool ' + pool + ': ' if pool else 'serving '}{name}")
        if pool:
            say(f"jobs go to work pool {pool!r}: start its workers with `anchor worker --pool {pool}`")
        uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")).run()
    finally:
        if runner:
            runner.stop()


def work(ws: Workspace, pool: str, say: Any, limit: int | None = None, poll_s: float = 2.0) -> None:
    """A Prefect process worker of `pool` bound to this workspace, until stopped: it starts each run of the pool
    in a process of its own, which runs the job here (ANCHOR_WORKSPACE tells the job where "here" is)."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, PREFECT_WORKER_QUERY_SECONDS, temporary_settings
    from prefect.workers.process import ProcessWorker

    shared_prefect("anchor worker")
    ensure_pool(pool)
    os.environ[WORKER_WORKSPACE_ENV] = str(ws.root.resolve())  # inherited by every run's process
    os.environ["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] = str(HEARTBEAT_S)  # the runs' heartbeats (unresponsive_runs)

    async def main() -> None:
        worker = ProcessWorker(work_pool_name=pool, limit=limit, name=f"anchor-{os.uname().nodename}-{os.getpid()}",
                               prefetch_seconds=0)
        say(f"worker {worker.name} of pool {pool!r} on {ws.root}"
            f"{f', {limit} run(s) at a time' if limit else ''}; Ctrl-C stops it")
        await worker.start()  # it enters its own context

    # the runs' environment is made from the settings: a heartbeat setting of the user's (a profile, the older
    # PREFECT_RUNNER_ name) must not slow them below what the automation waits for
    beats = {PREFECT_WORKER_QUERY_SECONDS: poll_s, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: HEARTBEAT_S}
    with contextlib.suppress(KeyboardInterrupt), temporary_settings(updates=beats):
        asyncio.run(main())
