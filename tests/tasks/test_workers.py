"""Worker processes: results in job order, and with jobs_per_process, fresh processes every round."""

from __future__ import annotations

import os
import time
from pathlib import Path

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


def _started_with(name: str, report: Reporter) -> tuple[bool, str | None, str]:
    import sys

    return "mediapipe" in sys.modules, os.environ.get(name), os.getcwd()


def test_workers_start_with_mediapipe_loaded_and_the_callers_environment_of_now(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Forked from the fork server, which imported MediaPipe once: no worker pays the seconds of importing it
    again. The server's environment and directory are those it started with; a worker runs with the caller's as
    they are."""
    import sys

    before = os.getcwd()
    assert run_parallel(_started_with, ["ANCHOR_TEST_SEEN"], 1, NullProgress()) == [(True, None, before)]
    monkeypatch.setenv("ANCHOR_TEST_SEEN", "later")
    monkeypatch.chdir(tmp_path)
    assert run_parallel(_started_with, ["ANCHOR_TEST_SEEN"], 1, NullProgress()) == [(True, "later", str(tmp_path))]
    assert "mediapipe" not in sys.modules  # not in the caller: MediaPipe's native logging stays off its stderr


def test_the_fork_server_has_one_thread_after_its_preload() -> None:
    """A fork copies only the thread that forks: a preloaded module that started a thread (a pool, an allocator's
    background thread) would leave its locks held in every worker."""
    import subprocess
    import sys

    from tasks.workers import PRELOAD

    script = f"import os\nfor m in {list(PRELOAD)!r}: __import__(m)\nprint(len(os.listdir('/proc/self/task')))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parents[2], env={**os.environ, "OMP_NUM_THREADS": "1",
                                                              "OPENBLAS_NUM_THREADS": "1"})
    assert done.stdout.strip() == "1", done.stderr
