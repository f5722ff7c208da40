"""How a flow's stage tasks run, from params.yaml's `execution` section: Prefect's thread pool or Dask through
prefect-dask (a local cluster or a scheduler address), Prefect tag concurrency limits on the heavy stages, and
Prefect retries of transient I/O failures. Nothing here schedules work itself; it only configures Prefect."""

from __future__ import annotations

import contextvars
import errno
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
from prefect.client.schemas.objects import TaskRun
from prefect.context import FlowRunContext
from prefect.states import State
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from core.params import ExecutionParams
from core.stage import Stage
from tasks import devices

T = TypeVar("T")
TAG_PREFIX = "anchor-"
WORKER_TAG = "anchor-worker"  # the tag of deployments on a work pool: their runs beat for the pool's automation
# I/O errors a second attempt can outlive (a network filesystem or object store hiccup); a missing or
# forbidden file is a mistake, a full disk stays full, and the stage's own errors are about the input: none of
# those is retried.
TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
                    errno.ESTALE, errno.ENETUNREACH, errno.EHOSTUNREACH}


def task_runner(p: ExecutionParams) -> TaskRunner[Any]:
    if p.engine == "dask":
        import dask
        from prefect_dask import DaskTaskRunner

        # stages start worker processes of their own (MediaPipe, decoders): Dask's workers must not be daemons; a
        # busy machine starts a local cluster's workers slowly: Dask's 5 s to connect would fail a sound run
        dask.config.set({"distributed.worker.daemon": False, "distributed.comm.timeouts.connect": "120s"})
        if p.dask_address:
            return DaskTaskRunner(address=p.dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": p.dask_workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": ":0"})
    return ThreadPoolTaskRunner(max_workers=p.threads)


def tags(spec: Stage) -> set[str]:
    return {"anchor", f"{TAG_PREFIX}{spec.resource}"} if spec.resource else {"anchor"}


def apply_limits(p: ExecutionParams, free_slots: bool = False) -> None:
    """Prefect enforces tag limits server-side (global limits named `tag:<tag>`); params.yaml is their source.

    `free_slots`: an embedded server keeps its slot leases in memory, so a run killed with its server leaves its
    slots taken in the database for good; a process alone on that database frees them before it starts."""
    limits = {**p.limits, "gpu": devices.gpu_limit(p.limits)}
    with get_client(sync_client=True) as client:
        for resource, limit in limits.items():
            name = f"tag:{TAG_PREFIX}{resource}"
            client.upsert_global_concurrency_limit_by_name(name, limit)
            if free_slots:
                client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active_slots=0))


def is_transient(exc: BaseException | None) -> bool:
    return isinstance(exc, OSError) and (exc.errno in TRANSIENT_ERRNOS
                                         or isinstance(exc, TimeoutError | ConnectionError))


def retry_transient(task: Any, task_run: TaskRun, state: State) -> bool:
    """Prefect's retry_condition_fn: retry only what `is_transient` calls transient."""
    exc = state.result(raise_on_failure=False)
    return is_transient(exc if isinstance(exc, BaseException) else None)


def concurrently(fn: Callable[[str], T], items: Iterable[str]) -> dict[str, T | BaseException]:
    """fn(item) for every item at once, each in the flow run's context (so the stage tasks it submits belong to this
    flow run and go to its task runner); an item's exception is its result, the others go on."""
    items = list(items)
    if not items:
        return {}
    engine = getattr(FlowRunContext.get(), "task_runner", None)
    if isinstance(getattr(type(engine), "client", None), property):
        engine.client  # noqa: B018 - prefect-dask connects on first use, racily: connect once, before the threads
    with ThreadPoolExecutor(max_workers=len(items), thread_name_prefix="identity") as pool:
        futures = {item: pool.submit(contextvars.copy_context().run, fn, item) for item in items}
    out: dict[str, T | BaseException] = {}
    for item, fut in futures.items():
        exc = fut.exception()
        out[item] = exc if exc is not None else fut.result()
    return out
