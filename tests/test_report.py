"""The report's pieces on synthetic inputs: which frames it samples, the contact sheet's layout, the ledger rows it
picks for time per stage, and the plot files DVC reads."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from core import ledger
from tasks import report


def _clip(name: str, frames: int, split: str = "test") -> dict:
    return {"name": name, "frames": frames, "split": split}


def test_samples_spread_over_each_held_out_clip_in_render_order() -> None:
    picks = report.samples([_clip("test_000", 10), _clip("test_001", 7), _clip("test_002", 1)], per_clip=3)
    assert [(c["name"], k, t) for c, k, t in picks] == [
        ("test_000", 0, 0), ("test_000", 4, 4), ("test_000", 9, 9),  # ends included, middle rounded
        ("test_001", 0, 10), ("test_001", 3, 13), ("test_001", 6, 16),  # offset by the first clip's length
        ("test_002", 0, 17)]  # a one-frame clip gives one sample
    assert [t for _, _, t in report.samples([_clip("a", 2)], per_clip=5)] == [0, 1]  # never repeats a frame
    assert [t for _, _, t in report.samples([_clip("a", 9)], per_clip=1)] == [0]


def test_contact_sheet_is_a_labelled_grid_of_the_thumbnails() -> None:
    side = 64
    rows = [(f"clip #{i}", [np.full((side, side, 3), 30 * (i * 4 + j), np.uint8) for j in range(4)])
            for i in range(2)]
    sheet = report.contact_sheet(rows)
    assert sheet.shape == (22 + 2 * (22 + side), 4 * side, 3)
    # each thumbnail sits unchanged in its cell, below its label bar
    for i in range(2):
        for j in range(4):
            top = 22 + i * (22 + side) + 22
            assert (sheet[top:top + side, j * side:(j + 1) * side] == 30 * (i * 4 + j)).all()
    assert (sheet[:22] < 255).any()  # the column names are drawn


def _row(stage: str, output_hash: str, duration: float, cache_hit: bool = False, status: str = "completed",
         started: str = "2026-01-01T00:00:00+00:00", run: str = "r1") -> dict:
    return {"run_id": run, "flow": "onboard", "stage": stage, "identity": "a", "status": status,
            "cache_hit": cache_hit, "output_hash": output_hash, "started_at": started, "duration_s": duration,
            "peak_rss_mb": 100.0, "code_version": {"commit": "c", "dirty": False}}


def test_stage_times_are_those_of_the_run_that_made_each_artifact(tmp_path: Path) -> None:
    ledger.append(tmp_path, _row("ingest", "old", 50.0, started="2026-01-01T00:00:00+00:00"))
    ledger.append(tmp_path, _row("ingest", "h1", 12.5, started="2026-01-02T00:00:00+00:00", run="made"))
    ledger.append(tmp_path, _row("ingest", "h1", 0.1, cache_hit=True, started="2026-01-03T00:00:00+00:00"))
    ledger.append(tmp_path, _row("ingest", "h1", 9.0, started="2026-01-04T00:00:00+00:00", run="later"))
    ledger.append(tmp_path, _row("keypoints", "h2", 3.0, status="failed"))
    times = {t["stage"]: t for t in report.stage_times(tmp_path, {"ingest": "h1", "keypoints": "h2",
                                                                  "matting": None})}
    assert times["ingest"]["seconds"] == 12.5 and times["ingest"]["run"] == "made"  # the first run that made h1
    assert times["keypoints"]["seconds"] is None and "not in this workspace's ledger" in times["keypoints"]["note"]
    assert times["matting"]["seconds"] is None


def test_plot_files_have_one_series_each_and_skip_missing_values(tmp_path: Path) -> None:
    fit = [{"index": "0", "body_pct": "1.5", "hands_pct": "", "face_pct": "0.5"},
           {"index": "1", "body_pct": "2.0", "hands_pct": "3.0", "face_pct": ""}]
    lmd = [{"frame": "0", "lmd_face_px": "4.25", "lmd_body_px": ""}]
    report.write_plots(tmp_path / "plots", fit, lmd)

    def read(name: str) -> list[list[str]]:
        with open(tmp_path / "plots" / f"{name}.csv", newline="") as f:
            return list(csv.reader(f))

    assert read("fit_error_body_pct") == [["frame", "body_pct"], ["0", "1.5"], ["1", "2.0"]]
    assert read("fit_error_hands_pct") == [["frame", "hands_pct"], ["1", "3.0"]]
    assert read("lmd_face_px") == [["frame", "lmd_face_px"], ["0", "4.25"]]
    assert read("lmd_body_px") == [["frame", "lmd_body_px"]]


def test_fit_plot_is_inline_svg_and_reproducible() -> None:
    rows = [{"index": str(i), "body_pct": str(1 + i % 3), "hands_pct": "", "face_pct": str(i / 10)} for i in range(30)]
    a = report.fit_plot_svg(rows, [(0, "train"), (20, "test")])
    assert a.startswith("<svg") and a == report.fit_plot_svg(rows, [(0, "train"), (20, "test")])


def test_a_render_that_is_not_the_held_out_clips_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="lacks motion, render_body, face, metrics"):
        report._evaluation(tmp_path)
