"""The report's pieces on synthetic inputs: which frames it samples, the contact sheet's layout, where time per stage
comes from, and the plot files DVC reads."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from core.artifacts import write_json
from core.hashing import MANIFEST
from tasks.stages import report


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


def test_stage_times_are_those_the_artifacts_manifests_record(tmp_path: Path) -> None:
    """Time per stage comes from each artifact's own manifest (the run that made it), never from the run ledger,
    which is not an input of the report and would make a cached report stale."""
    made = tmp_path / "ingest"
    made.mkdir()
    write_json(made / MANIFEST, {"duration_s": 12.5, "peak_rss_mb": 100.0, "host": "box",
                                 "started_at": "2026-01-02T00:00:00+00:00"})
    times = {t["stage"]: t for t in report.stage_times({"ingest": made, "matting": tmp_path / "missing"})}
    assert times["ingest"] == {"stage": "ingest", "seconds": 12.5, "peak_rss_mb": 100.0, "host": "box",
                               "started_at": "2026-01-02T00:00:00+00:00"}
    assert times["matting"]["seconds"] is None and times["matting"]["host"] is None
    assert "ledger" not in report.run.__code__.co_varnames


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
