"""dvc.yaml as a pure function of the stage registry: `anchor dvc sync` writes it, `anchor dvc check` compares."""

from __future__ import annotations

from collections.abc import Iterable

import yaml

from core.registry import StageSpec
from core.workspace import CHECKPOINT_STAGES, IDENTITIES_FILE, REPORT_STAGES

HEADER = ("# Generated from the stage registry (tasks/registry.py) by `anchor dvc sync`; do not edit by hand.\n"
          "# Each stage runs once per identity listed in identities.yaml.\n")
IDENTITY_DIR = "data/identities/${item}"


SHARED_DIR = "data/checkpoints"
REPORT_DIR = "data/reports/${item}"


def _dir(stage: str, shared: set[str]) -> str:
    """The artifact directory of `stage` for identity ${item}, as Workspace.artifact_dir lays it out."""
    if stage in shared:
        return f"{SHARED_DIR}/{stage}"
    if stage in REPORT_STAGES:
        return REPORT_DIR
    if stage in CHECKPOINT_STAGES:
        return f"{SHARED_DIR}/identities/${{item}}/{stage}"
    return f"{IDENTITY_DIR}/{stage}"


def render(specs: Iterable[StageSpec]) -> str:
    specs = list(specs)
    shared = {s.name for s in specs if s.shared}
    stages: dict = {}
    for spec in specs:
        if not spec.in_dvc:
            continue
        params = [spec.params] if spec.params else []
        if spec.body_model:
            params.append("body_model")
        params += [*spec.extra_params, *(["profile"] if spec.extra_params else [])]
        if spec.shared:
            # built from every identity: depends on the whole identities tree, runs once
            do: dict = {"desc": spec.description, "cmd": f"anchor stage run {spec.name}",
                        "deps": ["data/identities"]}
            if params:
                do["params"] = params
            do["outs"] = [f"{SHARED_DIR}/{spec.name}"]
            stages[spec.name] = do
            continue
        do = {
            "desc": spec.description,
            "cmd": (spec.command or f"anchor stage run {spec.name} {{item}}").replace("{item}", "${item}"),
            "deps": [_dir(n, shared) for n in spec.inputs],
        }
        if params:
            do["params"] = params
        home = _dir(spec.name, shared)
        do["outs"] = [f"{home}/{f}" for f in spec.dvc_outs] or [home]
        if spec.dvc_metrics:
            do["metrics"] = [f"{home}/{f}" for f in spec.dvc_metrics]
        if spec.dvc_plots:
            do["plots"] = [f"{home}/{f}" if f.endswith(".png") else {f"{home}/{f}": {"x": "frame"}}
                           for f in spec.dvc_plots]
        stages[spec.name] = {"foreach": "${identities}", "do": do}
    body = yaml.safe_dump({"vars": [IDENTITIES_FILE], "stages": stages}, sort_keys=False, width=120)
    return HEADER + body
