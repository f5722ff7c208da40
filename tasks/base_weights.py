"""Where a workspace's base weights are (the parts the training stages start from), per profile, and their hash.

`tiny` and `cpu` are written on first use (models.parts.write_tiny / write_cpu) into the workspace's cache under a
name carrying the generator code's hash; `sd15` reads the folders set in the
`models` section. Either way they are then loaded with `from_pretrained`, and their files' hash is a stage input.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock

from core.errors import ParamsError, StageError
from core.hashing import hash_obj, hash_tree
from core.stage import code_hash_of

if TYPE_CHECKING:
    from models import parts


def quiet() -> None:
    """No per-file progress bars or advice from diffusers/transformers inside our own progress display."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    for lib in (dlog, tlog):
        lib.disable_progress_bar()
        lib.set_verbosity_error()


def resolve(settings: Any, root: Path, cache: Path) -> parts.BasePaths:
    """`settings`: anything with the workspace's `profile` and `models` section."""
    from models import parts

    if settings.profile == "sd15":
        m = settings.models
        unset = [n for n in ("sd15", "sd15_inpaint", "image_encoder", "motion_adapter") if not getattr(m, n)]
        if unset:
            raise ParamsError(f"profile sd15 needs local model folders: set models.{', models.'.join(unset)} in "
                              "params.yaml (no weights are downloaded)")

        def local(v: str) -> Path:
            p = Path(v).expanduser()
            return p if p.is_absolute() else root / p

        paths = parts.BasePaths(local(m.sd15), local(m.sd15_inpaint), local(m.image_encoder), local(m.motion_adapter))
        try:
            parts.check(paths)
        except parts.ModelFilesError as exc:
            raise StageError(f"models.{exc}") from None
        return paths
    profile = settings.profile
    target = cache / f"{profile}-{code_hash_of('models.parts')[:16]}"
    if not (target / ".complete").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        with FileLock(cache / f".{target.name}.lock"):  # several stages at once: one writes, the others wait
            if not (target / ".complete").is_file():
                quiet()
                tmp = target.with_name(f".{target.name}.{os.getpid()}")
                shutil.rmtree(tmp, ignore_errors=True)
                (parts.write_cpu if profile == "cpu" else parts.write_tiny)(tmp)
                (tmp / ".complete").write_text("")
                shutil.rmtree(target, ignore_errors=True)
                tmp.rename(target)
    return parts.BasePaths(target / "sd15", target / "sd15_inpaint", target / "image_encoder",
                          target / "motion_adapter")


_FINGERPRINTS: dict[tuple, str] = {}


def fingerprint(paths: parts.BasePaths) -> str:
    """Content hash of every base folder. A multi-GB SD folder takes seconds to read, and a flow asks twice per
    stage (cache key, then the run), so the hash is remembered for as long as no file's size or mtime changes."""
    folders = {f: Path(getattr(paths, f)) for f in ("sd15", "inpaint", "image_encoder", "motion_adapter")}
    stamp = tuple(sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns)
                         for root in folders.values() for p in root.rglob("*") if p.is_file()))
    if stamp not in _FINGERPRINTS:
        _FINGERPRINTS[stamp] = hash_obj({f: hash_tree(root) for f, root in folders.items()})
    return _FINGERPRINTS[stamp]
