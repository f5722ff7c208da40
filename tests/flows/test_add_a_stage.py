"""docs/architecture.md's "Adding a stage in five steps", followed to the letter in a copy of the code: the new
stage shows in `anchor stage list`, in dvc.yaml, and runs in its flow, with no other file of the project touched."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from core.artifacts import read_manifest
from core.stage import PROJECT_PACKAGES
from tests.conftest import ONBOARDED_ID, ROOT, copy_workspace

pytestmark = pytest.mark.slow

WAVES = '''"""waves: a toy stage that counts the frames of each clip."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field

from core.progress import Progress
from core.section import Section
from core.stage import Stage
from tasks.frames import read_meta


class WavesParams(Section):
    amplitude: float = Field(1.0, ge=0, description="how high")


def describe(s: dict[str, Any]) -> str:
    return f"{s['frames']} frames"


STAGE = Stage("waves", flow="onboard", inputs=("ingest",), params=WavesParams, describe=describe,
              outputs=("waves.json",), description="what it makes, in one line")


def run(inputs: dict[str, Path], out: Path, params: WavesParams, progress: Progress) -> dict[str, Any]:
    meta = read_meta(inputs["ingest"])
    (out / "waves.json").write_text(json.dumps({c["name"]: c["frames"] * params.amplitude for c in meta["clips"]}))
    return {"frames": meta["frames"]}
'''


def test_a_stage_added_by_the_documented_steps_is_listed_generated_and_run(tmp_path: Path, onboarded: Path,
                                                                           short_video: Path) -> None:
    steps = (ROOT / "docs" / "architecture.md").read_text()
    assert "## Adding a stage in five steps" in steps and "tasks/stages/<name>.py" in steps
    code = tmp_path / "code"
    for package in PROJECT_PACKAGES:
        shutil.copytree(ROOT / package, code / package, ignore=shutil.ignore_patterns("__pycache__"))
    ws = copy_workspace(onboarded, tmp_path / "ws")
    env = {**os.environ, "PYTHONPATH": str(code)}

    def anchor(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cli.main", "-w", str(ws), *args], cwd=code, env=env,
                              capture_output=True, text=True, timeout=900)

    # 1. its module
    (code / "tasks" / "stages" / "waves.py").write_text(WAVES)
    # 2. its params
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["waves"] = {"amplitude": 2.0}
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    # 3. dvc.yaml
    assert anchor("dvc", "sync").returncode == 0
    waves = yaml.safe_load((ws / "dvc.yaml").read_text())["stages"]["waves"]["do"]
    assert waves["cmd"] == "anchor stage run waves ${item}" and waves["params"] == ["waves"]
    assert waves["deps"] == ["data/identities/${item}/ingest"] and waves["outs"] == ["data/identities/${item}/waves"]
    # 4. listed, and run by its flow (everything else is taken from the template's artifacts)
    listed = anchor("stage", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    entry = next(s for s in json.loads(listed.stdout) if s["name"] == "waves")
    assert entry["inputs"] == ["ingest"] and entry["params"] == "waves"
    assert "tasks.stages.waves" in entry["code_modules"] and "tasks.frames" in entry["code_modules"]
    done = anchor("onboard", ONBOARDED_ID, "--video", str(short_video))
    assert done.returncode == 0, done.stdout + done.stderr
    art = ws / "data" / "identities" / ONBOARDED_ID / "waves"
    manifest = read_manifest(art)
    assert manifest["stage"] == "waves" and manifest["params"] == {"amplitude": 2.0}
    frames = json.loads((art / "waves.json").read_text())
    meta = json.loads((ws / "data" / "identities" / ONBOARDED_ID / "ingest" / "meta.json").read_text())
    assert frames == {c["name"]: 2.0 * c["frames"] for c in meta["clips"]}
    assert "63 frames" in done.stdout  # its own summary line
    for stage in ("ingest", "keypoints", "smplx_fit", "render_mesh"):
        assert read_manifest(ws / "data" / "identities" / ONBOARDED_ID / stage) == \
            read_manifest(onboarded / "data" / "identities" / ONBOARDED_ID / stage)  # not made again
