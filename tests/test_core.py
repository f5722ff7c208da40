"""Unit tests of core/: params, hashing, artifacts, ledger, workspace, stage registry and dvc.yaml."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from core import ledger
from core.artifacts import OLD_TAG, TMP_TAG, atomic_dir, sweep_partials, verify, write_json
from core.dvcfile import render
from core.errors import InputError, ParamsError
from core.hashing import MANIFEST, hash_tree
from core.params import IngestParams, MattingParams, Params, default_params_yaml, load_params, parse_params
from core.workspace import IDENTITIES_FILE, SHARED, Workspace, check_identity_name
from tasks.registry import STAGES, downstream

ROOT = Path(__file__).resolve().parents[1]


def params_error(data: object) -> str:
    with pytest.raises(ParamsError) as info:
        parse_params(data)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# ---------------------------------------------------------------------------------------------------- params


def test_unknown_key_names_key_value_and_allowed_keys() -> None:
    message = params_error({"ingest": {"resolutoin": 512}})
    assert "ingest.resolutoin" in message
    assert "512" in message
    allowed = message.split("allowed here:", 1)[1]
    assert {k.strip() for k in allowed.split(",")} == set(IngestParams.model_fields)
    assert "resolution" in allowed


def test_unknown_section_lists_top_level_keys() -> None:
    message = params_error({"ingset": {"fps": 30}})
    assert "ingset" in message
    allowed = message.split("allowed here:", 1)[1]
    assert {k.strip() for k in allowed.split(",")} == set(Params.model_fields)


def test_wrong_type_names_key_and_value() -> None:
    message = params_error({"ingest": {"fps": "abc"}})
    assert "ingest.fps" in message
    assert "'abc'" in message
    assert "integer" in message


def test_out_of_range_names_key_value_and_bound() -> None:
    message = params_error({"ingest": {"resolution": 5}})
    assert "ingest.resolution" in message
    assert "= 5" in message
    assert "greater than or equal to 64" in message


def test_out_of_range_upper_bound() -> None:
    message = params_error({"ingest": {"resolution": 4096}})
    assert "ingest.resolution" in message
    assert "4096" in message
    assert "less than or equal to 2048" in message


def test_bad_literal_lists_allowed_values() -> None:
    message = params_error({"matting": {"backend": "x"}})
    assert "matting.backend" in message
    assert "'x'" in message
    for allowed in ("'auto'", "'selfie'", "'rvm'"):
        assert allowed in message


def test_even_temporal_window_is_refused() -> None:
    message = params_error({"matting": {"temporal_window": 4}})
    assert "matting" in message
    assert "temporal_window" in message
    assert "4" in message
    assert "odd" in message


def test_odd_temporal_window_is_accepted() -> None:
    assert parse_params({"matting": {"temporal_window": 7}}).matting.temporal_window == 7


def test_rvm_backend_without_weights_is_refused() -> None:
    message = params_error({"matting": {"backend": "rvm"}})
    assert "rvm_weights" in message


def test_params_must_be_a_mapping() -> None:
    message = params_error(["ingest"])
    assert "mapping" in message
    assert "list" in message


def test_partial_params_fill_in_defaults() -> None:
    p = parse_params({"ingest": {"fps": 25}})
    assert p.ingest.fps == 25
    assert p.ingest.resolution == IngestParams().resolution
    assert p.matting == MattingParams()
    assert parse_params(None) == Params()


def test_load_params_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("ingest:\n  fps: 30\n\tresolution: 512\n")
    with pytest.raises(ParamsError) as info:
        load_params(path)
    message = str(info.value)
    assert "\n" not in message
    assert "params.yaml" in message
    assert "line 3" in message


def test_load_params_validation_error_names_file(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("ingest:\n  resolution: 5\n")
    with pytest.raises(ParamsError) as info:
        load_params(path)
    message = str(info.value)
    assert message.startswith("params.yaml:")
    assert "ingest.resolution" in message and "greater than or equal to 64" in message


def test_load_params_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    with pytest.raises(ParamsError) as info:
        load_params(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    assert "not found" in message


def test_load_params_empty_file_gives_defaults(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("")
    assert load_params(path) == Params()


def test_repository_params_yaml_equals_defaults() -> None:
    assert load_params(ROOT / "params.yaml") == Params()


def test_default_params_yaml_round_trips(tmp_path: Path) -> None:
    text = default_params_yaml()
    assert parse_params(yaml.safe_load(text)) == Params()
    path = tmp_path / "params.yaml"
    path.write_text(text)
    assert load_params(path) == Params()
    # every field is written out, with its description as a comment
    for name, field in IngestParams.model_fields.items():
        assert f"  {name}: " in text
        if field.description:
            assert field.description in text


def test_section_digest_tracks_values() -> None:
    base = IngestParams()
    assert base.digest() == IngestParams().digest()
    assert base.digest() == IngestParams(fps=30, train_seconds=60).digest()  # 60 is coerced to 60.0
    assert IngestParams(fps=25).digest() != base.digest()
    assert IngestParams(crop_margin=0.16).digest() != base.digest()
    assert MattingParams(temporal_window=7).digest() != MattingParams().digest()


# ---------------------------------------------------------------------------------------------------- hashing


def make_tree(root: Path) -> Path:
    (root / "frames" / "train_000").mkdir(parents=True)
    (root / "frames" / "train_000" / "000000.jpg").write_bytes(bytes(range(256)) * 4)
    (root / "frames" / "train_000" / "000001.jpg").write_bytes(b"\x01\x02\x03" * 100)
    (root / "meta.json").write_text('{"fps": 30}\n')
    return root


def test_hash_tree_equal_for_equal_trees(tmp_path: Path) -> None:
    a = make_tree(tmp_path / "a")
    b = make_tree(tmp_path / "b")
    assert hash_tree(a) == hash_tree(b)


def test_hash_tree_leaves_out_the_manifest_and_dvcs_gitignore_only(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "a")
    before = hash_tree(root)
    (root / MANIFEST).write_text("{}")
    (root / ".gitignore").write_text("/report.html\n")  # DVC writes it beside outs tracked one by one
    assert hash_tree(root) == before
    (root / "sub" / ".gitignore").parent.mkdir(exist_ok=True)
    (root / "sub" / ".gitignore").write_text("x\n")  # only the artifact's own top level is DVC's
    assert hash_tree(root) != before


def test_hash_tree_changes_when_one_byte_flips(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "a")
    before = hash_tree(root)
    f = root / "frames" / "train_000" / "000000.jpg"
    data = bytearray(f.read_bytes())
    data[500] ^= 0x01
    f.write_bytes(bytes(data))
    assert hash_tree(root) != before


def test_hash_tree_changes_when_a_file_is_renamed(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "a")
    before = hash_tree(root)
    (root / "meta.json").rename(root / "meta2.json")
    assert hash_tree(root) != before


def test_hash_tree_changes_when_a_file_moves_to_another_directory(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "a")
    before = hash_tree(root)
    (root / "frames" / "train_001").mkdir()
    (root / "frames" / "train_000" / "000001.jpg").rename(root / "frames" / "train_001" / "000001.jpg")
    assert hash_tree(root) != before


def test_hash_tree_ignores_manifest(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "a")
    before = hash_tree(root)
    (root / MANIFEST).write_text('{"output_hash": "x"}\n')
    assert hash_tree(root) == before
    (root / MANIFEST).write_text('{"output_hash": "y"}\n')
    assert hash_tree(root) == before


# ---------------------------------------------------------------------------------------------------- artifacts


def siblings(parent: Path, name: str) -> list[Path]:
    return sorted(parent.glob(f".{name}.*"))


def finish(artifact: Path) -> str:
    """Write a manifest recording the artifact's content hash, as the stage runner does."""
    digest = hash_tree(artifact)
    write_json(artifact / MANIFEST, {"stage": "ingest", "output_hash": digest})
    return digest


def test_atomic_dir_failure_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "ingest"
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("half")
        assert tmp.parent == tmp_path and tmp.name.startswith(f".ingest{TMP_TAG}")
        raise RuntimeError("boom")
    assert not target.exists()
    assert siblings(tmp_path, "ingest") == []
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_interrupt_keeps_previous_artifact(tmp_path: Path) -> None:
    target = tmp_path / "ingest"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
        raise KeyboardInterrupt
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    assert siblings(tmp_path, "ingest") == []


def test_atomic_dir_success_creates_target(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "ingest"
    with atomic_dir(target) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.txt").write_text("a")
        assert not target.exists()
    assert (target / "sub" / "a.txt").read_text() == "a"
    assert siblings(target.parent, "ingest") == []


def test_atomic_dir_success_replaces_existing_target_completely(tmp_path: Path) -> None:
    target = tmp_path / "ingest"
    (target / "frames").mkdir(parents=True)
    (target / "frames" / "old.jpg").write_bytes(b"old")
    (target / "stale.txt").write_text("stale")
    with atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == ["new.txt"]
    assert (target / "new.txt").read_text() == "new"
    assert siblings(tmp_path, "ingest") == []


def test_sweep_partials_removes_temporary_dirs(tmp_path: Path) -> None:
    target = tmp_path / "ingest"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    tmp1 = tmp_path / f".ingest{TMP_TAG}abc123"
    tmp2 = tmp_path / f".ingest{TMP_TAG}def456"
    for d in (tmp1, tmp2):
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "x").write_text("partial")
    other = tmp_path / f".matting{TMP_TAG}abc123"
    other.mkdir()
    removed = sweep_partials(tmp_path, "ingest")
    assert sorted(removed) == sorted([tmp1, tmp2])
    assert not tmp1.exists() and not tmp2.exists()
    assert (target / "keep.txt").read_text() == "keep"
    assert other.exists()  # another artifact's leftovers are not this call's business


def test_sweep_partials_restores_displaced_complete_artifact(tmp_path: Path) -> None:
    old = tmp_path / f".ingest{OLD_TAG}abc123"
    old.mkdir()
    (old / "a.txt").write_text("whole")
    digest = finish(old)
    partial = tmp_path / f".ingest{TMP_TAG}def456"
    partial.mkdir()
    sweep_partials(tmp_path, "ingest")
    target = tmp_path / "ingest"
    assert (target / "a.txt").read_text() == "whole"
    assert verify(target, digest)
    assert siblings(tmp_path, "ingest") == []


def test_sweep_partials_drops_old_dir_without_manifest_or_when_target_exists(tmp_path: Path) -> None:
    no_manifest = tmp_path / f".ingest{OLD_TAG}aaa"
    no_manifest.mkdir()
    (no_manifest / "a.txt").write_text("a")
    removed = sweep_partials(tmp_path, "ingest")
    assert removed == [no_manifest]
    assert not (tmp_path / "ingest").exists()

    target = tmp_path / "ingest"
    target.mkdir()
    (target / "current.txt").write_text("current")
    finish(target)
    displaced = tmp_path / f".ingest{OLD_TAG}bbb"
    displaced.mkdir()
    (displaced / "previous.txt").write_text("previous")
    finish(displaced)
    assert sweep_partials(tmp_path, "ingest") == [displaced]
    assert sorted(p.name for p in target.iterdir()) == ["current.txt", MANIFEST]


def test_sweep_partials_missing_parent(tmp_path: Path) -> None:
    assert sweep_partials(tmp_path / "nope", "ingest") == []


def test_verify(tmp_path: Path) -> None:
    assert not verify(tmp_path / "missing")

    art = make_tree(tmp_path / "art")
    assert not verify(art)  # no manifest yet
    digest = finish(art)
    assert verify(art)
    assert verify(art, digest)
    assert not verify(art, "0" * 64)

    f = art / "frames" / "train_000" / "000001.jpg"
    data = bytearray(f.read_bytes())
    data[0] ^= 0x80
    f.write_bytes(bytes(data))
    assert not verify(art)
    assert not verify(art, digest)


def test_verify_detects_extra_and_missing_files(tmp_path: Path) -> None:
    art = make_tree(tmp_path / "art")
    finish(art)
    (art / "extra.txt").write_text("x")
    assert not verify(art)
    (art / "extra.txt").unlink()
    assert verify(art)
    (art / "meta.json").unlink()
    assert not verify(art)


def test_verify_unreadable_manifest(tmp_path: Path) -> None:
    art = make_tree(tmp_path / "art")
    (art / MANIFEST).write_text("{not json")
    assert not verify(art)


# ---------------------------------------------------------------------------------------------------- ledger


def ledger_row(started_at: str, **extra: object) -> dict:
    row = {
        "run_id": "run-1",
        "flow": "onboard",
        "stage": "ingest",
        "identity": "demo",
        "status": "completed",
        "cache_hit": False,
        "input_hashes": {"source": "s" * 64, "another": "a" * 64},
        "output_hash": "o" * 64,
        "params_hash": "p" * 64,
        "cache_key": "k" * 64,
        "code_version": {"commit": "deadbeef", "dirty": True},
        "started_at": started_at,
        "duration_s": 1.25,
        "peak_rss_mb": 321.5,
        "host": "box",
        "error": None,
    }
    row.update(extra)
    return row


def test_ledger_round_trip(tmp_path: Path) -> None:
    d = tmp_path / "ledger"
    path = ledger.append(d, ledger_row("2025-01-02T03:04:05+00:00", not_in_schema="ignored"))
    assert path.parent == d and path.suffix == ".parquet"
    df = ledger.read(d)
    assert len(df) == 1
    assert list(df.columns) == ledger.SCHEMA.names
    row = df.iloc[0]
    assert row["run_id"] == "run-1"
    assert row["stage"] == "ingest"
    assert row["identity"] == "demo"
    assert row["status"] == "completed"
    assert not bool(row["cache_hit"])
    assert json.loads(row["input_hashes"]) == {"source": "s" * 64, "another": "a" * 64}
    assert row["input_hashes"] == json.dumps({"another": "a" * 64, "source": "s" * 64})  # sorted keys
    assert row["code_version"] == "deadbeef+dirty"
    assert row["started_at"] == "2025-01-02T03:04:05+00:00"
    assert row["duration_s"] == pytest.approx(1.25)
    assert row["peak_rss_mb"] == pytest.approx(321.5)
    assert row["output_hash"] == "o" * 64
    assert "not_in_schema" not in df.columns
    assert not list(d.glob("*.tmp"))


def test_ledger_clean_code_version_and_cache_hit(tmp_path: Path) -> None:
    d = tmp_path / "ledger"
    ledger.append(d, ledger_row("2025-01-01T00:00:00+00:00", code_version={"commit": "cafe", "dirty": False},
                                cache_hit=True, status="failed", error="boom"))
    row = ledger.read(d).iloc[0]
    assert row["code_version"] == "cafe"
    assert bool(row["cache_hit"])
    assert row["status"] == "failed"
    assert row["error"] == "boom"


def test_ledger_several_rows_sorted_by_start(tmp_path: Path) -> None:
    d = tmp_path / "ledger"
    times = ["2025-03-01T00:00:00+00:00", "2025-01-01T00:00:00+00:00", "2025-02-01T12:00:00+00:00"]
    for i, t in enumerate(times):
        ledger.append(d, ledger_row(t, stage=f"s{i}"))
    df = ledger.read(d)
    assert len(df) == 3
    assert df["started_at"].tolist() == sorted(times)
    assert df["stage"].tolist() == ["s1", "s2", "s0"]
    assert list(df.index) == [0, 1, 2]


def test_ledger_read_missing_dir_is_empty_with_schema(tmp_path: Path) -> None:
    df = ledger.read(tmp_path / "nope")
    assert len(df) == 0
    assert list(df.columns) == ledger.SCHEMA.names
    (tmp_path / "empty").mkdir()
    assert list(ledger.read(tmp_path / "empty").columns) == ledger.SCHEMA.names


# ---------------------------------------------------------------------------------------------------- workspace


@pytest.mark.parametrize("name", ["demo", "a", "x_1-2", "0abc", "a" * 64])
def test_identity_name_accepted(name: str) -> None:
    assert check_identity_name(name) == name


@pytest.mark.parametrize("name", ["../x", "a/b", "Bob Smith", "Demo", "-x", "_x", "", "a" * 65, "b" * 200, "demo\n",
                                  "dé"])
def test_identity_name_rejected(name: str) -> None:
    with pytest.raises(InputError) as info:
        check_identity_name(name)
    message = str(info.value)
    assert "\n" not in message
    assert "identity name" in message
    assert len(message) < 200


def test_identity_name_not_a_string_is_input_error() -> None:
    with pytest.raises(InputError):
        check_identity_name(None)  # type: ignore[arg-type]


def test_identity_dir_refuses_path_traversal(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    assert ws.artifact_dir("ingest", "demo") == tmp_path / "data" / "identities" / "demo" / "ingest"
    with pytest.raises(InputError):
        ws.identity_dir("../x")


def test_register_identity_sorted_unique(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    assert ws.identities() == []
    for name in ("zeta", "alpha", "zeta", "mid", "alpha"):
        ws.register_identity(name)
    assert ws.identities() == ["alpha", "mid", "zeta"]
    data = yaml.safe_load((tmp_path / IDENTITIES_FILE).read_text())
    assert data == {"identities": ["alpha", "mid", "zeta"]}
    # no temporary file left; the state directory holds the records lock
    assert sorted(p.name for p in tmp_path.iterdir()) == [".anchor", IDENTITIES_FILE]
    assert [p.name for p in (tmp_path / ".anchor").rglob("*") if p.is_file()] == ["records.lock"]


def test_register_identity_refuses_bad_name(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    ws.register_identity("demo")
    before = (tmp_path / IDENTITIES_FILE).read_text()
    with pytest.raises(InputError):
        ws.register_identity("Bad Name")
    assert (tmp_path / IDENTITIES_FILE).read_text() == before


# ------------------------------------------------------------------------------------------- registry, dvc.yaml


def test_render_equals_committed_dvc_yaml() -> None:
    assert render(STAGES.values()) == (ROOT / "dvc.yaml").read_text()


def test_render_stages() -> None:
    doc = yaml.safe_load(render(STAGES.values()))
    assert doc["vars"] == [IDENTITIES_FILE]
    expected = [s.name for s in STAGES.values() if s.in_dvc]
    assert list(doc["stages"]) == expected
    assert "source" not in doc["stages"]
    for name in expected:
        spec = STAGES[name]
        stage = doc["stages"][name]
        if spec.shared:
            assert stage["cmd"] == f"anchor stage run {name}" and "foreach" not in stage
            assert stage["deps"] == ["data/identities"]
            assert stage["outs"] == [f"data/checkpoints/{name}"]
            continue
        assert stage["foreach"] == "${identities}"
        do = stage["do"]
        assert do["cmd"] == (spec.command or f"anchor stage run {name} {{item}}").replace("{item}", "${item}")
        # dvc.yaml's paths are where the workspace puts each artifact
        layout = Workspace(Path("/w"))
        assert do["deps"] == [layout.rel(layout.artifact_dir(up, SHARED if STAGES[up].shared else "item"))
                              .replace("/item", "/${item}") for up in spec.inputs]
        extra = (["body_model"] if spec.body_model else []) + (
            [*spec.extra_params, "profile"] if spec.extra_params else [])
        assert do["params"] == [spec.params] + extra
        assert do["desc"] == spec.description
    assert doc["stages"]["keypoints"]["do"]["deps"] == ["data/identities/${item}/ingest"]
    assert doc["stages"]["ingest"]["do"]["params"] == ["ingest"]
    report = doc["stages"]["report"]["do"]
    assert report["cmd"] == "anchor evaluate ${item}"
    assert "data/checkpoints/identities/${item}/finetune" in report["deps"]
    assert report["outs"] == ["data/reports/${item}/report.html", "data/reports/${item}/manifest.json"]
    assert report["metrics"] == ["data/reports/${item}/metrics.json"]
    assert report["plots"] == ["data/reports/${item}/contact_sheet.png", {"data/reports/${item}/plots": {"x": "frame"}}]
    assert doc["stages"]["ingest"]["do"]["outs"] == ["data/identities/${item}/ingest"]
    assert doc["stages"]["smplx_fit"]["do"]["params"] == ["smplx_fit", "body_model"]
    assert doc["stages"]["render_mesh"]["do"]["deps"] == ["data/identities/${item}/smplx_fit",
                                                          "data/identities/${item}/perturb"]
    # checkpoints live apart from data so that pretraining on the whole identities tree is not a cycle
    assert doc["stages"]["finetune"]["do"]["outs"] == ["data/checkpoints/identities/${item}/finetune"]
    assert "data/checkpoints/pretrain" in doc["stages"]["finetune"]["do"]["deps"]


def test_cache_key_changes_with_each_ingredient() -> None:
    spec = STAGES["ingest"]
    base = spec.cache_key("demo", "p" * 64, {"source": "s" * 64})
    assert base == spec.cache_key("demo", "p" * 64, {"source": "s" * 64})
    assert spec.cache_key("demo", "q" * 64, {"source": "s" * 64}) != base
    assert spec.cache_key("demo", "p" * 64, {"source": "t" * 64}) != base
    assert spec.cache_key("other", "p" * 64, {"source": "s" * 64}) != base
    assert spec.cache_key("demo", None, {"source": "s" * 64}) != base
    assert spec.cache_key("demo", "p" * 64, {"source": "s" * 64, "extra": "e"}) != base
    assert STAGES["matting"].cache_key("demo", "p" * 64, {"source": "s" * 64}) != base


def test_cache_key_independent_of_input_order() -> None:
    spec = STAGES["keypoints"]
    a = spec.cache_key("demo", "p", {"ingest": "1", "source": "2"})
    b = spec.cache_key("demo", "p", {"source": "2", "ingest": "1"})
    assert a == b


def test_cache_key_uses_params_digest() -> None:
    spec = STAGES["ingest"]
    key = spec.cache_key("demo", IngestParams().digest(), {"source": "s"})
    assert key == spec.cache_key("demo", IngestParams(fps=30).digest(), {"source": "s"})
    assert key != spec.cache_key("demo", IngestParams(fps=25).digest(), {"source": "s"})


def test_downstream() -> None:
    render = ["render_body", "face", "assemble", "metrics"]
    assert downstream("ingest") == ["keypoints", "matting", "smplx_fit", "perturb", "render_mesh", "pretrain",
                                    "finetune", *render, "report"]
    assert downstream("matting") == ["pretrain", "finetune", *render, "report"]
    assert downstream("smplx_fit") == ["perturb", "render_mesh", "pretrain", "finetune", *render, "report"]
    assert downstream("finetune") == [*render, "report"]
    assert downstream("motion") == render
    assert downstream("assemble") == []
