"""The example clip `make demo` runs on when no VIDEO is given: shipped with its source and licence."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

from tests.conftest import shared_video

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "assets" / "examples"


def test_the_example_clip_is_the_documented_file_under_its_licence_and_make_demo_defaults_to_it() -> None:
    clip = EXAMPLES / "anchor_seated_hevc.mp4"
    digest = hashlib.sha256(clip.read_bytes()).hexdigest()
    notes = (EXAMPLES / "README.md").read_text()
    assert f"sha256: `{digest}`" in notes and "Apache License 2.0" in notes and "bytedance/LatentSync" in notes
    assert digest == hashlib.sha256(shared_video("anchor_seated_hevc.mp4").read_bytes()).hexdigest()  # unmodified
    licence = (EXAMPLES / "LICENSE-Apache-2.0.txt").read_text()
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence
    assert "END OF TERMS AND CONDITIONS" in licence
    # the only video in the repository
    assert sorted(p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*.mp4")
                  if not p.relative_to(ROOT).parts[0].startswith((".", "data"))) == [
        "assets/examples/anchor_seated_hevc.mp4"]
    planned = subprocess.run(["make", "-n", "demo"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert 'anchor onboard demo --video "assets/examples/anchor_seated_hevc.mp4"' in planned, planned
    own = subprocess.run(["make", "-n", "demo", "VIDEO=elsewhere/talk.mp4"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert 'anchor onboard demo --video "elsewhere/talk.mp4"' in own
