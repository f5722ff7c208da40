"""The runner: one stage under the contract — cache key recorded, an artifact of the same key taken as it is, the
declared outputs checked, nothing half-written left behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.artifacts import read_manifest
from core.errors import StageError
from core.workspace import Workspace
from tasks import registry, runner
from tests.conftest import ONBOARDED_ID, copy_workspace

pytestmark = pytest.mark.slow  # on an onboarded identity
ID = ONBOARDED_ID


@pytest.fixture
def ws(tmp_path: Path, onboarded: Path) -> Workspace:
    return Workspace(copy_workspace(onboarded, tmp_path / "ws"))


def _stamp(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_the_manifest_records_the_cache_key_and_a_second_run_takes_the_artifact_untouched(ws: Workspace) -> None:
    spec = registry.get("perturb")
    key = runner.cache_key(ws, spec, ID, runner.input_hashes(ws, spec, ID))
    art = registry.artifact_dir(ws, "perturb", ID)
    assert read_manifest(art)["cache_key"] == key
    before = _stamp(art)
    again = runner.execute(ws, "perturb", ID)
    assert again.reused and again.cache_key == key and _stamp(art) == before  # no file written
    changed = runner.execute(ws, "perturb", ID, overrides={"seed": 3})
    assert not changed.reused and changed.cache_key != key
    assert read_manifest(art)["cache_key"] == changed.cache_key


def test_an_altered_artifact_is_made_again_not_trusted(ws: Workspace) -> None:
    art = registry.artifact_dir(ws, "perturb", ID)
    table = art / "params.parquet"
    original = table.read_bytes()
    table.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    again = runner.execute(ws, "perturb", ID)
    assert not again.reused and table.read_bytes() == original


def test_a_stage_that_does_not_write_what_it_declares_fails_and_leaves_nothing(ws: Workspace, monkeypatch) -> None:
    from tasks.stages import perturb

    monkeypatch.setattr(perturb, "run", lambda inputs, out, params, progress: {"frames": 0})
    art = registry.artifact_dir(ws, "perturb", ID)
    before = _stamp(art)
    with pytest.raises(StageError, match=r"perturb did not write its declared output\(s\) params.parquet"):
        runner.execute(ws, "perturb", ID, overrides={"seed": 4})
    assert _stamp(art) == before
    assert not [p for p in art.parent.iterdir() if p.name.startswith(".perturb")]


def test_a_shared_stage_reads_each_identitys_artifacts_by_name(ws: Workspace) -> None:
    from core.workspace import SHARED

    dirs = runner.input_dirs(ws, registry.get("pretrain"), SHARED)
    assert {k: (stage, owner) for k, (stage, owner, _) in dirs.items()} == {
        f"{s}@{ID}": (s, ID) for s in ("ingest", "matting", "render_mesh")}


def test_a_stage_that_reads_an_undeclared_file_or_writes_beside_its_output_breaks_the_contract(
        ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every stage in the suite runs under the contract check; here perturb is changed to read keypoints (not its
    input) and then to write into smplx_fit (not its output)."""
    import tasks.stages.perturb as perturb
    from core.contract import ContractViolation

    real = perturb.run
    keypoints = registry.artifact_dir(ws, "keypoints", ID) / "keypoints.parquet"
    fit = registry.artifact_dir(ws, "smplx_fit", ID)

    def reads_keypoints(inputs, out, params, progress, **kw):  # noqa: ANN001, ANN202
        keypoints.read_bytes()
        return real(inputs, out, params, progress, **kw)

    def writes_into_its_input(inputs, out, params, progress, **kw):  # noqa: ANN001, ANN202
        summary = real(inputs, out, params, progress, **kw)
        (fit / "note.txt").write_text("mine")
        return summary

    before = read_manifest(registry.artifact_dir(ws, "perturb", ID))["output_hash"]
    for sneaky, says in ((reads_keypoints, f"perturb read {keypoints}"), (writes_into_its_input, "perturb wrote")):
        monkeypatch.setattr(perturb, "run", sneaky)
        with pytest.raises(ContractViolation, match=says):
            runner.execute(ws, "perturb", ID, overrides={"seed": 7})
    assert not (fit / "note.txt").exists()
    parent = registry.artifact_dir(ws, "perturb", ID).parent
    assert read_manifest(registry.artifact_dir(ws, "perturb", ID))["output_hash"] == before  # nothing replaced
    assert not [p.name for p in parent.iterdir() if ".tmp-" in p.name]
    monkeypatch.setattr(perturb, "run", real)
    assert not runner.execute(ws, "perturb", ID, overrides={"seed": 7}).reused  # the honest stage passes


def test_a_library_at_another_version_reruns_the_stages_that_import_it_and_no_other(
        ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    import core.stage
    from core.packages import installed_versions

    assert "librosa" in registry.get("speech").packages() and "librosa" not in registry.get("perturb").packages()
    monkeypatch.setattr(core.stage, "installed_versions",
                        lambda names: {**installed_versions(names), **({"librosa": "99.0"} if "librosa" in names
                                                                        else {})})
    onboard = ("ingest", "keypoints", "matting", "smplx_fit", "perturb", "render_mesh", "speech")
    reran = {stage for stage in onboard if not runner.execute(ws, stage, ID).reused}
    assert reran == {"speech"}
    assert read_manifest(registry.artifact_dir(ws, "speech", ID))["packages"]["librosa"] == "99.0"
