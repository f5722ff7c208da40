"""anchor schedule rerender, serve: flows on a cron schedule as Prefect deployments, and the service that runs
them with the HTTP API's jobs."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.app import app, out, say, schedule_app
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
def serve(host: Annotated[str | None, typer.Option("--host", help="Address to bind (default: service.host, "
                                                   "loopback); beyond loopback only with bearer tokens.")] = None,
          port: Annotated[int | None, typer.Option("--port", min=1, max=65535, help="Port (default: service.port)."
                                                   )] = None,
          pool: Annotated[str | None, typer.Option("--pool", help="A Prefect work pool whose workers (`anchor "
                                                   "worker`) run the jobs and schedules (default: service.pool; "
                                                   "none: this process runs them).")] = None) -> None:
    """Serve the browser UI (at /) and the HTTP API (jobs that onboard and render; docs at /docs), and run its jobs
    and the workspace's scheduled flows with Prefect — or hand them to a work pool — until stopped (Ctrl-C); runs
    appear in Prefect's UI too."""
    from service.server import shared_prefect
    from tasks import registry

    ws = workspace()
    settings = registry.params(ws).service
    if pool or settings.pool:
        shared_prefect(f"--pool {pool or settings.pool}")  # before an embedded server is started for nothing
    with prefect_api(ws):  # Prefect reads its settings at import: import the flows after this
        from service.server import serve as serve_api

        serve_api(ws, host or settings.host, port or settings.port, say, pool=pool)


@app.command()
def worker(pool: Annotated[str, typer.Option("--pool", help="The Prefect work pool to take runs from (made, as a "
                                             "process pool, if it does not exist).")],
           limit: Annotated[int | None, typer.Option("--limit", min=1, help="Runs at a time (default: no limit).")
                            ] = None) -> None:
    """Run the jobs and schedules `anchor serve --pool` hands to a work pool, in this workspace, until stopped
    (Ctrl-C): the server's own workspace, or one of this machine's that names the same shared remote
    (storage.remote), through which identities, uploads and renders travel. Needs the Prefect server every
    machine reaches ($PREFECT_API_URL)."""
    from service.server import shared_prefect

    ws = workspace()
    shared_prefect("anchor worker")  # before an embedded server is started for nothing
    with prefect_api(ws):
        from service.server import work
        from tasks import registry

        work(ws, pool, say, limit=limit, poll_s=registry.params(ws).service.poll_s)
