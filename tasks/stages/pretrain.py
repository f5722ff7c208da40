"""pretrain: the body SGDM and the Face SGDM trained once on every identity's foreground-on-black frames (stage 1).

Motion modules stay frozen; spatial weights, the mesh branch and the input stem (per `conditioning`) learn. The
result is the shared starting point of every identity's finetune.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from core.progress import Progress
from core.stage import Stage
from tasks.devices import Compute
from tasks.train_params import TrainParams, describe

if TYPE_CHECKING:
    from models.parts import BasePaths


class PretrainParams(TrainParams):
    """Stage 1, where the SGDMs are born: their architecture's choices live here, and finetune inherits them."""

    conditioning: dict[str, Literal["branch", "input", "both"]] = Field(
        {"tiny": "both", "cpu": "input", "sd15": "branch"}, description="where the mesh enters the SGDMs, per "
        "profile: branch (the paper's ControlNet-style branch), input (a small stem reads the mesh and the reference "
        "frame at the model's resolution and adds them to the UNet's first layer; no branch) or both "
        "(docs/cpu-profile.md)")


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
