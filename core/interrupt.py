"""Ctrl-C that always stops a run, whichever thread is working.

Python delivers SIGINT to the main thread only, and a library on that thread can swallow the KeyboardInterrupt (an
asyncio runner that turns it into a cancellation that is then caught). So the command line installs a handler that
also remembers the request; stage work checks it at every progress tick, and the command exits 130 even if the
exception itself was lost on the way.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

from core.progress import NullProgress, Progress

_REQUESTED = threading.Event()


def _handler(signum: int, frame: FrameType | None) -> None:
    _REQUESTED.set()
    raise KeyboardInterrupt


def install() -> None:
    """Take over SIGINT (main thread only, as Python requires)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _handler)


def requested() -> bool:
    return _REQUESTED.is_set()


def check() -> None:
    """Raise KeyboardInterrupt in the calling thread once an interrupt was requested."""
    if _REQUESTED.is_set():
        raise KeyboardInterrupt("interrupted")


class Interruptible:
    """A stage's progress handle that stops the stage at its next tick after Ctrl-C."""

    def __init__(self, progress: Progress | None) -> None:
        self._inner: Any = progress or NullProgress()

    def start(self, description: str, total: int) -> None:
        check()
        self._inner.start(description, total)

    def advance(self, n: int = 1) -> None:
        check()
        self._inner.advance(n)
