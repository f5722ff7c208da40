"""The preprocessing stages on the real test videos, run directly (no orchestrator), and the RVM weight path."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from core.artifacts import read_manifest
from core.workspace import Workspace
from tasks import runner
from tasks.registry import artifact_dir, get
from tests.conftest import make_workspace, shared_video


def preprocess(root: Path, video: Path, stages: tuple[str, ...] = ("ingest", "keypoints", "matting")) -> Workspace:
    ws = Workspace(root)
    runner.execute(ws, "source", "anchor", external=video)
    for stage in stages:
        runner.execute(ws, stage, "anchor")
    return ws


@pytest.mark.slow
def test_seated_anchor_detection_rates_and_ingest(tmp_path: Path) -> None:
    root = make_workspace(tmp_path / "ws", {"matting": {"workers": 1}})  # the defaults: 512 px, 300-frame clips
    ws = preprocess(root, shared_video("anchor_seated_hevc.mp4"))
    meta = json.loads((artifact_dir(ws, "ingest", "anchor") / "meta.json").read_text())
    assert meta["frames"] == 600 and meta["resolution"] == 512
    assert [(c["split"], c["frames"]) for c in meta["clips"]] == [("train", 300), ("train", 120), ("test", 180)]
    assert meta["audio"]["seconds"] == pytest.approx(20.0, abs=1 / 44100)
    first = cv2.imread(str(artifact_dir(ws, "ingest", "anchor") / "frames/train_000/000000.jpg"))
    assert first.shape == (512, 512, 3)

    rates = read_manifest(artifact_dir(ws, "keypoints", "anchor"))["summary"]["detection_rate"]
    assert rates["body"] >= 0.99 and rates["face"] >= 0.99
    assert rates["left_hand"] >= 0.90 and rates["right_hand"] >= 0.90, rates
    table = pq.read_table(artifact_dir(ws, "keypoints", "anchor") / "keypoints.parquet")
    assert table.num_rows == 600
    assert sorted(table.column("index").to_pylist()) == list(range(600))
    row = table.slice(100, 1).to_pylist()[0]
    body = np.array(row["body"]).reshape(33, 4)
    assert len(row["face"]) == 478 * 3
    assert 0 <= body[0, 0] < 512 and 0 <= body[0, 1] < 512  # nose in crop pixels
    assert body[0, 1] < body[11, 1]  # nose above the shoulders

    alpha = cv2.imread(str(artifact_dir(ws, "matting", "anchor") / "alpha/train_000/000100.png"), cv2.IMREAD_GRAYSCALE)
    assert alpha.shape == (512, 512)
    nose = body[0, :2].astype(int)
    assert alpha[nose[1], nose[0]] > 200 and alpha[5, 5] < 50  # the face is foreground, the corner is not


@pytest.mark.slow
def test_variable_frame_rate_video_keeps_its_duration(tmp_path: Path) -> None:
    root = make_workspace(tmp_path / "ws", {"ingest": {"resolution": 128}})
    ws = preprocess(root, shared_video("face_only_vfr.mp4"), ("ingest",))
    meta = json.loads((artifact_dir(ws, "ingest", "anchor") / "meta.json").read_text())
    assert meta["fps"] == 30
    assert abs(meta["duration_s"] - meta["source"]["duration_s"]) <= 1 / 30
    assert meta["frames"] == round(meta["source"]["duration_s"] * 30)
    assert sum(c["frames"] for c in meta["clips"]) == meta["frames"]


def _fake_rvm(path: Path, gain: float) -> None:
    """A TorchScript module with Robust Video Matting's call signature: alpha = gain * brightness."""
    from typing import Optional  # noqa: UP035 - TorchScript needs typing.Optional

    import torch

    class FakeRVM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gain = gain

        def forward(self, src: torch.Tensor, r1: Optional[torch.Tensor] = None,  # noqa: UP045
                    r2: Optional[torch.Tensor] = None, r3: Optional[torch.Tensor] = None,  # noqa: UP045
                    r4: Optional[torch.Tensor] = None, downsample_ratio: float = 1.0):  # noqa: UP045
            pha = (src.mean(1, keepdim=True) * self.gain).clamp(0, 1)
            state = pha if r1 is None else r1
            return src, pha, state, state, state, state

    torch.jit.script(FakeRVM()).save(str(path))


@pytest.mark.slow  # 8-20 s on a busy machine: `make test`, not the edit loop
def test_rvm_backend_loads_local_torchscript_weights(tmp_path: Path, short_video: Path) -> None:
    weights = tmp_path / "rvm.torchscript"
    _fake_rvm(weights, 1.0)
    root = make_workspace(tmp_path / "ws", {"ingest": {"resolution": 128},
                                            "matting": {"rvm_weights": str(weights), "temporal_window": 1,
                                                        "workers": 1}})
    ws = preprocess(root, short_video, ("ingest", "matting"))
    manifest = read_manifest(artifact_dir(ws, "matting", "anchor"))
    assert manifest["summary"]["backend"] == "rvm"
    assert any(i.get("kind") == "weights" for i in manifest["inputs"])
    frame = cv2.cvtColor(cv2.imread(str(artifact_dir(ws, "ingest", "anchor") / "frames/train_000/000010.jpg")),
                         cv2.COLOR_BGR2RGB)
    alpha = cv2.imread(str(artifact_dir(ws, "matting", "anchor") / "alpha/train_000/000010.png"), cv2.IMREAD_GRAYSCALE)
    expected = np.round(frame.astype(np.float32).mean(2)).astype(np.int16)
    assert np.abs(alpha.astype(np.int16) - expected).max() <= 1

    # the weights are an input: other weights, other cache key
    spec = get("matting")
    before = runner.cache_key(ws, spec, "anchor", runner.input_hashes(ws, spec, "anchor"))
    _fake_rvm(weights, 0.5)
    after = runner.cache_key(ws, spec, "anchor", runner.input_hashes(ws, spec, "anchor"))
    assert before != after


def test_rvm_backend_with_missing_weights_fails_clearly(tmp_path: Path, short_video: Path) -> None:
    from core.errors import StageError

    root = make_workspace(tmp_path / "ws", {"ingest": {"resolution": 128},
                                            "matting": {"rvm_weights": "nowhere/rvm.torchscript"}})
    ws = preprocess(root, short_video, ("ingest",))
    with pytest.raises(StageError, match="matting.rvm_weights: no such file"):
        runner.execute(ws, "matting", "anchor")
    assert not artifact_dir(ws, "matting", "anchor").exists()
