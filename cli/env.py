"""The environment commands run in: which workspace, Prefect's settings and its embedded server, DVC as a process.

Prefect reads its settings when imported, so nothing here imports a flow module before `prefect_env` has pointed
Prefect at the workspace's state directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import importlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cli.app import STATE, err
from cli.progress import ProgressDisplay
from core.errors import AnchorError
from core.workspace import Workspace, find_workspace


def workspace() -> Workspace:
    """The command's workspace, with Prefect pointed at it before anything can import Prefect (which reads its
    settings at import)."""
    ws = find_workspace(STATE["workspace"])
    prefect_env(ws)
    return ws


def under_dvc() -> bool:
    """True inside `dvc repro` (which records outputs itself and holds DVC's lock meanwhile)."""
    return bool(os.environ.get("DVC_STAGE") or os.environ.get("DVC_ROOT"))


def dvc(root: Path, *args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True)
    if proc.returncode:
        raise AnchorError(f"dvc {' '.join(args)} failed: {proc.stderr.strip().splitlines()[-1:]}")


def prefect_env(ws: Workspace) -> None:
    """Point Prefect at the workspace's state directory, analytics off."""
    os.environ.setdefault("PREFECT_HOME", str(ws.prefect_home))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_BATCH_INTERVAL", "0.3")
    # Prefect's INFO lines are what the command's log file is for (the terminal shows its warnings: route_logs)
    level = logging.getLevelNamesMapping().get(os.environ.get("PREFECT_LOGGING_LEVEL", "INFO").upper(), 0)
    if level > logging.INFO:
        os.environ["PREFECT_LOGGING_LEVEL"] = "INFO"
    os.environ.setdefault("ANCHOR_NATIVE_LOG", str(ws.state / "logs" / "native.log"))
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "info" if STATE["verbose"] else "error")


class _RunFormatter(logging.Formatter):
    """Names the flow or task run a Prefect line belongs to, as Prefect's console does."""

    def format(self, record: logging.LogRecord) -> str:
        run = getattr(record, "task_run_name", None) or getattr(record, "flow_run_name", None)
        record.run = f" [{run}]" if run else ""
        return super().format(record)


# this process's routing: its log file's handler, the loggers it was added to, terminal handlers' former levels
_ROUTED: dict[str, Any] = {}


def route_logs(ws: Workspace) -> Path:
    """Prefect's own lines (flow and task runs starting and finishing, the embedded server starting and stopping)
    go to this command's log file, `.anchor/logs/run-<time>-<pid>.log`, for the rest of the process; the terminal
    shows their warnings and errors only, between the command's own progress and summary (everything with
    --verbose)."""
    from prefect.logging.configuration import PROCESS_LOGGING_CONFIG, setup_logging
    from prefect.logging.handlers import PrefectConsoleHandler

    unroute_logs()
    if not PROCESS_LOGGING_CONFIG:
        setup_logging()
    (ws.state / "logs").mkdir(parents=True, exist_ok=True)
    path = ws.state / "logs" / f"run-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%fZ')}-{os.getpid()}.log"
    to_file = logging.FileHandler(path, delay=True)
    to_file.setLevel(logging.INFO)
    to_file.setFormatter(_RunFormatter("%(asctime)s %(levelname)s %(name)s%(run)s: %(message)s"))
    terminal = logging.DEBUG if STATE["verbose"] else logging.WARNING
    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in ("prefect", "uvicorn", "fastapi")),
               *(lg for n, lg in logging.root.manager.loggerDict.items()
                 if n.startswith("prefect.") and isinstance(lg, logging.Logger) and not lg.propagate)]
    levels: dict[logging.Handler, int] = {}
    added: list[logging.Logger] = []
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, PrefectConsoleHandler) or (
                    type(handler) is logging.StreamHandler and handler.stream in (sys.stderr, sys.stdout)):
                levels.setdefault(handler, handler.level)
                handler.setLevel(terminal)
        if (logger is logging.getLogger() or not logger.propagate) and logger not in added:
            logger.addHandler(to_file)
            added.append(logger)
    prefect = logging.getLogger("prefect")
    _ROUTED.update(handler=to_file, loggers=added, levels=levels, prefect_level=prefect.level)
    prefect.setLevel(logging.INFO)
    return path


def unroute_logs() -> None:
    """Undo `route_logs` (a process that runs several commands, as the tests do): the log file closed, the
    terminal's handlers and Prefect's level as they were."""
    if not _ROUTED:
        return
    for logger in _ROUTED["loggers"]:
        logger.removeHandler(_ROUTED["handler"])
    _ROUTED["handler"].close()
    for handler, level in _ROUTED["levels"].items():
        handler.setLevel(level)
    logging.getLogger("prefect").setLevel(_ROUTED["prefect_level"])
    _ROUTED.clear()


SERVER_START_S = 120  # Prefect waits 20 s by default: too little for a first start on a busy 2-core machine


def _start_ephemeral_server() -> str | None:
    """Start Prefect's embedded server outside the terminal's process group, tied to this process's life.

    Prefect would start the same server lazily in the terminal's group, where Ctrl-C kills it first and the
    interrupted flow then retries a dead server for minutes. In its own session it survives Ctrl-C; the parent-death
    signal ends it with this process however that ends (even SIGKILL). Prefect reuses this default instance.
    """
    if os.environ.get("PREFECT_API_URL"):
        return None  # a shared Prefect server: nothing to start
    from prefect.server.api import server

    popen = subprocess.Popen
    subprocess.Popen = functools.partial(popen, preexec_fn=_detach_but_die_with_parent)  # type: ignore[misc]
    try:
        embedded = server.SubprocessASGIServer()
        embedded.start(timeout=SERVER_START_S)
    finally:
        subprocess.Popen = popen  # type: ignore[misc]
    return embedded.api_url


def _detach_but_die_with_parent() -> None:
    os.setsid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG (Linux)


@contextlib.contextmanager
def prefect_api(ws: Workspace) -> Iterator[None]:
    """The workspace's embedded Prefect server (or the shared one PREFECT_API_URL names), its address a setting so
    that other processes (Dask workers, served runs) reach the same server."""
    prefect_env(ws)
    route_logs(ws)
    api_url = _start_ephemeral_server()
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks import registry

    with temporary_settings(updates={PREFECT_API_URL: api_url}) if api_url else contextlib.nullcontext():
        if api_url and _alone_on_embedded_database():
            from flows.execution import apply_limits

            apply_limits(registry.params(ws).execution, free_slots=True)
        yield


_DATABASE_LOCK: list[int] = []


def _alone_on_embedded_database() -> bool:
    """True when no other anchor process uses this Prefect home's database: each holds a shared lock on it for
    its life, so an exclusive one succeeds only alone (then becomes shared too)."""
    path = Path(os.environ["PREFECT_HOME"]) / "anchor-embedded.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        alone = True
    except BlockingIOError:
        alone = False
    fcntl.flock(fd, fcntl.LOCK_SH)
    _DATABASE_LOCK.append(fd)  # held until the process ends
    return alone


def run_flow(ws: Workspace, module: str, name: str, *args: Any) -> Any:
    """A Prefect flow on the workspace's embedded server, with progress bars, on the engine params.yaml chooses.
    A device the machine lacks is refused here, before the server starts or any stage runs."""
    from tasks import devices, registry

    devices.check(registry.params(ws).execution.device)
    with prefect_api(ws):
        from core import progress
        from flows import stage_task
        from flows.execution import task_runner

        flow = getattr(importlib.import_module(module), name)
        flow = flow.with_options(task_runner=task_runner(registry.params(ws).execution))
        with ProgressDisplay(err) as factory:
            drawn_by, stage_task.progress_factory = stage_task.progress_factory, factory
            before, progress.notice = progress.notice, lambda message: err.print(message, markup=False,
                                                                                 highlight=False, soft_wrap=True)
            try:
                return flow(*args)
            finally:
                progress.notice = before
                stage_task.progress_factory = drawn_by
