"""Worker processes for the frame-heavy stages: both cores busy, and MediaPipe's native logging kept off stderr.

MediaPipe's C++ logging ignores the usual log-level variables, so it runs only in spawned workers whose stderr
goes to $ANCHOR_NATIVE_LOG (or nowhere): the calling process keeps stderr for one-line errors. Worker exceptions
still reach the caller, pickled.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from typing import Any, TypeVar

from core import contract, interrupt
from core.progress import Progress

NATIVE_LOG_ENV = "ANCHOR_NATIVE_LOG"
#: MediaPipe keeps ~20 MB per graph it builds (a keypoints clip builds three, a matting clip one): stages that
#: build models per clip take a fresh worker after this many clips, so memory stays flat in video length.
MEDIAPIPE_JOBS_PER_PROCESS = 3
J = TypeVar("J")
R = TypeVar("R")


class Reporter:
    """Picklable handle a worker uses to tell the parent how many frames it has done."""

    def __init__(self, q: Any) -> None:
        self._q = q

    def __call__(self, n: int = 1) -> None:
        self._q.put(n)


def run_parallel(fn: Callable[[J, Reporter], R], jobs: Sequence[J], workers: int, progress: Progress,
                 jobs_per_process: int | None = None) -> list[R]:
    """Run fn(job, report) for every job in spawned processes; results in job order; the first error is raised.
    With `jobs_per_process`, the jobs run in rounds of `workers × jobs_per_process`, each round in fresh
    processes: native libraries that keep a little memory per model they build (MediaPipe's graphs) then stay
    bounded however many jobs a long video makes. (Not ProcessPoolExecutor's max_tasks_per_child: on Python 3.11
    a pool replacing its workers that way hung for good mid-stage.)"""
    workers = max(1, min(workers, len(jobs)))
    size = len(jobs) if not jobs_per_process else workers * jobs_per_process
    ctx = mp.get_context("spawn")
    results: list[R] = []
    with ctx.Manager() as manager:
        q = manager.Queue()
        report = Reporter(q)
        for first in range(0, len(jobs), max(size, 1)):
            round_ = jobs[first:first + size]
            with ProcessPoolExecutor(max_workers=min(workers, len(round_)), mp_context=ctx,
                                     initializer=_init_worker,
                                     initargs=(os.environ.get(NATIVE_LOG_ENV), contract.worker_state())) as pool:
                results += _run_round(pool, fn, round_, report, q, progress)
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


def _init_worker(log_path: str | None, watched: dict[str, Any] | None) -> None:
    """Native logs to the log file, then the parent stage's contract on what the worker opens."""
    if log_path:
        os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
    fd = os.open(log_path or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    contract.install_in_worker(watched)


def _drain(q: Any, progress: Progress) -> None:
    while True:
        try:
            progress.advance(q.get_nowait())
        except queue.Empty:
            return
