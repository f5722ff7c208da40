"""Progress on long work: a rich display shared by the stages of a flow (they report from Prefect's worker threads).

Without a terminal (CI logs, pipes) the bars are off and each phase prints one line instead, so a log still says
what a run was doing, waiting for another run's lock included.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class StageProgress:
    """One stage's handle on the shared display (core.progress.Progress)."""

    def __init__(self, bar: Progress, console: Console, identity: str) -> None:
        self.bar, self.console, self.identity = bar, console, identity
        self.task: Any = None

    def start(self, description: str, total: int) -> None:
        label = f"[{self.identity}] {description}"
        if not self.console.is_terminal:
            self.console.print(label, markup=False, highlight=False, soft_wrap=True)
        if self.task is None:
            self.task = self.bar.add_task(label, total=total)
        else:
            self.bar.update(self.task, description=label, total=total, completed=0)

    def advance(self, n: int = 1) -> None:
        if self.task is not None:
            self.bar.advance(self.task, n)


class ProgressDisplay:
    """`with ProgressDisplay(console) as factory:` gives factory(stage, identity) → a StageProgress."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.bar = Progress(TextColumn("{task.description:<34}", markup=False), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=console, transient=False, disable=not console.is_terminal)

    def __enter__(self) -> Any:
        self.bar.start()
        return lambda stage, identity: StageProgress(self.bar, self.console, identity)

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()
