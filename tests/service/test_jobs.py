"""A job's progress as the API reads it: one Prefect progress artifact, stages finished plus the running phase over
the stages the job has, never going back, its description the phase at work."""

from __future__ import annotations

import pytest

from flows import jobs, stage_task
from tasks import registry


class _Runner:
    """What JobProgress reads of a StageRunner: the stages finished so far."""

    def __init__(self) -> None:
        self.results: dict[tuple[str, str], dict] = {}


@pytest.mark.slow  # a Prefect server of its own in a worker that would need none in `make test-fast`
@pytest.mark.usefixtures("prefect_harness")
def test_job_progress_counts_stages_and_phases_and_never_goes_back() -> None:
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.context import get_run_context

    seen: list[tuple[float, str]] = []
    total = len(registry.in_flow("render"))

    @flow
    def job() -> str:
        with jobs.JobProgress(jobs.RENDER_FLOWS, every=0.0) as progress:
            runner = progress.stages = _Runner()
            assert progress.total == total

            def read() -> None:
                with get_client(sync_client=True) as client:
                    [artifact] = client.read_artifacts(artifact_filter=ArtifactFilter(
                        flow_run_id=ArtifactFilterFlowRunId(any_=[get_run_context().flow_run.id])))
                seen.append((float(artifact.data), artifact.description))

            body = stage_task.progress_factory("render_body", "demo/0123456789ab")
            body.start("denoising 10 frames", 10)
            body.advance(5)
            read()
            body.start("decoding frames", 4)  # a new phase of the same stage: less done in it, never less shown
            read()
            runner.results[("render_body", "demo/0123456789ab")] = {}
            face = stage_task.progress_factory("face", "demo/0123456789ab")
            face.start("face: inpainting", 2)
            face.advance(1)
            read()
            face.advance(5)  # more than the phase has: capped
            read()
        return str(get_run_context().flow_run.id)

    run_id = job()
    assert seen[0] == (round(100 * 0.5 / total, 2), "render_body: denoising 10 frames")
    assert seen[1] == (seen[0][0], "render_body: decoding frames")
    assert seen[2] == (round(100 * 1.5 / total, 2), "face: inpainting")
    assert seen[3] == (round(100 * 2 / total, 2), "face: inpainting")
    assert stage_task.progress_factory("x", "y").__class__.__name__ == "NullProgress"  # restored after the job
    with get_client(sync_client=True) as client:
        [artifact] = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[run_id])))
    assert (float(artifact.data), artifact.description) == (100.0, "done")
