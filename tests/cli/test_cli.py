"""The command line's own contracts: dvc.yaml drift detection, --help everywhere, init, bench --json keys."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from tests.conftest import ROOT, cut_clip, make_workspace, shared_video


@pytest.mark.slow  # 8-20 s on a busy machine: `make test`, not the edit loop
def test_dvc_check_passes_on_the_repository_and_fails_on_drift(tmp_path: Path) -> None:
    ok = subprocess.run([sys.executable, "-m", "cli.main", "-w", str(ROOT), "dvc", "check"], cwd=ROOT,
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    root = make_workspace(tmp_path / "ws")
    (root / "dvc.yaml").write_text((root / "dvc.yaml").read_text().replace("params:\n      - matting\n", ""))
    drift = subprocess.run([sys.executable, "-m", "cli.main", "-w", str(root), "dvc", "check"], cwd=ROOT,
                           capture_output=True, text=True)
    assert drift.returncode == 1
    assert "drifted" in drift.stderr
    fixed = CliRunner().invoke(app, ["-w", str(root), "dvc", "sync"])
    assert fixed.exit_code == 0
    again = CliRunner().invoke(app, ["-w", str(root), "dvc", "check"])
    assert again.exit_code == 0


def _commands() -> list[list[str]]:
    """Every command and group of the app, as the words that name it."""
    import click
    import typer

    out: list[list[str]] = []

    def walk(cmd: click.Command, path: list[str]) -> None:
        out.append(path)
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return out


def test_the_app_has_every_command_group_it_documents() -> None:
    names = {" ".join(c) for c in _commands()}
    for expected in ("init", "onboard", "stage run", "stage list", "dvc sync", "render", "finetune", "motion import",
                     "bench quality", "schedule rerender", "serve", "status", "audit", "lineage", "ledger"):
        assert expected in names


@pytest.mark.parametrize("command", _commands(), ids=lambda c: " ".join(c) or "anchor")
def test_every_command_has_help(command: list[str]) -> None:
    res = CliRunner().invoke(app, [*command, "--help"])
    assert res.exit_code == 0
    assert "Usage" in res.output


def test_stage_list_json_names_each_stage_its_inputs_params_and_the_code_in_its_cache_key() -> None:
    import json

    from tasks.registry import STAGES

    res = CliRunner().invoke(app, ["stage", "list", "--json"])
    assert res.exit_code == 0, res.output
    listed = json.loads(res.output)
    assert [s["name"] for s in listed] == list(STAGES)
    for entry in listed:
        stage = STAGES[entry["name"]]
        assert {"name", "inputs", "params", "code_modules", "code_hash"} <= set(entry)
        assert entry["inputs"] == list(stage.inputs) and entry["params"] == stage.section
        assert entry["code_hash"] == stage.code_hash() and stage.module in entry["code_modules"]
    render_body = next(s for s in listed if s["name"] == "render_body")
    assert {"tasks.smplx_table", "models.overlap", "models.sgdm"} <= set(render_body["code_modules"])


def test_init_makes_a_git_and_dvc_workspace(tmp_path: Path) -> None:
    root = make_workspace(tmp_path / "ws")
    for name in (".git", ".dvc", "params.yaml", "dvc.yaml", "identities.yaml", "data/identities"):
        assert (root / name).exists(), name
    assert "analytics = false" in (root / ".dvc/config").read_text()
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=root, capture_output=True, text=True)
    assert status.returncode == 0, status.stderr


@pytest.mark.slow
def test_bench_preprocess_json_has_the_issue_keys(tmp_path: Path) -> None:
    import json

    video = cut_clip(shared_video("anchor_seated_hevc.mp4"), tmp_path / "clip.mp4", 16, 360, 640)  # at the defaults
    proc = subprocess.run([sys.executable, "-m", "cli.main", "bench", "preprocess", "--video", str(video),
                           "--json"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["frames"] == 16
    assert set(result["fps"]) == {"ingest", "keypoints", "matting"}
    assert result["fps_total"] > 0 and result["peak_rss_mb"] > 0
    assert result["fps_total"] < min(result["fps"].values())


@pytest.mark.slow
def test_bench_render_takes_the_cpu_profile_its_scheduler_and_memory_bound() -> None:
    import json

    from tests.conftest import anchor

    done = anchor(None, "bench", "render", "--profile", "cpu", "--scheduler", "unipc", "--max-latent-mb", "0",
                  "--frames", "6", "--steps", "2", "--layout", "overlapped", "--device", "cpu", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert (result["profile"], result["scheduler"], result["max_latent_mb"]) == ("cpu", "unipc", 0)
    assert set(result) >= {"overlapped"} and not {"disjoint", "framewise"} & set(result)
    assert result["overlapped"]["frame_evals_per_step"] == 6 and result["overlapped"]["fps"] > 0
    # the profile's own sampler unless one is asked for
    assert anchor(None, "bench", "render", "--scheduler", "euler").returncode != 0


@pytest.mark.slow
def test_bench_train_times_the_loop_with_its_data_and_finds_the_encodings_stored_the_second_time() -> None:
    import json

    done = CliRunner().invoke(app, ["bench", "train", "--profile", "tiny", "--steps", "3", "--frames", "10",
                                    "--device", "cpu", "--json"])
    assert done.exit_code == 0, done.output
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert (result["encoded"], result["encoded_again"]) == (2 * 10, 0)  # latent and tokens of each frame, once
    assert result["encode_again_s"] < result["encode_s"]
    assert result["conditioning"] == "both"  # the tiny profile's own SGDM: its input stem trains in the loop too
    for stage in ("pretrain", "finetune"):
        assert result[f"{stage}_steps_per_s"] > 0 and 0 < result[f"{stage}_step_s"] < 60
        assert 0 <= result[f"{stage}_data_wait_ms_per_step"] < 1000 * result[f"{stage}_step_s"] * 3
    assert CliRunner().invoke(app, ["bench", "train", "--profile", "sd15"]).exit_code != 0
