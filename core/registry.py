"""The stage registry's vocabulary: what a stage reads, which params section it takes, where its code lives.

The registry itself (tasks/registry.py) is the single source of truth for the DAG; dvc.yaml is generated from it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from core.hashing import hash_obj, sha256_file


@dataclass(frozen=True)
class StageSpec:
    name: str
    module: str  # the plain-Python module whose `run` implements the stage
    inputs: tuple[str, ...] = ()  # upstream stages of the same identity
    params: str | None = None  # params.yaml section
    description: str = ""
    external_input: str | None = None  # a file from outside the workspace (the source video), hashed by content
    in_dvc: bool = True  # a DVC pipeline stage (the source is tracked with `dvc add` instead)
    helpers: tuple[str, ...] = field(default=())  # further modules whose code shapes the output
    weight_params: tuple[str, ...] = ()  # params of the section naming local weight files: hashed as inputs
    body_model: bool = False  # reads the SMPL-X body model (params section body_model), hashed as an input
    base_models: bool = False  # starts from the profile's base weights (hashed as an input)
    shared: bool = False  # one artifact from every identity's inputs (pretraining), not one per identity
    extra_params: tuple[str, ...] = ()  # further params sections the stage reads (e.g. the model paths)
    render: bool = False  # owned by a render (identity × motion); reads the identity's artifacts as well
    command: str | None = None  # dvc.yaml's cmd when not `anchor stage run` ({item} = the identity)
    dvc_outs: tuple[str, ...] = ()  # files of the artifact DVC tracks one by one (so metrics/plots sit beside them)
    dvc_metrics: tuple[str, ...] = ()  # files of the artifact that are DVC metrics (`dvc metrics show/diff`)
    dvc_plots: tuple[str, ...] = ()  # files or folders of the artifact that are DVC plots (x = the "frame" column)
    resource: str | None = None  # what the stage is heavy on ("gpu", "cpu"): a Prefect tag with a concurrency limit

    def code_hash(self) -> str:
        return _code_hash((self.module, *self.helpers))

    def cache_key(self, identity: str, params_hash: str | None, input_hashes: dict[str, str]) -> str:
        """hash(stage code, params section, input content hashes) plus the identity the artifact belongs to."""
        return hash_obj({
            "stage": self.name,
            "identity": identity,
            "code": self.code_hash(),
            "params": params_hash,
            "inputs": dict(sorted(input_hashes.items())),
        })


def code_hash_of(*modules: str) -> str:
    return _code_hash(tuple(modules))


@cache
def _code_hash(modules: tuple[str, ...]) -> str:
    digests = {}
    for mod in modules:
        spec = importlib.util.find_spec(mod)
        if spec is None or spec.origin is None:
            raise ModuleNotFoundError(mod)
        digests[mod] = sha256_file(Path(spec.origin))
    return hash_obj(digests)
