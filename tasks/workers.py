"""Worker processes for the frame-heavy stages: both cores busy, and MediaPipe's native logging kept off stderr.

MediaPipe's C++ logging ignores the usual log-level variables, so it runs only in worker processes whose stderr
goes to $ANCHOR_NATIVE_LOG (or nowhere): the calling process keeps stderr for one-line errors. Worker exceptions
still reach the caller, pickled.

Workers are forked from multiprocessing's fork server, a single-threaded process started on first use that has
imported what the workers need (`PRELOAD`) once: a worker starts in milliseconds where a fresh interpreter spent
~3 s importing MediaPipe and OpenCV, at every stage, round and render. Nothing of the calling process (its threads,
torch, a model) is forked; a worker gets the caller's environment and working directory as they are when the work
starts (the directory multiprocessing sets itself, the environment `_init_worker`).
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from typing import Any, TypeVar

from core import contract, interrupt
from core.progress import Progress

NATIVE_LOG_ENV = "ANCHOR_NATIVE_LOG"
#: MediaPipe keeps ~20 MB per graph it builds (a keypoints clip builds three, a matting clip one): stages that
#: build models per clip take a fresh worker after this many clips, so memory stays flat in video length.
MEDIAPIPE_JOBS_PER_PROCESS = 3
#: imported once, into the fork server: MediaPipe, the libraries the frame workers read and write with, the stages'
#: common code. Only modules that start no thread when imported (pyarrow does; a fork copies no thread but the
#: caller's, and another thread's held locks stay held in the child); numpy's OpenBLAS pool, when it has one, is
#: stopped around each fork by OpenBLAS itself.
PRELOAD = ("numpy", "cv2", "av", "mediapipe", "pydantic", "tasks.mp", "tasks.frames", "core.stage", "core.contract")
J = TypeVar("J")
R = TypeVar("R")


class Reporter:
    """Picklable handle a worker uses to tell the parent how many frames it has done (through the queue its
    process was started with)."""

    def __call__(self, n: int = 1) -> None:
        if _REPORTS:
            _REPORTS[0].put(n)


_REPORTS: list[Any] = []  # in a worker: the queue of the run that started it


def context() -> Any:
    """The fork-server context, its preload named before the server first starts (later calls change nothing)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD))
    return ctx


def run_parallel(fn: Callable[[J, Reporter], R], jobs: Sequence[J], workers: int, progress: Progress,
                 jobs_per_process: int | None = None) -> list[R]:
    """Run fn(job, report) for every job in worker processes; results in job order; the first error is raised.
    With `jobs_per_process`, the jobs run in rounds of `workers × jobs_per_process`, each round in fresh
    processes: native libraries that keep a little memory per model they build (MediaPipe's graphs) then stay
    bounded however many jobs a long video makes. (Not ProcessPoolExecutor's max_tasks_per_child: on Python 3.11
    a pool replacing its workers that way hung for good mid-stage.)"""
    workers = max(1, min(workers, len(jobs)))
    size = len(jobs) if not jobs_per_process else workers * jobs_per_process
    ctx = context()
    q = ctx.SimpleQueue()  # written synchronously: every frame reported before a result is counted
    report = Reporter()
    results: list[R] = []
    try:
        for first in range(0, len(jobs), max(size, 1)):
            round_ = jobs[first:first + size]
            with ProcessPoolExecutor(max_workers=min(workers, len(round_)), mp_context=ctx, initializer=_init_worker,
                                     initargs=(os.environ.get(NATIVE_LOG_ENV), contract.worker_state(),
                                               dict(os.environ), q)) as pool:
                results += _run_round(pool, fn, round_, report, q, progress)
    finally:
        q.close()
    return results


def _run_round(pool: ProcessPoolExecutor, fn: Callable[[J, Reporter], R], jobs: Sequence[J], report: Reporter,
               q: Any, progress: Progress) -> list[R]:
    futures = [pool.submit(fn, job, report) for job in jobs]
    pending = set(futures)
    try:
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_EXCEPTION)
            interrupt.check()  # Ctrl-C stops the stage even before a worker reports its first frame
            _drain(q, progress)
            failed = [f for f in done if f.exception() is not None]
            if failed:
                raise failed[0].exception()  # type: ignore[misc]
    except BaseException:
        _abandon(pool)
        raise
    _drain(q, progress)
    return [f.result() for f in futures]


def _abandon(pool: ProcessPoolExecutor) -> None:
    """Stop at once: queued jobs cancelled, running workers terminated (leaving the pool would wait for them)."""
    workers = list((getattr(pool, "_processes", None) or {}).values())  # no public handle before Python 3.14
    pool.shutdown(wait=False, cancel_futures=True)
    for process in workers:
        if process.is_alive():
            process.terminate()


def _init_worker(log_path: str | None, watched: dict[str, Any] | None, environ: dict[str, str], q: Any) -> None:
    """The caller's environment as it is now (the fork server's is as it was when it started), native logs to the
    log file, the queue progress goes to, then the parent stage's contract on what the worker opens."""
    os.environ.clear()
    os.environ.update(environ)
    _REPORTS[:] = [q]
    if log_path:
        os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
    fd = os.open(log_path or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    contract.install_in_worker(watched)


def _drain(q: Any, progress: Progress) -> None:
    while not q.empty():
        progress.advance(q.get())
