"""Which SMPL-X file the body stages read: the user's real files (`body_model.path`) or the generated mannequin.

The mannequin is built on first use into the workspace's state directory, under a name carrying the hash of the
code that generates it, so a change to the generator makes a new file (and new cache keys downstream).
"""

from __future__ import annotations

from pathlib import Path

from filelock import FileLock

from core.errors import StageError
from core.params import BodyModelParams
from core.stage import code_hash_of
from models import body, mannequin


def resolve(params: BodyModelParams, root: Path, cache: Path) -> Path:
    if params.path:
        path = Path(params.path).expanduser()
        path = path if path.is_absolute() else root / path
        try:
            return body.model_file(path)
        except FileNotFoundError as exc:
            raise StageError(str(exc)) from None
    target = cache / f"mannequin-{code_hash_of('models.mannequin')[:16]}" / "SMPLX_NEUTRAL.npz"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(target.parent / ".write.lock"):  # stages of several identities at once: one writes it
            if not target.is_file():
                mannequin.write(target)
    return target
