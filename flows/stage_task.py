"""Stages as Prefect tasks: cached on content hashes, verified on every hit, one ledger row per execution."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.states import State

from core.artifacts import now_iso, verify
from core.errors import AnchorError, StageError
from core.progress import NullProgress, Progress
from core.workspace import Workspace
from flows import execution
from tasks import registry, runner

# Set by the command line to draw progress bars; stages run the same without it.
progress_factory: Callable[[str, str], Progress] = lambda stage, identity: NullProgress()  # noqa: E731


class ContentHashPolicy(CachePolicy):
    """Cache key = hash(stage code, params section, input content hashes, identity): never paths or run ids."""

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        ws = Workspace(Path(inputs["workspace"]))
        spec = registry.get(inputs["stage"])
        return runner.cache_key(ws, spec, inputs["identity"], inputs["input_hashes"], inputs.get("overrides"))


def private_cache(ws: Workspace) -> Path:
    """This user's own directory for the workspace's Prefect cache records ($ANCHOR_CACHE_HOME, else
    $XDG_CACHE_HOME/anchor or ~/.cache/anchor), which no one else may write."""
    base = Path(os.environ.get("ANCHOR_CACHE_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or
                                                             Path.home() / ".cache") / "anchor")
    folder = base / "prefect-cache" / hashlib.sha256(str(ws.root.resolve()).encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = folder.stat()
    if st.st_uid != os.getuid():
        raise StageError(f"{folder}: Prefect's cache records must be this user's alone (it belongs to user "
                         f"{st.st_uid}); set ANCHOR_CACHE_HOME to a directory of your own")
    if st.st_mode & 0o077:
        folder.chmod(0o700)
    return folder


def run_stage(workspace: str, stage: str, identity: str, input_hashes: dict[str, str],
              external: str | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The task body. A module-level function of its own, so Dask workers import it by name rather than receive
    it by value with this process's progress display (which cannot cross processes; there they report nothing)."""
    ws = Workspace(Path(workspace))
    result = runner.execute(ws, stage, identity, external=Path(external) if external else None,
                            progress=progress_factory(stage, identity), overrides=overrides)
    if result.input_hashes != input_hashes:
        raise StageError(f"{stage} of {identity!r}: inputs changed while it ran; run again")
    return json.loads(json.dumps(result.to_dict(), default=str))  # plain JSON values: what the cache keeps


# Results are kept as JSON, never pickled: the cache records sit in the workspace, which other users of a shared
# workspace can write, and unpickling what they wrote could run their code.
stage_task = task(name="stage", cache_policy=ContentHashPolicy(), persist_result=True, result_serializer="json",
                  task_run_name="{stage}[{identity}]")(run_stage)


class StageRunner:
    """Runs stages of one flow run through Prefect and keeps the ledger and the cache honest."""

    def __init__(self, ws: Workspace, run_id: str, flow: str) -> None:
        self.ws = ws
        self.run_id = run_id
        self.flow = flow
        # cache records are per workspace and per user, outside the workspace: a record names how to read its
        # result, and one planted in a shared workspace could name pickle (ours are JSON)
        policy = ContentHashPolicy().configure(key_storage=str(private_cache(ws)))
        p = registry.params(ws).execution
        self.task = stage_task.with_options(cache_policy=policy, retries=p.retries,
                                            retry_delay_seconds=p.retry_delay_s,
                                            retry_condition_fn=execution.retry_transient)
        execution.apply_limits(p)
        self.results: dict[tuple[str, str], dict[str, Any]] = {}
        self.cache_hits: dict[tuple[str, str], bool] = {}

    @classmethod
    def of_this_run(cls, ws: Workspace, flow: str) -> StageRunner:
        """The runner of the flow run this is called in (its id is the ledger's run id)."""
        from prefect.context import get_run_context

        return cls(ws, str(get_run_context().flow_run.id), flow=flow)  # type: ignore[union-attr]

    def _args(self, stage: str, identity: str, external: Path | None,
              overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        spec = registry.get(stage)
        hashes = runner.input_hashes(self.ws, spec, identity, external, check=False, overrides=overrides)
        return {"workspace": str(self.ws.root), "stage": stage, "identity": identity, "input_hashes": hashes,
                "external": str(external) if external else None, "overrides": overrides or None}

    def run(self, stage: str, identity: str, external: Path | None = None,
            overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.run_many([stage], identity, {stage: external}, {stage: overrides or {}})[stage]

    def run_steps(self, steps: list[list[str]], owner: str, external: dict[str, Path | None] | None = None,
                  overrides: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
        """Steps in order, the stages of a step at once (`registry.layers` makes the steps)."""
        out: dict[str, dict[str, Any]] = {}
        for step in steps:
            out.update(self.run_many(step, owner, {s: (external or {}).get(s) for s in step},
                                     {s: (overrides or {}).get(s) or {} for s in step}))
        return out

    def run_many(self, stages: list[str], identity: str, external: dict[str, Path | None] | None = None,
                 overrides: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
        """Run independent stages concurrently; a cache hit whose artifact is gone or altered is recomputed."""
        external = external or {}
        overrides = overrides or {}
        started = {s: (now_iso(), time.perf_counter()) for s in stages}
        args = {s: self._args(s, identity, external.get(s), overrides.get(s)) for s in stages}
        futures = {s: self.task.with_options(tags=execution.tags(registry.get(s))).submit(**args[s]) for s in stages}
        out: dict[str, dict[str, Any]] = {}
        errors: list[BaseException] = []
        for stage, fut in futures.items():
            fut.wait()
            try:
                out[stage] = self._settle(stage, identity, fut.state, args[stage], started[stage])
            except BaseException as exc:  # noqa: BLE001 - collected, the first is re-raised below
                errors.append(exc)
        if errors:
            raise errors[0]
        return out

    def _settle(self, stage: str, identity: str, state: State, args: dict[str, Any],
                started: tuple[str, float]) -> dict[str, Any]:
        cached = state.name == "Cached"
        if state.is_completed():
            result = state.result()
            if cached and not verify(self.ws.root / result["path"], result["output_hash"]):
                # Prefect remembers a result whose artifact was deleted or changed: never trust it, recompute.
                state = self.task.with_options(refresh_cache=True, tags=execution.tags(registry.get(stage)))(
                    **args, return_state=True)
                cached = False
                if state.is_completed():
                    result = state.result()
        if not state.is_completed():
            exc = state.result(raise_on_failure=False)
            message = str(exc) if isinstance(exc, BaseException) else state.message or "failed"
            runner.record(self.ws, run_id=self.run_id, flow=self.flow, stage=stage, identity=identity,
                          status="failed", cache_hit=False, started_at=started[0],
                          duration_s=round(time.perf_counter() - started[1], 3), error=message)
            if isinstance(exc, BaseException):
                raise exc
            raise AnchorError(f"{stage} of {identity!r}: {message}")
        cached = cached or bool(result.get("reused"))
        runner.record(self.ws, run_id=self.run_id, flow=self.flow, stage=stage, identity=identity,
                      status="completed", cache_hit=cached, result=result, started_at=started[0],
                      duration_s=round(time.perf_counter() - started[1], 3) if cached else None)
        self.results[(stage, identity)] = result
        self.cache_hits[(stage, identity)] = cached
        return result
