"""Which SMPL-X file the body stages read: the user's real files (`body_model.path`) or the generated mannequin.

The mannequin is built on first use into the workspace's state directory, under a name carrying the hash of the
code that generates it, so a change to the generator makes a new file (and new cache keys downstream).

A model file given by the user never runs code when loaded: smplx unpickles .pkl files and loads .npz files with
pickles allowed, so an .npz is checked to hold plain arrays only, and a .pkl is read by the same restricted
unpickler as motion pickles and rewritten once as such an .npz (byte for byte the same each time) that smplx loads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from filelock import FileLock

from core.errors import InputError, StageError
from core.hashing import sha256_file
from core.params import BodyModelParams
from core.stage import code_hash_of
from models import mannequin
from models.motion_io import HandBasis, load_pickle_restricted
from models.npz import UNREADABLE, write_npz


def resolve(params: BodyModelParams, root: Path, cache: Path) -> Path:
    if params.path:
        from models import body  # smplx imports torch: seconds a run on the mannequin does not need

        path = Path(params.path).expanduser()
        path = path if path.is_absolute() else root / path
        try:
            return safe(body.model_file(path), cache)
        except FileNotFoundError as exc:
            raise StageError(str(exc)) from None
    target = cache / f"mannequin-{code_hash_of('models.mannequin')[:16]}" / "SMPLX_NEUTRAL.npz"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(target.parent / ".write.lock"):  # stages of several identities at once: one writes it
            if not target.is_file():
                mannequin.write(target)
    return target


_CHECKED: dict[tuple[str, int, int], Path] = {}


def safe(file: Path, cache: Path) -> Path:
    """`file` itself when it is an .npz of plain arrays; for a .pkl, its plain-array .npz under `cache`."""
    stat = file.stat()
    key = (str(file), stat.st_size, stat.st_mtime_ns)
    if key in _CHECKED:
        return _CHECKED[key]
    if file.suffix.lower() == ".npz":
        try:
            with np.load(file, allow_pickle=False) as archive:
                for name in archive.files:
                    archive[name]  # noqa: B018 - raises for an array that needs pickle
        except ValueError as exc:
            raise StageError(f"{file}: holds a pickled object array ({exc}); an SMPL-X .npz of plain arrays is "
                             "needed (a pickle can run code)") from None
        except UNREADABLE as exc:
            raise StageError(f"{file}: not a readable SMPL-X .npz ({exc})") from None
        _CHECKED[key] = file
        return file
    try:
        data = load_pickle_restricted(file)
    except InputError as exc:
        raise StageError(f"body_model.path: {exc}; use the SMPL-X .npz files instead") from None
    if not isinstance(data, dict):
        raise StageError(f"{file}: not an SMPL-X model (a {type(data).__name__}, not a mapping of arrays)")
    target = cache / f"converted-{sha256_file(file)[:16]}" / "SMPLX_NEUTRAL.npz"
    if not target.is_file():  # the model's arrays only (smplx reads no others), the same bytes every time
        write_npz(target, {name: value for name in sorted(data)
                           if not (value := np.asarray(data[name])).dtype.hasobject})
    _CHECKED[key] = target
    return target


HAND_ARRAYS = ("hands_componentsl", "hands_meanl", "hands_componentsr", "hands_meanr")


def hand_basis(file: Path, real: bool) -> HandBasis | None:
    """The hand PCA of a (checked) SMPL-X .npz; `real` when it is the user's SMPL-X, not the mannequin. None for a
    model file without it (then PCA hand poses are refused with a message, as without a body model)."""
    with np.load(file, allow_pickle=False) as model:
        if not set(HAND_ARRAYS) <= set(model.files):
            return None
        arrays = {k: np.asarray(model[k], np.float32).reshape(-1, 45) for k in HAND_ARRAYS}
    return HandBasis(arrays["hands_componentsl"], arrays["hands_meanl"][0], arrays["hands_componentsr"],
                     arrays["hands_meanr"][0], faithful=real)
