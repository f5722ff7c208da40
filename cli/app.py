"""The `anchor` Typer application, its command groups and the consoles every command prints to.

Commands live in cli/commands/ by group; they import this module to register themselves, and cli/main.py imports
them all.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Make-Your-Anchor+ pipeline: onboard anchors, train, render, trace and version their "
                       "artifacts.")
stage_app = typer.Typer(no_args_is_help=True, help="Run or list single stages (dvc.yaml's commands use these).")
dvc_app = typer.Typer(no_args_is_help=True, help="Keep dvc.yaml in step with the stage registry.")
bench_app = typer.Typer(no_args_is_help=True, help="Speed and memory benchmarks (figures, not tests).")
motion_app = typer.Typer(no_args_is_help=True, help="Bring SMPL-X motion (files or another video) to an identity.")
schedule_app = typer.Typer(no_args_is_help=True, help="Register scheduled flows (Prefect deployments); "
                           "`anchor serve` runs them.")
app.add_typer(stage_app, name="stage")
app.add_typer(dvc_app, name="dvc")
app.add_typer(bench_app, name="bench")
app.add_typer(motion_app, name="motion")
app.add_typer(schedule_app, name="schedule")

out = Console()
err = Console(stderr=True)
STATE: dict[str, Any] = {"workspace": None, "verbose": False}

WorkspaceOpt = Annotated[str | None, typer.Option("--workspace", "-w", envvar="ANCHOR_WORKSPACE",
                                                  help="Workspace directory (default: the project root).")]


@app.callback()
def _main(workspace: WorkspaceOpt = None,
          verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Prefect's and DVC's logs.")] = False
          ) -> None:
    STATE["workspace"] = workspace
    STATE["verbose"] = verbose


def say(text: str) -> None:
    """One line as it is: names and paths can hold brackets (`interview [take2].mp4`) that rich would eat."""
    out.print(text, markup=False, highlight=False, soft_wrap=True)
