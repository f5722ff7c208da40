"""The stage contract checked, not only written: every file a stage opens is compared with what it declares.

A Python audit hook (`sys.addaudithook`) sees the `open` events (and directory listings, renames, removals and
copies) of the thread that runs a stage, of the threads it starts while it runs, and of the worker processes it
spawns through `tasks.workers`. A stage may read its declared inputs (upstream artifacts, external files, weights,
the body model, base weights) and write only its output directory, its scratch space and temporary space — and
read back from temporary space only what it made there itself. The libraries' own files (the interpreter,
site-packages, the system, user caches and fonts) and the project's code are aside. Anything else, inside the
workspace or outside it, is a hidden input or a stray write: the stage fails with a `ContractViolation` naming the
file.

Native code opens files without Python's audit events (OpenCV, pyarrow, PyAV, safetensors): while the check is on,
their file functions are wrapped to raise the same `open` event first (when their module is first imported), so
their reads and writes are judged too.
What other native code opens by itself (MediaPipe's graphs, torch's kernels) is not seen.

Off unless `ANCHOR_CHECK_CONTRACT=1`; the test suite sets it, so every stage a test runs is checked.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.abc
import os
import site
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import StageError

ENV = "ANCHOR_CHECK_CONTRACT"
CODE_ROOT = Path(__file__).resolve().parent.parent
_PROJECT_PACKAGES = ("core", "models", "tasks", "flows", "service", "cli")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
# event -> (position of a path, position of the directory fd it is relative to or None, written?) for each path
_EVENTS: dict[str, tuple[tuple[int, int | None, bool], ...]] = {
    "os.listdir": ((0, None, False),),
    "os.scandir": ((0, None, False),),
    "os.rename": ((0, 2, True), (1, 3, True)),
    "os.remove": ((0, 1, True),),
    "os.rmdir": ((0, 1, True),),
    "os.mkdir": ((0, 2, True),),
    "os.symlink": ((1, 2, True),),
    "os.link": ((0, 2, False), (1, 3, True)),
    "os.truncate": ((0, None, True),),
    "shutil.copyfile": ((0, None, False), (1, None, True)),
    "shutil.copytree": ((0, None, False), (1, None, True)),
    "shutil.rmtree": ((0, 1, True),),
}
# native file functions, wrapped to raise an `open` audit event first: (module, attribute, position or keyword of
# the path, write?, mode argument position for functions whose mode decides)
_NATIVE: tuple[tuple[str, str, int, str, bool | None], ...] = (
    ("cv2", "imread", 0, "filename", False),
    ("cv2", "imwrite", 0, "filename", True),
    ("pyarrow.parquet", "read_table", 0, "source", False),
    ("pyarrow.parquet", "write_table", 1, "where", True),
    ("av", "open", 0, "file", None),  # its mode ("r" or "w") decides
    ("safetensors.torch", "load_file", 0, "filename", False),
    ("safetensors.torch", "save_file", 1, "filename", True),
    ("safetensors", "safe_open", 0, "filename", False),
)
_NATIVE_MODULES = frozenset(entry[0] for entry in _NATIVE)


class ContractViolation(StageError):
    """A stage read a file it does not declare, or wrote outside its output."""


def enabled() -> bool:
    return os.environ.get(ENV) == "1"


def _real(path: str | os.PathLike[str]) -> str:
    return os.path.realpath(os.fsdecode(path))


def _under(path: str, roots: Iterable[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def _library_roots() -> tuple[str, ...]:
    """Where libraries keep their own files: the interpreter and its packages, the system, user caches and fonts
    (matplotlib, which MediaPipe imports, lists every font directory the first time it runs on a machine)."""
    home = Path.home()
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, *sysconfig.get_paths().values(), *site.getsitepackages(),
             site.getusersitepackages(), "/usr", "/lib", "/lib32", "/lib64", "/bin", "/sbin", "/etc", "/proc",
             "/sys", "/dev", "/run", "/var/cache", "/var/lib", str(home / ".cache"), str(home / ".config"),
             str(home / ".local"), str(home / ".fonts"), str(home / ".fontconfig"),
             *(os.environ.get(v, "") for v in ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "MPLCONFIGDIR", "NUMBA_CACHE_DIR"))}
    # the project's code (imports made while a stage runs) and its installed metadata
    roots |= {str(CODE_ROOT / p) for p in _PROJECT_PACKAGES} | {str(p) for p in CODE_ROOT.glob("*.egg-info")}
    return tuple(sorted({_real(r) for r in roots if r}))


@dataclass
class Allowance:
    """What one stage run may touch."""

    stage: str
    workspace: str
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    made: set[str] = field(default_factory=set)  # what the stage created in temporary space: its own to read
    libraries: tuple[str, ...] = field(default_factory=_library_roots)
    temp: str = field(default_factory=lambda: _real(tempfile.gettempdir()))
    listable: frozenset[str] = field(default_factory=lambda: frozenset(_real(p) for p in sys.path if p))
    violations: list[str] = field(default_factory=list)
    active: bool = True

    def judge(self, path: str, write: bool, listing: bool = False) -> str | None:
        """Why touching `path` breaks the contract, or None."""
        if _under(path, self.writes) or _under(path, self.libraries):
            return None
        if not write and path.endswith(".py") and _module_source(path):
            return None  # the source of an imported module, read for a traceback or a warning's line
        if not write and (_under(path, self.reads) or _under(path, self.made) or (listing and path in self.listable)):
            return None  # importlib lists the directories on sys.path when one changes
        inside = _under(path, (self.workspace,))
        if write and not inside and _under(path, (self.temp,)):  # temporary space: its own, to read back
            self.made.add(path)
            return None
        what = "wrote" if write else "read"
        where = "in the workspace" if inside else "outside the workspace"
        return f"{self.stage} {what} {path} ({where}), which it does not declare"

    def state(self) -> dict[str, Any]:
        return {"stage": self.stage, "workspace": self.workspace, "reads": self.reads, "writes": self.writes,
                "made": set(self.made)}


_SOURCES: set[str] = set()


def _module_source(path: str) -> bool:
    """True for the file of a module this process has imported (the set refreshed when a path is not in it)."""
    if path not in _SOURCES:
        _SOURCES.update(_real(f) for m in list(sys.modules.values()) if isinstance(f := getattr(m, "__file__", None),
                                                                                   str))
    return path in _SOURCES


_LOCAL = threading.local()
_INSTALLED: list[bool] = []
_INSTALL = threading.Lock()


def _current() -> Allowance | None:
    allowance = getattr(_LOCAL, "allowance", None)
    return allowance if allowance is not None and allowance.active else None


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if event == "open":
        allowance = _current()
        if allowance is None or getattr(_LOCAL, "busy", False) or not isinstance(args[0], str | bytes | os.PathLike):
            return
        mode, flags = args[1], args[2]
        write = (any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & _WRITE_FLAGS))
        _check(allowance, ((args[0], None, write),))
        return
    positions = _EVENTS.get(event)
    if positions is None:
        return
    allowance = _current()
    if allowance is None or getattr(_LOCAL, "busy", False):
        return
    _check(allowance, [(args[i], args[fd] if fd is not None and fd < len(args) else None, write)
                       for i, fd, write in positions if i < len(args)], listing=event in ("os.listdir", "os.scandir"))


def _resolve(path: Any, dir_fd: Any, write: bool) -> str | None:
    """The real path meant, or None when it cannot be known: a relative path read through a directory fd that the
    event does not carry (`os.open` inside `shutil.rmtree`, `os.fwalk`)."""
    if not isinstance(path, str | bytes | os.PathLike):
        return None  # a file descriptor: judged when it was opened
    text = os.fsdecode(path)
    if isinstance(dir_fd, int) and not os.path.isabs(text):
        return _real(os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), text))
    if not write and not os.path.isabs(text):
        return None
    return _real(text)


def _check(allowance: Allowance, paths: Iterable[tuple[Any, Any, bool]], listing: bool = False) -> None:
    _LOCAL.busy = True  # what the check itself does (realpath, readlink) is not the stage's
    try:
        problems = [why for p, fd, write in paths
                    if (real := _resolve(p, fd, write)) is not None and (why := allowance.judge(real, write, listing))]
    finally:
        _LOCAL.busy = False
    if problems:
        allowance.violations.extend(problems)
        raise ContractViolation(problems[0])


def _audited(fn: Callable[..., Any], position: int, keyword: str, write: bool | None) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        path = args[position] if len(args) > position else kwargs.get(keyword)
        if isinstance(path, str | bytes | os.PathLike):
            mode = args[1] if write is None and len(args) > 1 else kwargs.get("mode", "r")
            writes = write if write is not None else any(c in str(mode) for c in "wax+")
            sys.audit("open", path, "wb" if writes else "rb", 0)
        return fn(*args, **kwargs)

    wrapper.__wrapped_for_contract__ = True  # type: ignore[attr-defined]
    return wrapper


def _wrap_native() -> None:
    """Wrap the modules already loaded now and the others when they are first imported: installing the check
    imports nothing itself (a spawned worker that never uses torch does not load it for safetensors' sake)."""
    for name in _NATIVE_MODULES:
        if name in sys.modules:
            _wrap_module(name, sys.modules[name])
    if not any(isinstance(finder, _WrapOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _WrapOnImport())


def _wrap_module(name: str, module: Any) -> None:
    for module_name, attr, position, keyword, write in _NATIVE:
        fn = getattr(module, attr, None) if module_name == name else None
        if fn is not None and not getattr(fn, "__wrapped_for_contract__", False):
            setattr(module, attr, _audited(fn, position, keyword, write))


class _WrapOnImport(importlib.abc.MetaPathFinder):
    """Finds a native module's spec with the other finders and wraps its loader, so the module's file functions
    are wrapped as soon as it has run (before anyone can call them)."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in _NATIVE_MODULES:  # asked of every import while the check is on
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None) if finder is not self else None
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _WrappingLoader(spec.loader, fullname)
                return spec
        return None


class _WrappingLoader(importlib.abc.Loader):
    def __init__(self, loader: Any, name: str) -> None:
        self._loader, self._name = loader, name

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        module.__loader__ = self._loader  # the module keeps its own loader (resources, reloads)
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        _wrap_module(self._name, module)
        if sys.modules.get(self._name) is not module:  # a package that replaced itself while it ran (cv2)
            _wrap_module(self._name, sys.modules.get(self._name))

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._loader, attr)


def _follow_threads() -> None:
    """A thread a watched thread starts (a stage's own pool) is judged by the same allowance while it holds.
    (Python 3.11 raises no audit event when a thread starts.)"""
    start = threading.Thread.start

    @functools.wraps(start)
    def started(self: threading.Thread, *args: Any, **kwargs: Any) -> None:
        allowance = _current()
        if allowance is not None:
            run = self.run

            def run_watched() -> None:
                _LOCAL.allowance = allowance
                try:
                    run()
                finally:
                    _LOCAL.allowance = None

            self.run = run_watched  # type: ignore[method-assign]
        start(self, *args, **kwargs)

    threading.Thread.start = started  # type: ignore[method-assign]


def _install() -> None:
    with _INSTALL:
        if not _INSTALLED:
            sys.addaudithook(_hook)
            _wrap_native()
            _follow_threads()
            _INSTALLED.append(True)


@contextlib.contextmanager
def watch(stage: str, workspace: Path, reads: Iterable[Path], writes: Iterable[Path]) -> Iterator[None]:
    """Check what this thread (and those it starts) opens while the block runs, when enabled; a violation fails the
    block, even one a library caught on its way."""
    if not enabled():
        yield
        return
    _install()
    allowance = Allowance(stage, _real(workspace), tuple(_real(p) for p in reads), tuple(_real(p) for p in writes))
    before = _current()
    _LOCAL.allowance = allowance
    try:
        yield
    finally:
        _LOCAL.allowance = before
        allowance.active = False  # threads it started and that outlive it are judged no more
    if allowance.violations:
        raise ContractViolation(allowance.violations[0])


def worker_state() -> dict[str, Any] | None:
    """The current allowance, for a spawned worker process to check itself by (None: nothing watched)."""
    allowance = _current()
    return allowance.state() if allowance is not None else None


def install_in_worker(state: dict[str, Any] | None) -> None:
    """In a worker process: watch its main thread with the parent stage's allowance."""
    if not state:
        return
    _install()
    _LOCAL.allowance = Allowance(**state)
