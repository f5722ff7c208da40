"""The run ledger: one Parquet row per stage execution."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core import ledger

ROOT = Path(__file__).resolve().parents[2]


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
