"""`anchor`: the command line over the pipeline. Errors print as one line on stderr with a non-zero exit; an
unexpected one names the log file that holds its full traceback."""

from __future__ import annotations

import sys
import tempfile
import traceback
from datetime import UTC, datetime
from pathlib import Path

from cli.app import STATE, app, err
from cli.commands import audit, bench, onboard, render, schedule, train, workspace  # noqa: F401 - registers them
from core import interrupt
from core.errors import AnchorError


def _log_dir() -> Path:
    try:
        from core.workspace import find_workspace

        return find_workspace(STATE["workspace"]).state / "logs"
    except Exception:  # noqa: BLE001 - no workspace to log into: the system's temporary directory
        return Path(tempfile.gettempdir()) / "anchor-logs"


def _log_crash(exc: BaseException) -> Path:
    folder = _log_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"crash-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%fZ')}.log"
    path.write_text(f"anchor {' '.join(sys.argv[1:])}\n\n"
                    + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    return path


def main() -> None:
    interrupt.install()
    try:
        try:
            app()  # Typer ends every command with SystemExit, success included
        except SystemExit as done:
            if interrupt.requested() and done.code in (0, None):
                raise KeyboardInterrupt from None  # swallowed on its way up: still not a success
            raise
    except AnchorError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted: completed stages are kept; run the same command to resume", highlight=False)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - a bug or an unforeseen failure: one line, the rest in the log
        log = _log_crash(exc)
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        err.print(f"error: unexpected {type(exc).__name__}: {first} (full traceback in {log})", markup=False,
                  highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
