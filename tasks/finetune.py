"""finetune: from the pretrained checkpoints, one identity's full frames (foreground and background), body and face
(stage 2). Each run is a new version of the identity's models, a DVC output of this stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.params import FinetuneParams, Params
from core.progress import Progress
from tasks.training import train_models

RESUMABLE = True


def run(inputs: dict[str, Path], out: Path, params: FinetuneParams, progress: Progress, *, settings: Params,
        base: Any, scratch: Path) -> dict[str, Any]:
    sources = [("identity", inputs["ingest"], inputs["render_mesh"], inputs["ingest"])]
    return train_models(sources, settings, params, base, out, scratch, progress, start=inputs["pretrain"])
