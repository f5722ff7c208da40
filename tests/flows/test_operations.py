"""Studio operations: one writer per artifact; several identities at once on threads or a Dask cluster, the shared
work done once; Prefect retries of transient I/O errors; resource tags with concurrency limits; the onboard command's
pairs and manifest."""

from __future__ import annotations

import errno
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from filelock import FileLock
from typer.testing import CliRunner

from cli.commands.onboard import _pairs
from cli.main import app
from core import ledger
from core.artifacts import read_manifest, verify
from core.errors import InputError, ParamsError
from core.workspace import SHARED, Workspace
from tasks.registry import artifact_dir, params, parse_params
from tests.conftest import ONBOARDED_ID, ROOT, TEST_PARAMS, copy_workspace, make_workspace

PREPROCESS = ("source", "ingest", "keypoints", "matting", "smplx_fit", "perturb", "render_mesh", "speech")

slow = pytest.mark.slow  # on onboarded or trained identities; the quick checks below are not
ID = ONBOARDED_ID


def _stage_run(root: Path, stage: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "cli.main", "-w", str(root), "stage", "run", stage, ID], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _lock(ws: Workspace, stage: str) -> FileLock:
    return FileLock(ws.state / "locks" / f"{stage}@{ID}.lock")


@slow
def test_a_second_writer_waits_then_takes_what_the_first_made(onboarded: Path, tmp_path: Path) -> None:
    # a bounded wait: were the waiting to regress, the run would stop in a minute rather than hang the suite
    ws = Workspace(copy_workspace(onboarded, tmp_path / "ws", {"storage": {"lock_wait_s": 60.0}}))
    art = artifact_dir(ws, "perturb", ID)
    before = read_manifest(art)
    held = _lock(ws, "perturb")
    held.acquire()
    try:
        proc = _stage_run(ws.root, "perturb")
        assert proc.stderr is not None
        # the run says in its log that it waits (however long a loaded machine takes to get there) ...
        waiting = f"[{ID}] perturb: waiting for another run writing data/identities/{ID}/perturb"
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if waiting in line:
                break
        assert waiting in "".join(lines), "".join(lines)
        time.sleep(1.0)
        assert proc.poll() is None  # ... and still waits
    finally:
        held.release()  # the "first writer" finishes (its artifact is already in place)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, "".join(lines) + stderr
    assert f"perturb[{ID}]" in stdout
    assert read_manifest(art) == before  # and took the finished artifact instead of writing it again


@slow
def test_a_second_writer_stops_with_a_clear_message(onboarded: Path, tmp_path: Path) -> None:
    ws = Workspace(copy_workspace(onboarded, tmp_path / "ws", {"storage": {"lock_wait_s": 1.0}}))
    before = read_manifest(artifact_dir(ws, "perturb", ID))
    with _lock(ws, "perturb"):
        proc = _stage_run(ws.root, "perturb")
        _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert f"another run is writing data/identities/{ID}/perturb (waited 1 s" in stderr
    assert read_manifest(artifact_dir(ws, "perturb", ID)) == before
    assert not list(artifact_dir(ws, "perturb", ID).parent.glob(".perturb.tmp-*"))


def _reference(onboarded: Path) -> dict[str, str]:
    """Output hashes of the template, onboarded one stage after another by the runner (no Prefect, no threads)."""
    ws = Workspace(onboarded)
    return {stage: read_manifest(artifact_dir(ws, stage, ID))["output_hash"] for stage in PREPROCESS}


def _hashes(ws: Workspace, identity: str) -> dict[str, str]:
    return {stage: read_manifest(artifact_dir(ws, stage, identity))["output_hash"] for stage in PREPROCESS}


def _set(root: Path, section: str, values: dict) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params.setdefault(section, {}).update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params))


@slow
@pytest.mark.usefixtures("prefect_harness")
def test_two_identities_at_once_on_a_two_worker_dask_cluster_then_one_shared_pretrain_then_their_finetunes(
        onboarded: Path, short_video: Path, tmp_path: Path) -> None:
    """Both identities' stages side by side on the cluster's two single-threaded worker processes, then the shared
    pretrain once over both, then each finetune; every artifact is the one a plain sequential run makes (the
    session template, made stage by stage). Several identities at once on the default threads engine: the
    interrupted two-identity run in test_interrupt, checked against the same template."""
    import os

    import dask

    from flows.execution import task_runner
    from flows.onboard import onboard_many

    few = {"steps": {"tiny": 2, "cpu": 1, "sd15": 1}, "face_steps": {"tiny": 2, "cpu": 1, "sd15": 1}}
    ws = Workspace(make_workspace(tmp_path / "ws", {**TEST_PARAMS, "pretrain": few, "finetune": few}))
    _set(ws.root, "execution", {"engine": "dask", "dask_workers": 2})
    runner = task_runner(params(ws).execution)
    assert type(runner).__name__ == "DaskTaskRunner"
    # a cluster that starts slowly on a busy machine is waited for, not failed after Dask's default 5 s
    assert dask.config.get("distributed.comm.timeouts.connect") == "120s"
    names = ["ann", "bob"]
    summary = onboard_many.with_options(task_runner=runner)(str(ws.root), {n: str(short_video) for n in names},
                                                            train=True, evaluate=False)
    assert {n: o["status"] for n, o in summary["identities"].items()} == dict.fromkeys(names, "trained"), summary
    assert {n: o["version"]["version"] for n, o in summary["identities"].items()} == dict.fromkeys(names, 1)
    assert ws.identities() == names
    rows = ledger.read(ws.ledger_dir)
    rows = rows[(rows["run_id"] == summary["run_id"]) & (rows["stage"] != "version")]
    for name in names:
        own = rows[rows["identity"] == name]
        assert sorted(own["stage"]) == sorted([*PREPROCESS, "finetune"]), name
        assert set(own["status"]) == {"completed"} and not own["cache_hit"].any()
        # concurrency and the cluster changed nothing: every artifact is the one a plain sequential run makes
        assert _hashes(ws, name) == _reference(onboarded)
    # the shared pretrain ran once, over both, and every finetune started after it had finished
    shared = rows[rows["stage"] == "pretrain"]
    assert len(shared) == 1 and len(rows) == len(names) * (len(PREPROCESS) + 1) + 1
    pretrain = read_manifest(artifact_dir(ws, "pretrain", SHARED))
    assert {i["identity"] for i in pretrain["inputs"] if "identity" in i} == set(names)
    for name in names:
        tuned = read_manifest(artifact_dir(ws, "finetune", name))
        assert tuned["started_at"] >= pretrain["finished_at"]
        assert pretrain["output_hash"] in [i.get("output_hash") for i in tuned["inputs"]]
    # made by the two Dask worker processes, not here, and every identity's onboarding was under way at one moment
    made_by = {(s, n): read_manifest(artifact_dir(ws, s, n))["pid"] for s in PREPROCESS for n in names}
    assert os.getpid() not in made_by.values() and len(set(made_by.values())) == 2, made_by
    spans = {}
    for name in names:
        made = [read_manifest(artifact_dir(ws, s, name)) for s in PREPROCESS]
        spans[name] = (min(datetime.fromisoformat(m["started_at"]) for m in made),
                       max(datetime.fromisoformat(m["finished_at"]) for m in made))
    assert max(a for a, _ in spans.values()) < min(b for _, b in spans.values()), spans


@slow
@pytest.mark.usefixtures("prefect_harness")
def test_a_transient_io_error_is_retried_by_prefect_and_the_flow_completes(onboarded: Path, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.context import get_run_context

    import tasks.stages.perturb
    from flows.stage_task import StageRunner

    # a perturb seed of its own: a cache key no artifact of the template has, so the stage really runs
    ws = Workspace(copy_workspace(onboarded, tmp_path / "ws", {"execution": {"retries": 2, "retry_delay_s": 0.0},
                                                               "perturb": {"seed": 5}}))
    real = tasks.stages.perturb.run
    calls: list[int] = []
    failure = {"exc": OSError(errno.EIO, "simulated I/O error")}

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise failure["exc"]
        return real(*args, **kwargs)

    monkeypatch.setattr(tasks.stages.perturb, "run", flaky)

    @flow
    def one_stage(stage: str) -> str:
        runner = StageRunner(ws, str(get_run_context().flow_run.id), flow="test")
        runner.run(stage, ID)
        return runner.run_id

    run_id = one_stage("perturb")
    assert len(calls) == 2  # failed once, retried once, done
    rows = ledger.read(ws.ledger_dir)
    rows = rows[rows["run_id"] == run_id]
    assert list(rows["status"]) == ["completed"]
    assert verify(artifact_dir(ws, "perturb", ID))
    assert not list(ws.identity_dir(ID).glob(".perturb.tmp-*"))

    # a missing file is a mistake, not a hiccup: no retry, and the flow fails with it
    calls.clear()
    failure["exc"] = FileNotFoundError(errno.ENOENT, "no such file", "x.npz")
    _set(ws.root, "perturb", {"seed": 7})  # a new cache key, so the stage really runs
    with pytest.raises(FileNotFoundError):
        one_stage("perturb")
    assert len(calls) == 1

    # heavy stages carry their resource tag; the limits come from params.yaml
    tagged = one_stage("matting")
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name("tag:anchor-cpu")
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter

        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[tagged])),
                                     task_run_filter=TaskRunFilter())
    assert limit.limit == params(ws).execution.limits["cpu"] == 2
    assert [set(r.tags) for r in runs] == [{"anchor", "anchor-cpu"}]


def test_execution_params_are_checked() -> None:
    assert parse_params({"execution": {"limits": {"gpu": 4}}}).execution.limits == {"gpu": 4}
    with pytest.raises(ParamsError, match="limits >= 1"):
        parse_params({"execution": {"limits": {"gpu": 0}}})
    with pytest.raises(ParamsError, match="execution.engine"):
        parse_params({"execution": {"engine": "ray"}})


def test_onboard_pairs_and_manifest(tmp_path: Path) -> None:
    (tmp_path / "clips").mkdir()
    csv = tmp_path / "clips" / "anchors.csv"
    csv.write_text("name,video\nann, ann.mp4\nbob,/abs/bob.mov\n")
    pairs = _pairs(["cy=cy.mp4"], csv)
    assert pairs == {"cy": Path("cy.mp4"), "ann": tmp_path / "clips" / "ann.mp4", "bob": Path("/abs/bob.mov")}
    with pytest.raises(InputError, match="named twice"):
        _pairs(["ann=a.mp4"], csv)
    with pytest.raises(InputError, match="expected NAME=VIDEO"):
        _pairs(["ann"], None)
    with pytest.raises(InputError, match="invalid identity name"):
        _pairs(["Bad Name=a.mp4"], None)
    (tmp_path / "bad.csv").write_text("who,file\nann,a.mp4\n")
    with pytest.raises(InputError, match="needs columns name,video"):
        _pairs([], tmp_path / "bad.csv")
    with pytest.raises(InputError, match="nothing to onboard"):
        _pairs([], None)
    refused = CliRunner().invoke(app, ["-w", str(tmp_path), "onboard", "a=x.mp4", "b=y.mp4", "--video", "z.mp4"])
    assert refused.exit_code != 0
    assert "--video goes with exactly one NAME" in str(refused.exception) + refused.output
