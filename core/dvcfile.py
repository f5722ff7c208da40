"""dvc.yaml as a pure function of the stage registry: `anchor dvc sync` writes it, `anchor dvc check` compares."""

from __future__ import annotations

from collections.abc import Iterable

import yaml

from core.registry import StageSpec
from core.workspace import CHECKPOINT_STAGES, IDENTITIES_FILE

HEADER = ("# Generated from the stage registry (tasks/registry.py) by `anchor dvc sync`; do not edit by hand.\n"
          "# Each stage runs once per identity listed in identities.yaml.\n")
IDENTITY_DIR = "data/identities/${item}"


SHARED_DIR = "data/checkpoints"


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
            "cmd": f"anchor stage run {spec.name} ${{item}}",
            "deps": [f"{SHARED_DIR}/{n}" if n in shared else f"{IDENTITY_DIR}/{n}" for n in spec.inputs],
        }
        if params:
            do["params"] = params
        home = f"{SHARED_DIR}/identities/${{item}}" if spec.name in CHECKPOINT_STAGES else IDENTITY_DIR
        do["outs"] = [f"{home}/{spec.name}"]
        stages[spec.name] = {"foreach": "${identities}", "do": do}
    body = yaml.safe_dump({"vars": [IDENTITIES_FILE], "stages": stages}, sort_keys=False, width=120)
    return HEADER + body
