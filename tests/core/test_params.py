"""params.yaml: one-line errors naming key, value and what is allowed; defaults; digests."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from core.errors import ParamsError
from core.params import load_params
from tasks.registry import PARAMS as Params
from tasks.registry import default_params_yaml, parse_params
from tasks.stages.ingest import IngestParams
from tasks.stages.matting import MattingParams

ROOT = Path(__file__).resolve().parents[2]


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
        load_params(path, Params)
    message = str(info.value)
    assert "\n" not in message
    assert "params.yaml" in message
    assert "line 3" in message


def test_load_params_validation_error_names_file(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("ingest:\n  resolution: 5\n")
    with pytest.raises(ParamsError) as info:
        load_params(path, Params)
    message = str(info.value)
    assert message.startswith("params.yaml:")
    assert "ingest.resolution" in message and "greater than or equal to 64" in message


def test_load_params_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    with pytest.raises(ParamsError) as info:
        load_params(path, Params)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    assert "not found" in message


def test_load_params_empty_file_gives_defaults(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("")
    assert load_params(path, Params) == Params()


def test_repository_params_yaml_equals_defaults() -> None:
    assert load_params(ROOT / "params.yaml", Params) == Params()
    # written out in full, comments included: a new param shows up in the file users copy
    assert (ROOT / "params.yaml").read_text() == default_params_yaml()


def test_default_params_yaml_round_trips(tmp_path: Path) -> None:
    text = default_params_yaml()
    assert parse_params(yaml.safe_load(text)) == Params()
    path = tmp_path / "params.yaml"
    path.write_text(text)
    assert load_params(path, Params) == Params()
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
