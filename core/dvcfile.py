"""dvc.yaml as a pure function of the stage declarations: `anchor dvc sync` writes it, `anchor dvc check` compares."""

from __future__ import annotations

from collections.abc import Iterable

import yaml

from core.stage import Stage
from core.workspace import IDENTITIES_FILE

HEADER = ("# Generated from the stage declarations (tasks/stages/) by `anchor dvc sync`; do not edit by hand.\n"
          "# Each stage runs once per identity listed in identities.yaml.\n")
SHARED_DIR = "data/checkpoints"


def _dir(stage: Stage) -> str:
    """The artifact directory of `stage` for identity ${item}, as Workspace.artifact_dir lays it out."""
    if stage.shared:
        return f"{SHARED_DIR}/{stage.name}"
    if stage.home == "reports":
        return "data/reports/${item}"
    if stage.home == "checkpoints":
        return f"{SHARED_DIR}/identities/${{item}}/{stage.name}"
    return f"data/identities/${{item}}/{stage.name}"


def generate(stages: Iterable[Stage]) -> str:
    stages = list(stages)
    by_name = {s.name: s for s in stages}
    out: dict = {}
    for stage in stages:
        if not stage.in_dvc:
            continue
        params = [stage.section] if stage.section else []
        if stage.body_model:
            params.append("body_model")
        params += [*stage.reads, *(["profile"] if stage.reads else [])]
        if stage.shared:
            # built from every identity: depends on the whole identities tree, runs once
            do: dict = {"desc": stage.description, "cmd": f"anchor stage run {stage.name}",
                        "deps": ["data/identities"]}
            if params:
                do["params"] = params
            do["outs"] = [_dir(stage)]
            out[stage.name] = do
            continue
        do = {
            "desc": stage.description,
            "cmd": (stage.command or f"anchor stage run {stage.name} {{item}}").replace("{item}", "${item}"),
            "deps": [_dir(by_name[n]) for n in stage.inputs],
        }
        if params:
            do["params"] = params
        home = _dir(stage)
        do["outs"] = [f"{home}/{f}" for f in stage.dvc_outs] or [home]
        if stage.dvc_metrics:
            do["metrics"] = [f"{home}/{f}" for f in stage.dvc_metrics]
        if stage.dvc_plots:
            do["plots"] = [f"{home}/{f}" if f.endswith(".png") else {f"{home}/{f}": {"x": "frame"}}
                           for f in stage.dvc_plots]
        out[stage.name] = {"foreach": "${identities}", "do": do}
    body = yaml.safe_dump({"vars": [IDENTITIES_FILE], "stages": out}, sort_keys=False, width=120)
    return HEADER + body
