"""dvc.yaml as a pure function of the stage registry: `anchor dvc sync` writes it, `anchor dvc check` compares."""

from __future__ import annotations

from collections.abc import Iterable

import yaml

from core.registry import StageSpec
from core.workspace import IDENTITIES_FILE

HEADER = ("# Generated from the stage registry (tasks/registry.py) by `anchor dvc sync`; do not edit by hand.\n"
          "# Each stage runs once per identity listed in identities.yaml.\n")
IDENTITY_DIR = "data/identities/${item}"


def render(specs: Iterable[StageSpec]) -> str:
    stages = {}
    for spec in specs:
        if not spec.in_dvc:
            continue
        do: dict = {
            "desc": spec.description,
            "cmd": f"anchor stage run {spec.name} ${{item}}",
            "deps": [f"{IDENTITY_DIR}/{name}" for name in spec.inputs],
        }
        params = [spec.params] if spec.params else []
        if spec.body_model:
            params.append("body_model")
        if params:
            do["params"] = params
        do["outs"] = [f"{IDENTITY_DIR}/{spec.name}"]
        stages[spec.name] = {"foreach": "${identities}", "do": do}
    body = yaml.safe_dump({"vars": [IDENTITIES_FILE], "stages": stages}, sort_keys=False, width=120)
    return HEADER + body
