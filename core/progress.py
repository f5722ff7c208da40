"""Progress reporting that stages can call without knowing who is watching (a terminal, Prefect, nobody)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Protocol


class Progress(Protocol):
    def start(self, description: str, total: int) -> None: ...

    def advance(self, n: int = 1) -> None: ...


class NullProgress:
    def start(self, description: str, total: int) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


#: Where a flow's warnings go (the command line points it at its console); one line each.
notice: Callable[[str], None] = _stderr


def notify(message: str) -> None:
    notice(message)
