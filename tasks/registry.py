"""The stage registry: every `STAGE` declared in tasks/stages/, in the order their inputs give.

It is the one source of truth for the DAG: dvc.yaml is generated from it, the flows run its stages in its order,
params.yaml's model is assembled from the sections the stages declare, and the CLI lists and describes it.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import threading
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

from core import params as core_params
from core.errors import InputError, StageError
from core.params import Params
from core.section import Section
from core.stage import Stage
from core.workspace import Workspace
from tasks import stages as stages_package

FLOWS = ("onboard", "pretrain", "finetune", "render", "evaluate")  # the order the flows run in a stage's life


def _collect() -> dict[str, Stage]:
    found: dict[str, Stage] = {}
    for info in sorted(pkgutil.iter_modules(stages_package.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{stages_package.__name__}.{info.name}")
        declared = getattr(module, "STAGE", None)
        if not isinstance(declared, Stage):
            raise TypeError(f"{module.__name__}: a stage module declares `STAGE = Stage(...)`")
        if declared.name in found:
            raise TypeError(f"stage {declared.name!r} is declared twice ({found[declared.name].module}, "
                            f"{module.__name__})")
        if declared.flow not in FLOWS:
            raise TypeError(f"{module.__name__}: flow {declared.flow!r} is not one of {', '.join(FLOWS)}")
        found[declared.name] = dataclasses.replace(declared, module=module.__name__)
    return _ordered(found)


def _ordered(stages: dict[str, Stage]) -> dict[str, Stage]:
    """Topological order of the inputs; among stages ready together, the earlier flow, then the name."""
    for stage in stages.values():
        unknown = [i for i in stage.inputs if i not in stages]
        if unknown:
            raise TypeError(f"{stage.module}: unknown input stage(s) {', '.join(unknown)}")
    done: dict[str, Stage] = {}
    while len(done) < len(stages):
        ready = [s for s in stages.values() if s.name not in done and all(i in done for i in s.inputs)]
        if not ready:
            raise TypeError(f"stage inputs form a cycle among {', '.join(sorted(set(stages) - set(done)))}")
        first = min(ready, key=lambda s: (FLOWS.index(s.flow), s.name))
        done[first.name] = first
    return done


STAGES: dict[str, Stage] = _collect()


def get(name: str) -> Stage:
    try:
        return STAGES[name]
    except KeyError:
        raise InputError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}") from None


def module_of(stage: Stage) -> ModuleType:
    return importlib.import_module(stage.module)


def downstream(name: str) -> list[str]:
    """Stages that depend on `name`, directly or not, in registry order."""
    hit = {name}
    for stage in STAGES.values():
        if hit.intersection(stage.inputs):
            hit.add(stage.name)
    return [s for s in STAGES if s in hit and s != name]


def upstream(name: str) -> list[str]:
    """Stages `name` depends on, directly or not, in registry order."""
    need, todo = set(), list(get(name).inputs)
    while todo:
        n = todo.pop()
        if n not in need:
            need.add(n)
            todo.extend(get(n).inputs)
    return [s for s in STAGES if s in need]


def layers(names: list[str]) -> list[list[str]]:
    """`names` in steps: each step's stages need only stages of earlier steps (or none of `names`), so a flow runs
    a step's stages at once."""
    todo = [n for n in STAGES if n in names]
    out: list[list[str]] = []
    placed: set[str] = set()
    while todo:
        step = [n for n in todo if all(i in placed or i not in names for i in get(n).inputs)]
        out.append(step)
        placed.update(step)
        todo = [n for n in todo if n not in placed]
    return out


def in_flow(flow: str) -> list[str]:
    return [s.name for s in STAGES.values() if s.flow == flow]


def artifact_dir(ws: Workspace, stage: str, owner: str) -> Path:
    return ws.artifact_dir(stage, owner, get(stage).home)


# ------------------------------------------------------------------------------------------------------ params
def _file_order() -> list[tuple[str, type[Section]]]:
    """Sections in params.yaml's order: storage and execution, then each stage's after the shared sections it is
    the first to read."""
    order: list[tuple[str, type[Section]]] = [(n, core_params.COMMON[n]) for n in core_params.HEAD]
    placed = set(core_params.HEAD)
    for stage in STAGES.values():
        for name in (*stage.reads, *(("body_model",) if stage.body_model else ())):
            if name in core_params.COMMON and name not in placed:
                order.append((name, core_params.COMMON[name]))
                placed.add(name)
        if stage.params is not None:
            order.append((stage.name, stage.params))
            placed.add(stage.name)
    order += [(n, cls) for n, cls in core_params.COMMON.items() if n not in placed]
    return order


PARAMS: type[Params] = core_params.params_model(_file_order())
_LOADED: dict[Path, tuple[tuple[int, int], Params]] = {}
_LOCK = threading.Lock()


def parse_params(data: Any, source: str = "params.yaml") -> Params:
    return core_params.parse_params(data, PARAMS, source)


def default_params_yaml() -> str:
    return core_params.default_params_yaml(PARAMS)


def params(ws: Workspace) -> Params:
    """The workspace's params.yaml, validated; read again whenever the file changes."""
    path = ws.params_path
    try:
        st = path.stat()
        stamp = (st.st_mtime_ns, st.st_size)
    except OSError:
        return core_params.load_params(path, PARAMS)  # raises the one-line "not found"
    with _LOCK:
        hit = _LOADED.get(path)
        if hit and hit[0] == stamp:
            return hit[1]
    loaded = core_params.load_params(path, PARAMS)
    with _LOCK:
        _LOADED[path] = (stamp, loaded)
    return loaded


def section(ws: Workspace, stage: Stage, overrides: dict[str, Any] | None = None) -> Section | None:
    """The stage's params section, with per-run `overrides` (e.g. `anchor render --seed`) validated like the file."""
    if stage.section is None:
        return None
    value = params(ws).section(stage.section)
    if overrides:
        try:
            value = type(value).model_validate({**value.model_dump(), **overrides})
        except ValueError as exc:
            raise StageError(f"{stage.section}: invalid override {overrides}: {exc}") from None
    return value


def settings(ws: Workspace, stage: Stage) -> SimpleNamespace:
    """What a stage may read of params.yaml beyond its own section: the profile and the sections it declares."""
    p = params(ws)
    return SimpleNamespace(profile=p.profile, **{name: p.section(name) for name in stage.reads})
