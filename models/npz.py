"""Arrays to a .npz file that is the same bytes for the same arrays: written atomically, its zip entries dated
1980-01-01 (np.savez stamps the current time into the zip, so an unchanged output would hash anew on every run)."""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

# what np.load raises for an .npz that is gone, empty or cut short (not a whole zip); ValueError, a pickled or
# malformed array, is each reader's to word
UNREADABLE = (OSError, EOFError, zipfile.BadZipFile)


def write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, value in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(value), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())
    os.replace(tmp, path)
    return path
