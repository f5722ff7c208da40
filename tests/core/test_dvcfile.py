"""dvc.yaml generated from the stage declarations."""

from __future__ import annotations

from pathlib import Path

import yaml

from core.dvcfile import generate
from core.workspace import IDENTITIES_FILE, SHARED, Workspace
from tasks.registry import STAGES

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------- registry, dvc.yaml


def test_generated_equals_committed_dvc_yaml() -> None:
    assert generate(STAGES.values()) == (ROOT / "dvc.yaml").read_text()


def test_generated_stages() -> None:
    doc = yaml.safe_load(generate(STAGES.values()))
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
        assert do["deps"] == [layout.rel(layout.artifact_dir(up, SHARED if STAGES[up].shared else "item",
                                                             STAGES[up].home)).replace("/item", "/${item}")
                              for up in spec.inputs]
        extra = (["body_model"] if spec.body_model else []) + ([*spec.reads, "profile"] if spec.reads else [])
        assert do["params"] == [spec.section] + extra
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
