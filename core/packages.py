"""Which installed distributions provide the third-party modules a piece of code imports, and at what version.

Read from the installed distributions' metadata (what `pip` installed, not what a requirements file asks for),
once per process: a stage's cache key holds the versions of the libraries its code imports.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache
from importlib import metadata


def _name(dist: metadata.Distribution) -> str:
    # the normalised name from the dist-info folder's name when there is one: parsing every METADATA file (what
    # `metadata.packages_distributions` does) costs a cached command most of a second
    return getattr(dist, "_normalized_name", None) or metadata.Distribution.name.fget(dist)  # type: ignore[attr-defined]


def _modules(dist: metadata.Distribution) -> set[str]:
    """Top-level modules a distribution installs: its top_level.txt, else the first parts of its RECORD."""
    top = dist.read_text("top_level.txt")
    if top:
        return set(top.split())
    found = set()
    for f in dist.files or ():
        first = f.parts[0] if f.parts else ""
        if first and not first.endswith((".dist-info", ".egg-info", ".data", ".pth")) and first != "..":
            found.add(first.removesuffix(".py"))
    return found


@cache
def _providers() -> dict[str, tuple[str, ...]]:
    out: dict[str, set[str]] = {}
    for dist in metadata.distributions():
        name = _name(dist)
        for module in _modules(dist):
            out.setdefault(module, set()).add(name)
    return {module: tuple(sorted(names)) for module, names in out.items()}


def distributions_of(modules: Iterable[str]) -> list[str]:
    """Distributions that provide these top-level modules, sorted; a module none provides is left out."""
    providers = _providers()
    return sorted({dist for module in modules for dist in providers.get(module, ())})


@cache
def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def installed_versions(names: Iterable[str]) -> dict[str, str]:
    """{distribution: installed version} for those of `names` that are installed."""
    return {n: v for n in names if (v := _version(n)) is not None}
