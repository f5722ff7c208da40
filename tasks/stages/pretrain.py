"""pretrain: the body SGDM and the Face SGDM trained once on every identity's foreground-on-black frames (stage 1).

Motion modules stay frozen; spatial weights and the mesh branch learn. The result is the shared starting point
of every identity's finetune.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from core.progress import Progress
from core.stage import Stage
from models.parts import BasePaths
from tasks.training import TrainParams, describe, train_models


class PretrainParams(TrainParams):
    pass


STAGE = Stage(
    "pretrain", flow="pretrain", scope="shared", inputs=("ingest", "matting", "render_mesh"), params=PretrainParams,
    reads=("models",), base_weights=True, resource="gpu", resumable=True, describe=describe,
    outputs=("body/", "face/"),
    description="stage 1: body and face SGDMs on every identity's foreground frames (motion frozen)")


def run(inputs: dict[str, dict[str, Path]], out: Path, params: PretrainParams, progress: Progress, *,
        settings: SimpleNamespace, base: BasePaths, scratch: Path) -> dict[str, Any]:
    """`inputs`: each identity's artifacts by stage."""
    names = sorted(inputs)
    sources = [(n, inputs[n]["ingest"], inputs[n]["render_mesh"], inputs[n]["matting"]) for n in names]
    return {"identities": names, **train_models(sources, settings, params, base, out, scratch, progress)}
