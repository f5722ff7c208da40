"""pretrain: the body SGDM and the Face SGDM trained once on every identity's foreground-on-black frames (stage 1).

Motion modules stay frozen; spatial weights and the mesh branch learn. The result is the shared starting point
of every identity's finetune.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.params import Params, PretrainParams
from core.progress import Progress
from tasks.training import train_models

RESUMABLE = True


def run(inputs: dict[str, Path], out: Path, params: PretrainParams, progress: Progress, *, settings: Params,
        base: Any, scratch: Path) -> dict[str, Any]:
    names = sorted({k.split("@", 1)[1] for k in inputs})
    sources = [(n, inputs[f"ingest@{n}"], inputs[f"render_mesh@{n}"], inputs[f"matting@{n}"]) for n in names]
    return {"identities": names, **train_models(sources, settings, params, base, out, scratch, progress)}
