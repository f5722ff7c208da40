"""pretrain: the body SGDM and the Face SGDM trained once on every identity's foreground-on-black frames (stage 1).

Motion modules stay frozen; spatial weights and the mesh branch learn. The result is the shared starting point
of every identity's finetune.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from core.progress import Progress
from core.stage import Stage
from tasks.devices import Compute
from tasks.train_params import TrainParams, describe

if TYPE_CHECKING:
    from models.parts import BasePaths


class PretrainParams(TrainParams):
    pass


STAGE = Stage(
    "pretrain", flow="pretrain", scope="shared", inputs=("ingest", "matting", "render_mesh"), params=PretrainParams,
    reads=("models",), base_weights=True, resource="gpu", device=True, resumable=True, encodings=True,
    describe=describe, outputs=("body/", "face/"),
    description="stage 1: body and face SGDMs on every identity's foreground frames (motion frozen)")


def run(inputs: dict[str, dict[str, Path]], out: Path, params: PretrainParams, progress: Progress, *,
        settings: SimpleNamespace, base: BasePaths, scratch: Path, encoded: Path, compute: Compute) -> dict[str, Any]:
    """`inputs`: each identity's artifacts by stage."""
    from tasks.training import train_models

    names = sorted(inputs)
    sources = [(n, inputs[n]["ingest"], inputs[n]["render_mesh"], inputs[n]["matting"]) for n in names]
    summary = train_models(sources, settings, params, base, out, scratch, encoded, progress, compute)
    return {"identities": names, **summary}
