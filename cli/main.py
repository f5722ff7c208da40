"""`anchor`: the command line over the pipeline. Errors print as one line on stderr with a non-zero exit."""

from __future__ import annotations

import sys

from cli.app import app, err
from cli.commands import audit, bench, onboard, render, schedule, train, workspace  # noqa: F401 - registers them
from core.errors import AnchorError


def main() -> None:
    try:
        app()
    except AnchorError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted: completed stages are kept; run the same command to resume", highlight=False)
        sys.exit(130)


if __name__ == "__main__":
    main()
