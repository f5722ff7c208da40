"""Ctrl-C stops stage work in any thread, even when the KeyboardInterrupt itself is swallowed on the main thread."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator

import pytest

from core import interrupt


@pytest.fixture
def handler() -> Iterator[None]:
    before = signal.getsignal(signal.SIGINT)
    interrupt.install()
    yield
    signal.signal(signal.SIGINT, before)
    interrupt._REQUESTED.clear()


def test_a_swallowed_ctrl_c_still_stops_the_next_progress_tick_in_a_worker_thread(handler: None) -> None:
    ticks: list[int] = []

    class Count:
        def start(self, description: str, total: int) -> None:
            pass

        def advance(self, n: int = 1) -> None:
            ticks.append(n)

    progress = interrupt.Interruptible(Count())
    progress.advance()
    assert ticks == [1] and not interrupt.requested()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        signal.pthread_sigmask(signal.SIG_BLOCK, [])  # a syscall: the handler runs here at the latest
    except KeyboardInterrupt:
        pass  # swallowed, as a library on the main thread might
    assert interrupt.requested()
    raised: list[BaseException] = []

    def stage() -> None:
        try:
            progress.advance()
        except BaseException as exc:  # noqa: BLE001 - the test looks at what the worker thread saw
            raised.append(exc)

    worker = threading.Thread(target=stage)
    worker.start()
    worker.join()
    assert [type(e) for e in raised] == [KeyboardInterrupt]
    assert ticks == [1]  # the tick after Ctrl-C never reached the display
