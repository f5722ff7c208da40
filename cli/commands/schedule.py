"""anchor schedule rerender, serve: flows on a cron schedule, as Prefect deployments."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.app import app, out, schedule_app
from cli.env import prefect_api, workspace
from core.workspace import check_identity_name


@schedule_app.command("rerender")
def schedule_rerender(
        cron: Annotated[str, typer.Option("--cron", help='When, as a cron line, e.g. "0 3 * * *" (03:00 daily).')],
        timezone: Annotated[str | None, typer.Option("--timezone", help="IANA zone of the cron line (default "
                                                     "UTC), e.g. Europe/Paris.")] = None,
        name: Annotated[str | None, typer.Option("--identity", help="Only this identity's renders.")] = None,
) -> None:
    """Register the re-render of stale renders as a Prefect deployment on a cron schedule."""
    from core.errors import InputError

    if name:
        check_identity_name(name)
    try:
        from prefect.schedules import Cron

        Cron(cron, timezone=timezone)
    except ValueError as exc:
        raise InputError(f"--cron {cron!r} / --timezone {timezone!r}: {exc}") from None
    ws = workspace()
    with prefect_api(ws):  # flows.rerender imports Prefect, which reads its settings at import: after this
        from flows.rerender import deployments, save_schedule

        save_schedule(ws, cron, timezone, name)
        for deployment in deployments(ws):
            deployment_id = deployment.apply()
            out.print(f"deployment rerender/{deployment.name} ({deployment_id}): {cron}"
                      f"{' ' + timezone if timezone else ' UTC'}; run it with `anchor serve`",
                      markup=False, highlight=False)


@app.command()
def serve() -> None:
    """Serve the workspace's scheduled flows with Prefect until stopped (Ctrl-C); runs appear in Prefect's UI."""
    from core.errors import InputError

    ws = workspace()
    with prefect_api(ws):  # flows.rerender imports Prefect, which reads its settings at import: after this
        from prefect import serve as prefect_serve

        from flows.rerender import deployments

        found = deployments(ws)
        if not found:
            raise InputError("nothing is scheduled here; first `anchor schedule rerender --cron \"0 3 * * *\"`")
        out.print(f"serving {', '.join('rerender/' + d.name for d in found)}", markup=False, highlight=False)
        prefect_serve(*found)
