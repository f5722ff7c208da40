"""Peak memory of a piece of work, including the worker processes it starts."""

from __future__ import annotations

import contextlib
import threading
from types import TracebackType

import psutil


class PeakRSS:
    """Samples RSS of this process plus its children in a background thread; `peak_mb` after exit."""

    def __init__(self, interval: float = 0.25) -> None:
        # each sample walks every process of the machine (children are found by parent id): at 20 a second that
        # was a tenth of an onboarding's CPU time; a peak that lasts under a quarter second is not one to plan for
        self.interval = interval
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._proc = psutil.Process()

    def _sample(self) -> None:
        total = 0
        try:
            total = self._proc.memory_info().rss
            for child in self._proc.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    total += child.memory_info().rss
        except psutil.Error:
            return
        self.peak_bytes = max(self.peak_bytes, total)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakRSS:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def peak_mb(self) -> float:
        return round(self.peak_bytes / 2**20, 1)
