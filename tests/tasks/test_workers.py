"""Worker processes: results in job order, and with jobs_per_process, fresh processes every round."""

from __future__ import annotations

import os
import time

import pytest

from core.progress import NullProgress
from tasks.workers import Reporter, run_parallel


def _where(job: int, report: Reporter) -> tuple[int, int]:
    report()
    return job, os.getpid()


def test_rounds_of_fresh_processes_keep_the_job_order() -> None:
    done = run_parallel(_where, list(range(7)), 2, NullProgress(), jobs_per_process=1)
    assert [job for job, _ in done] == list(range(7))
    rounds = [{pid for _, pid in done[k:k + 2]} for k in range(0, 7, 2)]  # 2 workers × 1 job a round
    for i, first in enumerate(rounds):
        for later in rounds[i + 1:]:
            assert not first & later, "a process outlived its round"
    assert os.getpid() not in {pid for _, pid in done}
    shared = run_parallel(_where, list(range(4)), 1, NullProgress())
    assert len({pid for _, pid in shared}) == 1  # without a limit, one pool does it all


def _slow_or_failing(job: int, report: Reporter) -> int:
    if job == 0:
        raise ValueError("job 0 failed")
    time.sleep(60)
    return job


def test_a_failing_job_stops_the_others_at_once() -> None:
    started = time.monotonic()
    with pytest.raises(ValueError, match="job 0 failed"):
        run_parallel(_slow_or_failing, [0, 1, 2], 2, NullProgress())
    assert time.monotonic() - started < 30  # the sleeping worker was terminated, not waited for
