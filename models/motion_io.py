"""Readers for SMPL-X motion files (`anchor render --motion`), normalised to one `Motion` in full axis-angle.

Every reader checks layouts and frame counts before converting or resampling anything, and every failure is an
`InputError` with one line naming the expected layout, so a studio engineer can fix the export rather than debug us.
"""

from __future__ import annotations

import io
import json
import math
import pickle
import re
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import InputError
from models.npz import UNREADABLE

#: Widths of the per-frame arrays of a Motion; rotations are axis-angle triples.
ROTATIONS: dict[str, int] = {
    "global_orient": 3,
    "body_pose": 63,
    "left_hand_pose": 45,
    "right_hand_pose": 45,
    "jaw_pose": 3,
    "leye_pose": 3,
    "reye_pose": 3,
}
WIDTHS: dict[str, int] = {**ROTATIONS, "transl": 3}

# Column order inside the packed arrays of each format.
_SMPLX_POSES = (
    ("global_orient", 3),
    ("body_pose", 63),
    ("jaw_pose", 3),
    ("leye_pose", 3),
    ("reye_pose", 3),
    ("left_hand_pose", 45),
    ("right_hand_pose", 45),
)
_SMPLH_POSES = (("global_orient", 3), ("body_pose", 63), ("left_hand_pose", 45), ("right_hand_pose", 45))
_TALKSHOW = (
    ("jaw_pose", 3),
    ("leye_pose", 3),
    ("reye_pose", 3),
    ("global_orient", 3),
    ("body_pose", 63),
    ("left_hand_pose", 45),
    ("right_hand_pose", 45),
    ("expression", 100),
)
_SMPLX_LAYOUT = (
    "(T, 165) SMPL-X poses [global 3, body 63, jaw 3, leye 3, reye 3, left hand 45, right hand 45] or (T, 156) SMPL-H"
)
_TALKSHOW_LAYOUT = (
    "(T, 265) TalkSHOW [jaw 3, leye 3, reye 3, global 3, body 63, left hand 45, right hand 45, expression 100]"
)
_PKL_LAYOUT = (
    "a dict (or list of per-frame dicts) with global_orient (T, 3) or (T, 1, 3), body_pose or SHOW's body_pose_axis "
    "(T, 63) or (T, 21, 3), and optionally transl (T, 3), left_hand_pose/right_hand_pose (T, 45) or PCA (T, K), "
    "jaw_pose/leye_pose/reye_pose (T, 3), expression (T, E), betas"
)
_PARQUET_COLUMNS = ("clip", "frame", *WIDTHS, "expression")
SUPPORTED = (
    ".npz (AMASS/BEAT2 SMPL-X or SMPL-H), .npy (TalkSHOW), .pkl (SHOW), .parquet or a smplx_fit directory "
    "(this project's fit); a video goes through ingest → keypoints → smplx_fit"
)
FIT_FPS = 30.0
_ALLOWED_TEXT = "only numpy arrays, tensors and plain containers are allowed"


MIN_FPS, MAX_FPS = 1.0, 1000.0  # motion capture runs at 24 to a few hundred fps; anything outside is a broken file


@dataclass
class Motion:
    """A SMPL-X motion in full axis-angle; every per-frame array is float32 with T rows."""

    fps: float
    global_orient: np.ndarray  # (T, 3)
    transl: np.ndarray  # (T, 3) metres
    body_pose: np.ndarray  # (T, 63) 21 body joints, SMPL-X order
    left_hand_pose: np.ndarray  # (T, 45) full axis-angle, not PCA
    right_hand_pose: np.ndarray  # (T, 45)
    jaw_pose: np.ndarray  # (T, 3)
    leye_pose: np.ndarray  # (T, 3)
    reye_pose: np.ndarray  # (T, 3)
    expression: np.ndarray  # (T, E), E = 0 when the file has none
    betas: np.ndarray | None  # (B,) the source person's shape, in the source's shape space
    source: str  # "amass-npz" | "talkshow-npy" | "show-pkl" | "anchor-fit"
    notes: tuple[str, ...] = ()  # what reading had to give up (said in the render's summary)

    @property
    def frames(self) -> int:
        return int(self.global_orient.shape[0])

    def per_frame(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in (*WIDTHS, "expression")}

    def slice(self, start: int | None, stop: int | None) -> Motion:
        """Frames [start, stop) with Python slice semantics; copies so edits never alias the source."""
        window = range(self.frames)[start:stop]
        if not window:
            raise InputError(f"frames [{start}:{stop}] of a {self.frames}-frame motion are empty")
        cut = {name: array[window.start : window.stop].copy() for name, array in self.per_frame().items()}
        return replace(self, **cut, betas=None if self.betas is None else self.betas.copy())


# ---------------------------------------------------------------------------------------------------- dispatch


@dataclass(frozen=True)
class HandBasis:
    """A body model's hand PCA (components as rows, relaxed mean), to expand PCA hand poses (SHOW stores 12).
    `faithful` is False for a model whose components are not SMPL-X's (the mannequin): then only the mean is
    used and PCA hands fall back to the relaxed pose."""

    left_components: np.ndarray  # (45, 45)
    left_mean: np.ndarray  # (45,)
    right_components: np.ndarray
    right_mean: np.ndarray
    faithful: bool


def read_motion(path: Path | str, *, default_fps: float = 30.0, clip: str | None = None,
                hands: HandBasis | None = None) -> Motion:
    """Read any supported motion file; `clip` picks one clip of a fit output (the others have no clips); `hands`
    expands PCA hand poses (a SHOW .pkl), which are refused without it."""
    path = Path(path)
    if path.is_dir():
        if not (path / "params.parquet").is_file():
            raise InputError(f"{path}: directory has no params.parquet; expected a smplx_fit artifact directory")
        return _read_fit(path / "params.parquet", f"{path.name}/params.parquet", clip)
    if not path.is_file():
        raise InputError(f"{path}: no such motion file")
    suffix = path.suffix.lower()
    if clip is not None and suffix != ".parquet":
        raise InputError(f"{path.name}: clip={clip!r} only applies to fit output (.parquet or a smplx_fit directory)")
    if suffix == ".npz":
        return _read_npz(path, default_fps)
    if suffix == ".npy":
        return _read_talkshow(path, default_fps)
    if suffix in (".pkl", ".pickle"):
        return _read_show(path, default_fps, hands)
    if suffix == ".parquet":
        return _read_fit(path, path.name, clip)
    raise InputError(f"{path.name}: unsupported motion file; supported: {SUPPORTED}")


# ---------------------------------------------------------------------------------------------------- readers


MAX_ARRAY_BYTES = 4 << 30  # an hour of 240 fps motion is a few hundred MB; a header claiming more is a lie


def _claimed_bytes(file: Any) -> int:
    """The bytes an .npy header says its array holds (read from the header only)."""
    version = np.lib.format.read_magic(file)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(file)
    return int(np.prod(shape, dtype=np.float64)) * dtype.itemsize


def check_npz_headers(path: Path) -> None:
    """Refuse an .npz whose arrays claim more bytes than the archive holds (or absurdly many), before any is read:
    loading one would try to allocate what the header says."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with archive.open(info) as member:
                    claimed = _claimed_bytes(member)
                if claimed > MAX_ARRAY_BYTES or claimed > info.file_size:
                    raise InputError(f"{path.name}: {info.filename[:-4]} claims {claimed / 2**30:.1f} GiB but the "
                                     f"archive holds {info.file_size / 2**20:.1f} MiB of it: not a motion file")
    except (*UNREADABLE, ValueError) as exc:
        raise InputError(f"{path.name}: not a readable .npz ({exc})") from None


def _read_npz(path: Path, default_fps: float) -> Motion:
    label = path.name
    check_npz_headers(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except (*UNREADABLE, ValueError) as exc:
        raise InputError(f"{label}: not a readable .npz ({exc})") from exc
    with archive:
        keys = set(archive.files)

        def get(key: str) -> np.ndarray:
            try:
                return archive[key]
            except ValueError as exc:
                if "allow_pickle" in str(exc):  # object arrays need pickle, which could run code
                    raise InputError(
                        f"{label}: {key} is a pickled object array; refusing allow_pickle, re-save it numeric"
                    ) from exc
                raise InputError(f"{label}: {key} is not readable ({exc})") from exc

        if "poses" not in keys or "trans" not in keys:
            missing = " and ".join(k for k in ("poses", "trans") if k not in keys)
            raise InputError(
                f"{label}: no {missing} (has {', '.join(sorted(keys)) or 'nothing'}); expected AMASS/BEAT2 npz with "
                f"poses {_SMPLX_LAYOUT}, trans (T, 3)"
            )
        poses = _numeric(label, "poses", get("poses"))
        if poses.ndim != 2 or poses.shape[1] not in (165, 156):
            raise InputError(f"{label}: poses has shape {poses.shape}; expected {_SMPLX_LAYOUT}")
        arrays = _split(poses, _SMPLX_POSES if poses.shape[1] == 165 else _SMPLH_POSES)
        arrays["transl"] = _rows(label, "trans", _numeric(label, "trans", get("trans")), 3)
        if "expressions" in keys:
            expression = _numeric(label, "expressions", get("expressions"))
            if expression.ndim != 2:
                raise InputError(f"{label}: expressions has shape {expression.shape}; expected (T, E)")
            arrays["expression"] = expression
        betas = _betas(label, get("betas")) if "betas" in keys else None
        fps = default_fps
        for key in ("mocap_frame_rate", "mocap_framerate", "fps"):
            if key in keys:
                fps = _scalar(label, key, get(key))
                break
    return _motion(label, arrays, fps, betas, "amass-npz")


def _read_talkshow(path: Path, default_fps: float) -> Motion:
    label = path.name
    try:
        with path.open("rb") as file:
            claimed = _claimed_bytes(file)
            header = file.tell()
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"{label}: not a readable .npy ({exc})") from None
    if claimed > MAX_ARRAY_BYTES or claimed > path.stat().st_size - header:
        raise InputError(f"{label}: its header claims {claimed / 2**30:.1f} GiB but the file holds "
                         f"{path.stat().st_size / 2**20:.1f} MiB: not a motion file")
    try:
        data = np.load(path, allow_pickle=False, mmap_mode="r")  # header only until the shape is known good
    except ValueError as exc:
        raise InputError(
            f"{label}: not a numeric .npy array (loading it would need pickle, which is refused); "
            f"expected {_TALKSHOW_LAYOUT}"
        ) from exc
    except OSError as exc:
        raise InputError(f"{label}: not a readable .npy ({exc})") from exc
    if data.ndim == 3 and data.shape[0] == 1:  # TalkSHOW sometimes keeps its batch axis
        data = data[0]
    if data.ndim != 2 or data.shape[1] != 265:
        raise InputError(f"{label}: array has shape {data.shape}; expected {_TALKSHOW_LAYOUT}")
    arrays = _split(_numeric(label, "array", data), _TALKSHOW)
    return _motion(label, arrays, default_fps, None, "talkshow-npy")


_SHOW_ALIASES = {"body_pose_axis": "body_pose"}  # SHOW's name for the axis-angle body pose


def _read_show(path: Path, default_fps: float, hands: HandBasis | None = None) -> Motion:
    label = path.name
    data = load_pickle_restricted(path)
    fps: Any = None
    if isinstance(data, list) and data and all(isinstance(frame, dict) for frame in data):
        fps = data[0].get("fps", data[0].get("frame_rate"))
        data = _stack_frames(label, data)
    elif isinstance(data, dict):
        fps = data.get("fps", data.get("frame_rate"))
    else:
        raise InputError(f"{label}: holds a {type(data).__name__}; expected {_PKL_LAYOUT}")
    for alias, name in _SHOW_ALIASES.items():
        if name not in data and alias in data:
            data = {**data, name: data[alias]}
    missing = [key for key in ("global_orient", "body_pose") if key not in data]
    if missing:
        raise InputError(
            f"{label}: no {' or '.join(missing)} (has {', '.join(map(str, data)) or 'nothing'}); expected {_PKL_LAYOUT}"
        )
    arrays: dict[str, np.ndarray] = {}
    notes: list[str] = []
    for name in (*WIDTHS, "expression"):
        if data.get(name) is None:
            continue
        value = _numeric(label, name, data[name])
        shape = value.shape
        if value.ndim < 2:
            raise InputError(f"{label}: {name} has shape {shape}; expected {_PKL_LAYOUT}")
        value = value.reshape(shape[0], -1)
        if name in ("left_hand_pose", "right_hand_pose") and value.shape[1] != 45:
            if hands is None or value.shape[1] > 45:
                raise InputError(
                    f"{label}: {name} has {value.shape[1]} values per frame; expected 45 (axis-angle) or PCA "
                    "coefficients (at most 45) with a body model's hand components"
                )
            value, note = _expand_pca(value, hands, "left" if name.startswith("left") else "right")
            notes.append(note)
        if name != "expression" and value.shape[1] != WIDTHS[name]:
            raise InputError(f"{label}: {name} has shape {shape}; expected {_PKL_LAYOUT}")
        arrays[name] = value
    betas = _betas(label, data["betas"]) if data.get("betas") is not None else None
    fps = default_fps if fps is None else _scalar(label, "fps", fps)
    return replace(_motion(label, arrays, fps, betas, "show-pkl"), notes=tuple(dict.fromkeys(notes)))


def _expand_pca(coeffs: np.ndarray, hands: HandBasis, side: str) -> tuple[np.ndarray, str]:
    """PCA hand coefficients as full axis-angle, the way smplx expands them by default (relaxed mean + coefficients
    × leading components); the relaxed pose alone where the model's components are not SMPL-X's."""
    comps = hands.left_components if side == "left" else hands.right_components
    mean = hands.left_mean if side == "left" else hands.right_mean
    if not hands.faithful:
        return (np.broadcast_to(mean.astype(np.float32), (len(coeffs), 45)).copy(),
                f"hands: {coeffs.shape[1]} PCA coefficients need the real SMPL-X hand components "
                "(body_model.path); the relaxed pose is used instead")
    full = mean[None].astype(np.float64) + coeffs.astype(np.float64) @ comps[: coeffs.shape[1]].astype(np.float64)
    return full.astype(np.float32), f"hands: {coeffs.shape[1]} PCA coefficients expanded with the body model's"


def _stack_frames(label: str, frames: list[dict]) -> dict[str, Any]:
    """Per-frame dicts (SHOW writes one per image) become one dict of (T, ...) arrays."""
    keys = set(frames[0])
    for index, frame in enumerate(frames):
        if set(frame) != keys:
            raise InputError(
                f"{label}: frame {index} has keys {sorted(map(str, frame))}, frame 0 has {sorted(map(str, keys))}"
            )
    stacked: dict[str, Any] = {}
    for key in keys & {*WIDTHS, *_SHOW_ALIASES, "expression", "betas"}:  # SHOW also stores camera and image paths
        if frames[0][key] is None:
            continue
        values = [_numeric(label, str(key), frame[key]) for frame in frames]
        shapes = {value.shape for value in values}
        if len(shapes) != 1:
            raise InputError(f"{label}: {key} changes shape across frames ({sorted(shapes)})")
        stacked[key] = np.stack([value.reshape(-1) for value in values])
    return stacked


def _read_fit(path: Path, label: str, clip: str | None) -> Motion:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    layout = "smplx_fit params with columns clip, frame, " + ", ".join(
        [f"{name} list<float32>[{width}]" for name, width in WIDTHS.items()] + ["expression list<float32>[E]"]
    )
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{label}: not a readable parquet file ({exc})") from exc
    missing = [name for name in _PARQUET_COLUMNS if name not in schema.names]
    if missing:
        raise InputError(f"{label}: no column {', '.join(missing)}; expected {layout}")
    for name in _PARQUET_COLUMNS[2:]:
        kind = schema.field(name).type
        is_list = pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
        if not is_list or not (pa.types.is_floating(kind.value_type) or pa.types.is_integer(kind.value_type)):
            raise InputError(f"{label}: column {name} is {kind}; expected {layout}")
    if not pa.types.is_integer(schema.field("frame").type):
        raise InputError(f"{label}: column frame is {schema.field('frame').type}; expected {layout}")

    table = pq.read_table(path, columns=list(_PARQUET_COLUMNS))
    if clip is not None:
        available = sorted({str(name) for name in table.column("clip").to_pylist()})
        table = table.filter(pc.equal(table.column("clip").cast(pa.string()), clip))
        if table.num_rows == 0:
            raise InputError(f"{label}: no clip {clip!r}; available clips: {', '.join(available) or 'none'}")
    if table.num_rows == 0:
        raise InputError(f"{label}: has no frames; a motion needs at least one frame")
    table = table.sort_by([("clip", "ascending"), ("frame", "ascending")])
    clips = np.asarray(table.column("clip").to_pylist(), dtype=object)
    frame_numbers = table.column("frame").to_numpy()
    repeated = np.flatnonzero((clips[1:] == clips[:-1]) & (frame_numbers[1:] == frame_numbers[:-1]))
    if repeated.size:
        row = repeated[0] + 1
        raise InputError(f"{label}: clip {clips[row]!r} has frame {frame_numbers[row]} twice")

    arrays: dict[str, np.ndarray] = {}
    for name in _PARQUET_COLUMNS[2:]:
        column = table.column(name).combine_chunks()
        if column.null_count:
            row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
            raise InputError(
                f"{label}: {name} is null at clip {clips[row]!r} frame {frame_numbers[row]}; expected {layout}"
            )
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        width = WIDTHS.get(name, int(lengths[0]))
        bad = np.flatnonzero(lengths != width)
        if bad.size:
            row = bad[0]
            want = width if name in WIDTHS else f"{width} like clip {clips[0]!r} frame {frame_numbers[0]}"
            raise InputError(
                f"{label}: {name} has {lengths[row]} values at clip {clips[row]!r} frame "
                f"{frame_numbers[row]}; expected {want}"
            )
        values = pc.list_flatten(column).to_numpy(zero_copy_only=False)
        arrays[name] = values.reshape(table.num_rows, width)
    return _motion(label, arrays, FIT_FPS, _identity_betas(path.parent / "identity.json"), "anchor-fit")


def _identity_betas(path: Path) -> np.ndarray | None:
    if not path.is_file():
        return None
    label = f"{path.parent.name}/{path.name}"
    try:
        identity = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{label}: not readable JSON ({exc})") from exc
    if not isinstance(identity, dict) or identity.get("betas") is None:
        return None
    return _betas(label, identity["betas"])


# ---------------------------------------------------------------------------------------------------- checks


def _numeric(label: str, name: str, value: Any) -> np.ndarray:
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{label}: {name} is not a numeric array ({exc})") from exc
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise InputError(f"{label}: {name} has dtype {array.dtype}; expected numbers")
    return array


def _rows(label: str, name: str, array: np.ndarray, width: int) -> np.ndarray:
    if array.ndim != 2 or array.shape[1] != width:
        raise InputError(f"{label}: {name} has shape {array.shape}; expected (T, {width})")
    return array


def _split(packed: np.ndarray, layout: tuple[tuple[str, int], ...]) -> dict[str, np.ndarray]:
    offsets = np.cumsum([0] + [width for _, width in layout])
    return {name: packed[:, offsets[i] : offsets[i + 1]] for i, (name, _) in enumerate(layout)}


def _scalar(label: str, name: str, value: Any) -> float:
    array = _numeric(label, name, value)
    if array.size != 1 or not np.isfinite(array).all() or float(array.reshape(-1)[0]) <= 0:
        raise InputError(f"{label}: {name} is {array.tolist()}; expected one positive frame rate")
    return float(array.reshape(-1)[0])


def _betas(label: str, value: Any) -> np.ndarray:
    """Shape is per person, but some exports repeat it per frame: accept identical rows, refuse varying ones."""
    array = _numeric(label, "betas", value)
    array = array.reshape(-1) if array.ndim <= 1 else array.reshape(array.shape[0], -1)
    if array.ndim == 2 and array.shape[0] == 0:
        raise InputError(f"{label}: betas has shape {array.shape}; expected (B,)")
    if array.ndim == 2:
        if not np.allclose(array, array[:1]):
            raise InputError(f"{label}: betas has shape {array.shape} and varies by frame; expected (B,)")
        array = array[0]
    if not np.isfinite(array).all():
        raise InputError(f"{label}: betas has NaN/inf values")
    return array.astype(np.float32)


def _motion(label: str, arrays: dict[str, np.ndarray], fps: float, betas: np.ndarray | None, source: str) -> Motion:
    """Shared checks: frame counts agree and are non-zero before any value is converted or scanned."""
    reference = "global_orient"
    frames = arrays[reference].shape[0]
    for name, array in arrays.items():
        if array.shape[0] != frames:
            raise InputError(f"{label}: {name} has {array.shape[0]} frames but {reference} has {frames}")
    if frames == 0:
        raise InputError(f"{label}: has 0 frames; a motion needs at least one frame")
    if not (np.isfinite(fps) and MIN_FPS <= fps <= MAX_FPS):
        raise InputError(f"{label}: frame rate {fps:g} fps is not one a motion is recorded at "
                         f"({MIN_FPS:g} to {MAX_FPS:g} fps)")
    fields: dict[str, np.ndarray] = {}
    for name in (*WIDTHS, "expression"):
        array = arrays.get(name)
        if array is None:
            array = np.zeros((frames, WIDTHS.get(name, 0)), np.float32)
        array = np.ascontiguousarray(array, dtype=np.float32)
        finite = np.isfinite(array)
        if not finite.all():
            frame = int(np.flatnonzero(~finite.all(axis=1))[0])
            raise InputError(f"{label}: {name} has {int((~finite).sum())} NaN/inf values (first at frame {frame})")
        fields[name] = array
    return Motion(fps=float(fps), betas=betas, source=source, **fields)


# ---------------------------------------------------------------------------------------------------- resampling


def resampled_frames(frames: int, fps: float, to_fps: float = 30.0) -> int:
    """How many frames `resample` makes, known before it allocates them."""
    return int(np.floor((frames - 1) * to_fps / fps + 1e-9)) + 1


def resample(motion: Motion, fps: float = 30.0) -> Motion:
    """Retime onto t = 0, 1/fps, ... <= last frame: slerp per joint for rotations, linear for the rest.

    Slerp (with hemisphere alignment) keeps each joint on the shortest arc, so a rotation crossing the ±π
    axis-angle wrap does not spin the long way round as a per-component lerp would.
    """
    from scipy.spatial.transform import Rotation

    if not (np.isfinite(fps) and fps > 0):
        raise InputError(f"resample: fps must be a positive number, got {fps}")
    if fps == motion.fps:
        return motion.slice(None, None)
    frames = motion.frames
    count = resampled_frames(frames, motion.fps, fps)
    position = np.arange(count, dtype=np.float64) * motion.fps / fps  # in input frames
    lower = np.minimum(np.floor(position + 1e-9).astype(np.int64), frames - 1)
    weight = np.clip(position - lower, 0.0, 1.0)
    weight[weight < 1e-9] = 0.0
    upper = np.minimum(lower + 1, frames - 1)
    shared = weight == 0.0  # output times that hit an input frame keep its exact values

    def linear(array: np.ndarray) -> np.ndarray:
        w = weight[:, None]
        out = array[lower].astype(np.float64) * (1.0 - w) + array[upper].astype(np.float64) * w
        out[shared] = array[lower[shared]]
        return out.astype(np.float32)

    rotvecs = np.concatenate([getattr(motion, name) for name in ROTATIONS], axis=1).reshape(frames, -1, 3)
    quats = Rotation.from_rotvec(rotvecs.reshape(-1, 3).astype(np.float64)).as_quat().reshape(frames, -1, 4)
    q0, q1 = quats[lower], quats[upper]
    dot = np.sum(q0 * q1, axis=-1, keepdims=True)
    q1 = np.where(dot < 0.0, -q1, q1)
    dot = np.abs(dot)
    angle = np.arccos(np.clip(dot, -1.0, 1.0))
    sin = np.sin(angle)
    w = weight[:, None, None]
    near = sin < 1e-6  # nearly identical quaternions: lerp is exact enough and avoids 0/0
    safe = np.where(near, 1.0, sin)
    a = np.where(near, 1.0 - w, np.sin((1.0 - w) * angle) / safe)
    b = np.where(near, w, np.sin(w * angle) / safe)
    blended = a * q0 + b * q1
    blended /= np.linalg.norm(blended, axis=-1, keepdims=True)
    out_rot = Rotation.from_quat(blended.reshape(-1, 4)).as_rotvec().reshape(count, -1).astype(np.float32)
    out_rot[shared] = rotvecs.reshape(frames, -1)[lower[shared]]

    fields: dict[str, np.ndarray] = {}
    offset = 0
    for name, width in ROTATIONS.items():
        fields[name] = np.ascontiguousarray(out_rot[:, offset : offset + width])
        offset += width
    fields["transl"] = linear(motion.transl)
    fields["expression"] = linear(motion.expression)
    betas = None if motion.betas is None else motion.betas.copy()
    return replace(motion, fps=float(fps), betas=betas, **fields)


# ---------------------------------------------------------------------------------------------------- pickle
#
# Arrays are rebuilt by our own code, not numpy's: numpy.dtype.__setstate__ trusts the pickled flags, so a crafted
# pickle can strip the "holds objects" flag from an object dtype and have raw bytes read as object pointers.
# Pickled dtypes therefore become _PickledDtype (only kind, size and byte order are kept) and arrays _PickledArray,
# whose __setstate__ checks the state before numpy sees it; _finish turns both into plain numpy afterwards.

_DTYPE_KINDS = "biufcUSO"  # no structured, void or datetime dtypes: motion data never needs them


class _Refused(Exception):
    """Something the allowlist does not admit, named for the message."""


class _Sealed:
    """An allowed function the pickle can call but not alter: BUILD on a bare function could set its attributes."""

    __slots__ = ("_function",)

    def __init__(self, function: Any) -> None:
        object.__setattr__(self, "_function", function)

    def __setattr__(self, name: str, value: Any) -> None:
        raise pickle.UnpicklingError(f"refused to set {name} on an allowed global")

    def __delattr__(self, name: str) -> None:
        raise pickle.UnpicklingError(f"refused to delete {name} from an allowed global")

    def __call__(self, *args: Any) -> Any:
        return self._function(*args)


class _PickledDtype:
    """A numpy.dtype(spec, align, copy) call plus the BUILD state pickled with it, resolved by `dtype()`."""

    __slots__ = ("spec", "byteorder", "size")

    def __init__(self, spec: Any, align: Any = False, copy: Any = True) -> None:
        if not isinstance(spec, str):
            raise _Refused(f"a numpy dtype built from {type(spec).__name__}")
        self.spec, self.byteorder, self.size = spec, "=", -1

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) < 8 or state[0] not in (3, 4):
            raise pickle.UnpicklingError("unknown numpy dtype state")
        _, byteorder, subarray, names, fields, size = state[:6]
        if subarray is not None or names is not None or fields is not None:
            raise _Refused("a structured numpy dtype")
        if byteorder not in ("<", ">", "|", "=") or not isinstance(size, int):
            raise pickle.UnpicklingError("bad numpy dtype state")
        self.byteorder, self.size = byteorder, size

    def dtype(self) -> np.dtype:
        try:
            dtype = np.dtype(self.spec)
        except (TypeError, ValueError) as exc:
            raise pickle.UnpicklingError(f"bad numpy dtype {self.spec!r}") from exc
        if dtype.kind not in _DTYPE_KINDS or dtype.fields is not None or dtype.subdtype is not None:
            raise _Refused(f"a numpy {dtype} array")
        if self.size not in (-1, dtype.itemsize):
            raise pickle.UnpicklingError(f"numpy dtype {self.spec!r} with item size {self.size}")
        return dtype.newbyteorder(self.byteorder) if self.byteorder in "<>" else dtype


def _dtype_of(value: Any) -> np.dtype:
    if not isinstance(value, _PickledDtype):
        raise pickle.UnpicklingError("numpy data without a numpy dtype")
    return value.dtype()


def _shape_of(value: Any) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(isinstance(n, int) and n >= 0 for n in value):
        raise pickle.UnpicklingError("bad numpy shape")
    return value


def _py2_bytes(data: Any) -> Any:
    """Python 2 pickled array data as str, which the latin1 encoding maps back to the original bytes."""
    return data.encode("latin1") if isinstance(data, str) else data


class _PickledArray(np.ndarray):
    """What numpy's _reconstruct returns here; its BUILD state is checked, then numpy fills it in."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise pickle.UnpicklingError("unknown numpy array state")
        shape, dtype, fortran, data = state[-4:]
        dtype = _dtype_of(dtype)
        if not dtype.hasobject:
            data = _py2_bytes(data)
        if not isinstance(data, list if dtype.hasobject else bytes | bytearray):
            raise pickle.UnpicklingError(f"numpy {dtype} data stored as {type(data).__name__}")
        shape = _shape_of(shape)
        count = math.prod(shape)
        if len(data) != (count if dtype.hasobject else count * dtype.itemsize):  # before numpy allocates the shape
            raise pickle.UnpicklingError(f"numpy array of shape {shape} with {len(data)} data items")
        super().__setstate__((shape, dtype, bool(fortran), data))


def _np_reconstruct(subtype: Any, shape: Any, typecode: Any) -> np.ndarray:
    if subtype is not _NDARRAY:
        raise pickle.UnpicklingError("numpy _reconstruct of something other than ndarray")
    return np.ndarray.__new__(_PickledArray, (0,), np.uint8)


def _np_scalar(dtype: Any, data: Any = None) -> Any:
    dtype = _dtype_of(dtype)
    if dtype.hasobject:
        return data  # numpy pickles an object scalar as the object itself
    data = _py2_bytes(data)
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise pickle.UnpicklingError(f"numpy {dtype} scalar from {type(data).__name__}")
    return np.frombuffer(data, dtype)[0]


def _np_frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    dtype = _dtype_of(dtype)
    if dtype.hasobject or not isinstance(buffer, bytes | bytearray) or order not in ("C", "F"):
        raise pickle.UnpicklingError(f"numpy {dtype} array from {type(buffer).__name__}")
    return np.frombuffer(buffer, dtype).reshape(_shape_of(shape), order=order).copy(order="K")


def _not_callable(*_: Any) -> None:
    raise pickle.UnpicklingError("numpy.ndarray is only allowed as _reconstruct's subtype")


_NDARRAY = _Sealed(_not_callable)


def _encode_latin1(text: Any, encoding: Any = "latin1") -> bytes:
    """Protocol-2 pickles spell bytes as _codecs.encode(text, 'latin1'); no other codec is needed or admitted."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r}")
    return text.encode("latin1")


def _storage_from_bytes(data: Any) -> Any:
    """torch.storage._load_from_bytes calls torch.load(weights_only=False); use torch's own safe loader instead."""
    import torch

    if not isinstance(data, bytes | bytearray):
        raise pickle.UnpicklingError("tensor storage is not bytes")
    try:
        return torch.load(io.BytesIO(bytes(data)), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:  # torch names the blocked global inside a paragraph of advice
        blocked = re.search(r"GLOBAL (\S+)", str(exc))
        raise _Refused(f"{blocked.group(1) if blocked else 'a global'} inside a tensor's storage") from exc


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> np.ndarray:
    """Grad flags, hooks and metadata are dropped: only the values matter for a motion."""
    import torch
    from torch._utils import _rebuild_tensor as rebuild

    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError("tensor data is not a torch storage")
    tensor = rebuild(storage, offset, tuple(size), tuple(stride)).detach()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16
        tensor = tensor.float()
    return tensor.numpy().copy()


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    return data


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """Classes listed here are immutable C types; functions are sealed."""
    import builtins
    import collections

    functions: dict[tuple[str, str], Any] = {
        ("numpy", "dtype"): _PickledDtype,
        ("_codecs", "encode"): _encode_latin1,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    }
    for core in ("numpy.core", "numpy._core"):  # numpy 1 and numpy 2 spell the module differently
        functions[(f"{core}.multiarray", "_reconstruct")] = _np_reconstruct
        functions[(f"{core}.multiarray", "scalar")] = _np_scalar
        functions[(f"{core}.numeric", "_frombuffer")] = _np_frombuffer  # protocol 5 arrays
    allowed: dict[tuple[str, str], Any] = {key: _Sealed(function) for key, function in functions.items()}
    allowed[("numpy", "ndarray")] = _NDARRAY
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    for name in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "bool", "str", "bytes"):
        allowed[("builtins", name)] = getattr(builtins, name)
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves globals from a fixed table, never by import, so a pickle cannot name anything that runs code."""

    def __init__(self, file: Any) -> None:
        super().__init__(file, encoding="latin1")  # latin1 lets Python 2 era numpy pickles load
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        if module == "__builtin__":  # protocol < 3 writes the Python 2 name
            module = "builtins"
        found = self._allowed.get((module, name))
        if found is None:
            raise _Refused(f"{module}.{name}")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("a persistent reference (torch.save files are not motion pickles)")


def _finish(value: Any, done: dict[int, Any]) -> Any:
    """Swap our stand-ins for plain numpy everywhere in the loaded tree (shared and cyclic parts included)."""
    key = id(value)
    if key in done:
        return done[key]
    if isinstance(value, _PickledDtype):
        done[key] = value.dtype()
    elif isinstance(value, np.ndarray):
        array = done[key] = value.view(np.ndarray)
        if array.dtype.hasobject:
            for index in np.ndindex(array.shape):
                array[index] = _finish(array[index], done)
    elif isinstance(value, dict):
        done[key] = value
        for item in list(value):
            value[item] = _finish(value[item], done)
    elif isinstance(value, list):
        done[key] = value
        value[:] = [_finish(item, done) for item in value]
    elif isinstance(value, tuple | set | frozenset):
        done[key] = value  # a cycle back into this tuple keeps the original; pickles of motion data have none
        done[key] = type(value)(_finish(item, done) for item in value)
    else:
        return value
    return done[key]


def load_pickle_restricted(path: Path) -> Any:
    """Unpickle data files from other tools (SHOW) without letting the file run code; tensors come back as numpy."""
    path = Path(path)
    try:
        with path.open("rb") as file:
            return _finish(_RestrictedUnpickler(file).load(), {})
    except InputError:
        raise
    except _Refused as exc:
        raise InputError(f"{path.name}: refused to unpickle {exc}: {_ALLOWED_TEXT}") from exc
    except OSError as exc:
        raise InputError(f"{path.name}: cannot read ({exc})") from exc
    except Exception as exc:  # a corrupt pickle can fail in many ways; all mean the same to the user
        detail = " ".join(str(exc).split())[:200]
        raise InputError(f"{path.name}: not a readable pickle ({type(exc).__name__}: {detail})") from exc
