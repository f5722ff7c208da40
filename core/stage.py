"""What a stage is: its declaration (written once, beside its code) and the hash of the code it runs.

A stage module in `tasks/stages/` declares `STAGE = Stage(...)` and defines `run(inputs, out, params, progress)`.
Everything else that knows about a stage derives from the declaration: the registry's order, dvc.yaml, the flows,
the CLI's summaries and the cache key. The code part of the cache key is never a hand-kept list: it is the stage
module and every module of this project it imports, directly or not, found by reading their import statements.
"""

from __future__ import annotations

import ast
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from core.hashing import hash_obj, sha256_bytes
from core.packages import distributions_of, installed_versions

PROJECT_PACKAGES = ("core", "models", "tasks", "flows", "service", "cli")
Scope = Literal["identity", "shared", "render"]
Home = Literal["identities", "checkpoints", "reports"]


@dataclass(frozen=True)
class Stage:
    """One stage of the DAG, as its module declares it.

    scope: whose artifact it makes. "identity": one per identity; "shared": one from every identity at once (the
    pretrained checkpoint); "render": one per render (identity × motion), reading its identity's artifacts too.
    flow: which flow runs it ("onboard", "pretrain", "finetune", "render", "evaluate"); the flow runs its stages in
    the order their inputs give.
    """

    name: str
    flow: str
    description: str
    inputs: tuple[str, ...] = ()  # upstream stages (of the same owner; a render's may be its identity's)
    params: type | None = None  # the params.yaml section named after the stage: a core.params.Section subclass
    reads: tuple[str, ...] = ()  # further params sections it reads (their values go into its cache key)
    outputs: tuple[str, ...] = ()  # files and folders (ending in /) it writes; "?" at the end: not always
    scope: Scope = "identity"
    home: Home = "identities"  # where an identity's artifact lives under data/ (shared and render ones: fixed)
    resource: str | None = None  # what it is heavy on ("gpu", "cpu"): a Prefect tag with a concurrency limit
    external: str | None = None  # an input from outside the workspace (the video, a motion), hashed by content
    weights: tuple[str, ...] = ()  # params of its section naming local weight files: hashed as inputs
    body_model: bool = False  # reads the SMPL-X body model file (params section body_model), hashed as an input
    base_weights: bool = False  # starts from the profile's base weights (hashed as an input)
    resumable: bool = False  # keeps partial work (training state) under the cache key across a kill
    # reads and fills the workspace's store of frozen encoders' outputs (tasks.encoded; keyed by content, not by run)
    encodings: bool = False
    # runs models: gets a `compute` (its device, held for the run, and its memory bound); "part": models in part
    # of its run only, whose device is claimed for that part (`compute.held()`)
    device: bool | Literal["part"] = False
    describe: Callable[[dict[str, Any]], str] | None = None  # its manifest summary as one line for people
    in_dvc: bool = True  # a dvc.yaml stage (the source is tracked with `dvc add` instead)
    command: str | None = None  # dvc.yaml's cmd when not `anchor stage run` ({item} = the identity)
    dvc_outs: tuple[str, ...] = ()  # files DVC tracks one by one (so metrics/plots can sit beside them)
    dvc_metrics: tuple[str, ...] = ()  # files that are DVC metrics (`dvc metrics show/diff`)
    dvc_plots: tuple[str, ...] = ()  # files or folders that are DVC plots (x = the "frame" column)
    module: str = ""  # filled in by the registry: the module that declared it

    @property
    def section(self) -> str | None:
        """The params.yaml section of the stage: named after it, when it has params."""
        return self.name if self.params is not None else None

    @property
    def shared(self) -> bool:
        return self.scope == "shared"

    @property
    def render(self) -> bool:
        return self.scope == "render"

    def code_modules(self) -> list[str]:
        return import_closure(self.module)

    def code_hash(self) -> str:
        return code_hash_of(self.module)

    def code_files(self) -> tuple[str, ...]:
        """The files of its import closure, relative to the folder holding the project's packages."""
        return tuple(_source_path(m, CODE_ROOT).relative_to(CODE_ROOT).as_posix()  # type: ignore[union-attr]
                     for m in self.code_modules())

    def packages(self) -> dict[str, str]:
        """Installed versions of the third-party distributions the stage's code imports: a library that computes
        the artifact (MediaPipe, diffusers, librosa) at another version may compute it differently."""
        return package_versions_of(self.module)

    def cache_key(self, owner: str, params_hash: str | None, input_hashes: dict[str, str]) -> str:
        """hash(stage code, its libraries' versions, params section, input content hashes) plus the owner the
        artifact belongs to."""
        return hash_obj({
            "stage": self.name,
            "identity": owner,
            "code": self.code_hash(),
            "packages": self.packages(),
            "params": params_hash,
            "inputs": dict(sorted(input_hashes.items())),
        })

    def summary_line(self, summary: dict[str, Any]) -> str:
        if self.describe is None or not summary:
            return ""
        try:
            return self.describe(summary)
        except (KeyError, TypeError, ValueError):  # a summary written by an older version of the stage
            return ""


# ------------------------------------------------------------------------------------------------ code hashing
CODE_ROOT = Path(__file__).resolve().parent.parent  # the folder holding this project's packages


def _source_path(module: str, root: Path) -> Path | None:
    """The file of a project module under `root` (a package's __init__.py), or None."""
    if not _is_project(module):
        return None
    base = root.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _is_project(module: str) -> bool:
    return module.split(".")[0] in PROJECT_PACKAGES


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and (
        (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
        or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING"))


_RAW: dict[tuple[str, str], list[tuple[str, tuple[str, ...]]]] = {}
_EXTERNAL: dict[tuple[str, str], frozenset[str]] = {}


def _external_imports(module: str, digest: str, tree: ast.Module) -> frozenset[str]:
    """Top-level names of the third-party modules `tree` imports anywhere (not the standard library, not ours,
    not relative, not under `if TYPE_CHECKING:`)."""
    key = (module, digest)
    if key not in _EXTERNAL:
        skip: set[int] = set()
        for node in ast.walk(tree):
            if _type_checking_only(node):
                skip.update(id(n) for n in ast.walk(node))
        names: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names.add(node.module.split(".")[0])
        _EXTERNAL[key] = frozenset(n for n in names if n not in sys.stdlib_module_names and n not in PROJECT_PACKAGES
                                   and n != "__future__")
    return _EXTERNAL[key]


def _raw_imports(module: str, digest: str, tree: ast.Module, is_package: bool) -> list[tuple[str, tuple[str, ...]]]:
    """(module named, names taken from it) for each project import in `tree`, relative ones made absolute;
    imports under `if TYPE_CHECKING:` left out (they never run)."""
    key = (module, digest)
    if key in _RAW:
        return _RAW[key]
    skip: set[int] = set()
    for node in ast.walk(tree):
        if _type_checking_only(node):
            skip.update(id(n) for n in ast.walk(node))
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[str, tuple[str, ...]]] = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, ()) for a in node.names if _is_project(a.name)]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if _is_project(target):
                found.append((target, tuple(a.name for a in node.names)))
    _RAW[key] = found
    return found


def _imports(module: str, digest: str, tree: ast.Module, is_package: bool, root: Path) -> set[str]:
    """Project modules `module` imports anywhere (functions included), each with the packages above it."""
    found: set[str] = set()
    for target, names in _raw_imports(module, digest, tree, is_package):
        found.add(target)
        for name in names:
            sub = f"{target}.{name}"
            if name != "*" and _source_path(sub, root) is not None:
                found.add(sub)  # `from pkg import mod` names a module; `from mod import name` a name inside it
    out = set()
    for name in found:
        parts = name.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))  # a module runs its packages' __init__
    return {m for m in out if _source_path(m, root) is not None}


_TREES: dict[str, ast.Module] = {}  # syntax trees by the sha256 of their source: an edited file is parsed anew
# CPython 3.11's parser is not safe to call from two threads at once ("AST constructor recursion depth mismatch",
# seen when stages of several identities hash their code side by side): one parse at a time
_PARSE = threading.Lock()
_HASHES: dict[str, str] = {}  # module hashes by the same key


def _read(module: str, root: Path) -> tuple[str, str, bool]:
    """(source, its sha256, is a package) of a project module under `root`."""
    path = _source_path(module, root)
    if path is None:
        raise ModuleNotFoundError(f"no Python source for module {module!r} under {root}")
    text = path.read_text()
    return text, sha256_bytes(text.encode()), path.name == "__init__.py"


def _tree(text: str, digest: str) -> ast.Module:
    with _PARSE:
        if digest not in _TREES:
            _TREES[digest] = ast.parse(text)
        return _TREES[digest]


def import_closure(module: str, root: Path = CODE_ROOT) -> list[str]:
    """`module` and every project module it imports, directly or not, sorted. Read from the files as they are now."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        text, digest, is_package = _read(name, root)
        parents = {name.rsplit(".", i)[0] for i in range(1, name.count(".") + 1)}  # run before it on import
        todo.extend((_imports(name, digest, _tree(text, digest), is_package, root) | parents) - seen)
    return sorted(seen)


class _NoDocstrings(ast.NodeTransformer):
    """What runs, not how it is written: docstrings dropped (comments and layout never reach the tree)."""

    def _strip(self, node: Any) -> Any:
        self.generic_visit(node)
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
        return node

    visit_Module = visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _strip


def module_hash(module: str, root: Path = CODE_ROOT) -> str:
    """Hash of what a module's code does: its syntax tree without docstrings, so editing a comment, a docstring or
    the layout keeps every cache, and any change to a statement invalidates it."""
    text, digest, _ = _read(module, root)
    if digest not in _HASHES:
        with _PARSE:
            tree = _NoDocstrings().visit(ast.parse(text))  # a fresh tree: the transformer edits it
        _HASHES[digest] = sha256_bytes(ast.dump(tree, include_attributes=False).encode())
    return _HASHES[digest]


def external_modules(module: str, root: Path = CODE_ROOT) -> list[str]:
    """Third-party top-level modules that `module` and its project import closure import, sorted."""
    found: set[str] = set()
    for name in import_closure(module, root):
        text, digest, _ = _read(name, root)
        found |= _external_imports(name, digest, _tree(text, digest))
    return sorted(found)


def package_versions_of(module: str, root: Path = CODE_ROOT) -> dict[str, str]:
    """{distribution: installed version} for the third-party modules `module`'s code imports; a module no
    installed distribution provides is left out (an optional import that is not there)."""
    return installed_versions(distributions_of(external_modules(module, root)))


def code_hash_of(*modules: str, root: Path = CODE_ROOT) -> str:
    """Hash of the code the given modules run: each of them and its whole import closure."""
    closure = sorted({m for mod in modules for m in import_closure(mod, root)})
    return hash_obj({m: module_hash(m, root) for m in closure})
