"""The stage registry: cache keys, order, what depends on what."""

from __future__ import annotations

from pathlib import Path

from tasks.registry import STAGES, downstream
from tasks.stages.ingest import IngestParams

ROOT = Path(__file__).resolve().parents[2]


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
    render = ["render_body", "face", "hands", "assemble", "follow", "metrics"]
    assert downstream("ingest") == ["keypoints", "matting", "smplx_fit", "perturb", "render_mesh", "speech",
                                    "pretrain", "finetune", *render, "report"]
    assert downstream("matting") == ["pretrain", "finetune", *render, "report"]
    assert downstream("smplx_fit") == ["perturb", "render_mesh", "speech", "pretrain", "finetune", *render, "report"]
    assert downstream("finetune") == [*render, "report"]
    assert downstream("motion") == render
    assert downstream("assemble") == []
