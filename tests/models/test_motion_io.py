"""Unit tests of models/motion_io.py: every format on synthetic files, resampling, and the restricted unpickler."""

from __future__ import annotations

import io
import json
import os
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy.spatial.transform import Rotation

from core.errors import InputError
from models.motion_io import WIDTHS, Motion, load_pickle_restricted, read_motion, resample

# A distinct constant per block, so a block that lands in the wrong attribute is caught.
MARK = {
    "global_orient": 0.1,
    "body_pose": 0.2,
    "jaw_pose": 0.3,
    "leye_pose": 0.4,
    "reye_pose": 0.5,
    "left_hand_pose": 0.6,
    "right_hand_pose": 0.7,
    "transl": 0.8,
    "expression": 0.9,
}


def packed(frames: int, layout: list[tuple[str, int]]) -> np.ndarray:
    return np.concatenate([np.full((frames, width), MARK[name], np.float32) for name, width in layout], axis=1)


def assert_marks(motion: Motion, names: list[str], zero: tuple[str, ...] = ()) -> None:
    for name in names:
        np.testing.assert_array_equal(getattr(motion, name), np.float32(MARK[name]), err_msg=name)
    for name in zero:
        assert not getattr(motion, name).any(), name
    for name, width in WIDTHS.items():
        assert getattr(motion, name).shape == (motion.frames, width), name
        assert getattr(motion, name).dtype == np.float32, name


def error(path: Path, **kwargs: object) -> str:
    with pytest.raises(InputError) as info:
        read_motion(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


SMPLX = [
    ("global_orient", 3),
    ("body_pose", 63),
    ("jaw_pose", 3),
    ("leye_pose", 3),
    ("reye_pose", 3),
    ("left_hand_pose", 45),
    ("right_hand_pose", 45),
]
ALL_ROT = [name for name, _ in SMPLX]


# ---------------------------------------------------------------------------------------------------- npz


def test_amass_smplx_npz_blocks_betas_expressions_and_fps(tmp_path: Path) -> None:
    path = tmp_path / "motion.npz"
    np.savez(
        path,
        poses=packed(12, SMPLX),
        trans=np.full((12, 3), MARK["transl"]),
        betas=np.arange(16, dtype=np.float64),
        expressions=np.full((12, 50), MARK["expression"]),
        mocap_frame_rate=np.array(120.0),
        gender=np.array("neutral"),
    )
    motion = read_motion(path)
    assert (motion.source, motion.frames, motion.fps) == ("amass-npz", 12, 120.0)
    assert_marks(motion, [*ALL_ROT, "transl", "expression"])
    assert motion.expression.shape == (12, 50)
    np.testing.assert_array_equal(motion.betas, np.arange(16))


@pytest.mark.parametrize("key", ["mocap_framerate", "fps"])
def test_npz_fps_keys_and_default(tmp_path: Path, key: str) -> None:
    np.savez(tmp_path / "a.npz", poses=packed(3, SMPLX), trans=np.zeros((3, 3)), **{key: np.array(59.94)})
    assert read_motion(tmp_path / "a.npz").fps == pytest.approx(59.94)
    np.savez(tmp_path / "b.npz", poses=packed(3, SMPLX), trans=np.zeros((3, 3)))
    motion = read_motion(tmp_path / "b.npz", default_fps=25.0)
    assert motion.fps == 25.0 and motion.betas is None and motion.expression.shape == (3, 0)


def test_smplh_npz_has_zero_jaw_and_eyes(tmp_path: Path) -> None:
    layout = [("global_orient", 3), ("body_pose", 63), ("left_hand_pose", 45), ("right_hand_pose", 45)]
    np.savez(tmp_path / "h.npz", poses=packed(4, layout), trans=np.zeros((4, 3)), mocap_framerate=np.array(60.0))
    motion = read_motion(tmp_path / "h.npz")
    assert_marks(motion, ["global_orient", "body_pose", "left_hand_pose", "right_hand_pose"], zero=("jaw_pose",))
    assert not motion.leye_pose.any() and not motion.reye_pose.any()


def test_npz_wrong_shape_names_expected_layout(tmp_path: Path) -> None:
    np.savez(tmp_path / "motion.npz", poses=np.zeros((120, 99)), trans=np.zeros((120, 3)))
    assert error(tmp_path / "motion.npz") == (
        "motion.npz: poses has shape (120, 99); expected (T, 165) SMPL-X poses [global 3, body 63, jaw 3, leye 3, "
        "reye 3, left hand 45, right hand 45] or (T, 156) SMPL-H"
    )


def test_npz_missing_keys_mismatched_frames_empty_and_nan(tmp_path: Path) -> None:
    np.savez(tmp_path / "k.npz", pose=np.zeros((3, 165)))
    assert "no poses and trans (has pose)" in error(tmp_path / "k.npz")
    np.savez(tmp_path / "t.npz", poses=np.zeros((5, 165)), trans=np.zeros((4, 3)))
    assert error(tmp_path / "t.npz") == "t.npz: transl has 4 frames but global_orient has 5"
    np.savez(tmp_path / "e.npz", poses=np.zeros((0, 165)), trans=np.zeros((0, 3)))
    assert "0 frames" in error(tmp_path / "e.npz")
    poses = np.zeros((5, 165))
    poses[3, 10] = np.nan
    np.savez(tmp_path / "n.npz", poses=poses, trans=np.zeros((5, 3)))
    assert error(tmp_path / "n.npz") == "n.npz: body_pose has 1 NaN/inf values (first at frame 3)"


def test_npz_needing_pickle_is_refused(tmp_path: Path) -> None:
    poses = np.empty(2, dtype=object)
    poses[:] = [np.zeros(165), np.zeros(165)]
    np.savez(tmp_path / "obj.npz", poses=poses, trans=np.zeros((2, 3)))
    assert "pickled object array; refusing allow_pickle" in error(tmp_path / "obj.npz")


# ---------------------------------------------------------------------------------------------------- npy


def test_talkshow_npy_layout(tmp_path: Path) -> None:
    layout = [
        ("jaw_pose", 3),
        ("leye_pose", 3),
        ("reye_pose", 3),
        ("global_orient", 3),
        ("body_pose", 63),
        ("left_hand_pose", 45),
        ("right_hand_pose", 45),
        ("expression", 100),
    ]
    np.save(tmp_path / "talk.npy", packed(7, layout))
    motion = read_motion(tmp_path / "talk.npy")
    assert (motion.source, motion.frames, motion.fps, motion.betas) == ("talkshow-npy", 7, 30.0, None)
    assert_marks(motion, [*ALL_ROT, "expression"], zero=("transl",))
    assert motion.expression.shape == (7, 100)


def test_talkshow_wrong_width(tmp_path: Path) -> None:
    np.save(tmp_path / "talk.npy", np.zeros((7, 165)))
    assert error(tmp_path / "talk.npy") == (
        "talk.npy: array has shape (7, 165); expected (T, 265) TalkSHOW [jaw 3, leye 3, reye 3, global 3, body 63, "
        "left hand 45, right hand 45, expression 100]"
    )


# ---------------------------------------------------------------------------------------------------- pkl


def show_dict(frames: int) -> dict[str, object]:
    data: dict[str, object] = {name: np.full((frames, width), MARK[name], np.float32) for name, width in SMPLX}
    data["body_pose"] = np.full((frames, 21, 3), MARK["body_pose"], np.float32)
    data["transl"] = np.full((frames, 3), MARK["transl"])
    data["expression"] = np.full((frames, 10), MARK["expression"])
    data["betas"] = np.ones((1, 300), np.float32)
    return data


def test_show_pkl_dict_and_frame_list(tmp_path: Path) -> None:
    data = show_dict(6)
    data["fps"] = 25
    (tmp_path / "show.pkl").write_bytes(pickle.dumps(data))
    motion = read_motion(tmp_path / "show.pkl")
    assert (motion.source, motion.frames, motion.fps) == ("show-pkl", 6, 25.0)
    assert_marks(motion, [*ALL_ROT, "transl", "expression"])
    assert motion.betas.shape == (300,)

    per_frame = [{k: v[i : i + 1] for k, v in show_dict(3).items()} for i in range(3)]
    for frame in per_frame:
        frame.update(betas=np.ones((1, 300), np.float32), img="0.png")
    (tmp_path / "frames.pkl").write_bytes(pickle.dumps(per_frame, protocol=2))
    motion = read_motion(tmp_path / "frames.pkl")
    assert motion.frames == 3 and motion.fps == 30.0 and motion.betas.shape == (300,)
    assert_marks(motion, [*ALL_ROT, "transl", "expression"])


def test_show_pkl_optional_keys_become_zeros(tmp_path: Path) -> None:
    data = {"global_orient": np.full((4, 3), 0.1), "body_pose": np.full((4, 63), 0.2), "camera": "ignored"}
    (tmp_path / "min.pkl").write_bytes(pickle.dumps(data))
    motion = read_motion(tmp_path / "min.pkl")
    assert_marks(motion, ["global_orient", "body_pose"], zero=("transl", "jaw_pose", "left_hand_pose"))
    assert motion.expression.shape == (4, 0) and motion.betas is None


def test_show_pkl_refuses_pca_hands_without_a_body_model_and_a_missing_body(tmp_path: Path) -> None:
    data = show_dict(4)
    data["left_hand_pose"] = np.zeros((4, 12))
    (tmp_path / "pca.pkl").write_bytes(pickle.dumps(data))
    message = error(tmp_path / "pca.pkl")
    assert "left_hand_pose has 12 values per frame" in message
    assert "PCA coefficients (at most 45) with a body model's hand components" in message
    (tmp_path / "nobody.pkl").write_bytes(pickle.dumps({"global_orient": np.zeros((4, 3))}))
    assert error(tmp_path / "nobody.pkl").startswith("nobody.pkl: no body_pose (has global_orient); expected a dict")


# ---------------------------------------------------------------------------------------------------- parquet


def write_fit(directory: Path, clips: dict[str, list[int]], expression: int = 10) -> Path:
    rows: dict[str, list] = {name: [] for name in ("clip", "frame", *WIDTHS, "expression", "split")}
    for clip, frames in clips.items():
        for frame in frames:
            rows["clip"].append(clip)
            rows["frame"].append(frame)
            rows["split"].append("train")
            for name, width in WIDTHS.items():
                rows[name].append([MARK[name] + frame] * width)  # frame-dependent so ordering is checked
            rows["expression"].append([MARK["expression"]] * expression)
    floats = pa.list_(pa.float32())
    schema = pa.schema(
        [("clip", pa.string()), ("frame", pa.int32()), ("split", pa.string())]
        + [(name, floats) for name in (*WIDTHS, "expression")]
    )
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows, schema=schema), directory / "params.parquet")
    return directory


def test_fit_parquet_orders_frames_and_reads_identity_betas(tmp_path: Path) -> None:
    fit = write_fit(tmp_path / "smplx_fit", {"b": [1, 0], "a": [2, 0, 1]})
    (fit / "identity.json").write_text(json.dumps({"betas": [0.5] * 10}))
    motion = read_motion(fit / "params.parquet")
    assert (motion.source, motion.frames, motion.fps) == ("anchor-fit", 5, 30.0)
    np.testing.assert_allclose(motion.body_pose[:, 0], np.float32([0.2, 1.2, 2.2, 0.2, 1.2]))  # a0 a1 a2 b0 b1
    np.testing.assert_array_equal(motion.betas, np.full(10, 0.5, np.float32))
    clip_b = read_motion(fit, clip="b")
    assert clip_b.frames == 2
    np.testing.assert_allclose(clip_b.transl[:, 2], np.float32([0.8, 1.8]))
    np.testing.assert_allclose(clip_b.expression, np.float32(0.9))
    np.testing.assert_allclose(clip_b.reye_pose, np.float32([[0.5] * 3, [1.5] * 3]))


def test_fit_parquet_errors(tmp_path: Path) -> None:
    fit = write_fit(tmp_path / "fit", {"a": [0, 1]})
    assert error(fit, clip="zz") == "fit/params.parquet: no clip 'zz'; available clips: a"
    assert read_motion(fit).betas is None
    assert "has no params.parquet" in error(tmp_path)
    table = pq.read_table(fit / "params.parquet").drop(["jaw_pose"])
    pq.write_table(table, tmp_path / "bad.parquet")
    assert error(tmp_path / "bad.parquet").startswith("bad.parquet: no column jaw_pose; expected smplx_fit params")


# ---------------------------------------------------------------------------------------------------- dispatch


def test_unsupported_suffix_names_formats_and_video_route(tmp_path: Path) -> None:
    (tmp_path / "clip.mp4").write_bytes(b"\0")
    message = error(tmp_path / "clip.mp4")
    assert message.startswith("clip.mp4: unsupported motion file; supported: .npz")
    assert ".npy (TalkSHOW)" in message and ".pkl (SHOW)" in message and ".parquet" in message
    assert "a video goes through ingest → keypoints → smplx_fit" in message
    assert "no such motion file" in error(tmp_path / "missing.npz")


def test_slice_copies(tmp_path: Path) -> None:
    np.savez(tmp_path / "m.npz", poses=packed(10, SMPLX), trans=np.zeros((10, 3)))
    motion = read_motion(tmp_path / "m.npz")
    part = motion.slice(2, 5)
    assert part.frames == 3 and part.expression.shape == (3, 0)
    part.body_pose[:] = 9
    assert motion.body_pose.max() < 1
    with pytest.raises(InputError):
        motion.slice(10, 12)


# ---------------------------------------------------------------------------------------------------- resample


def motion_from(fps: float, rotvec: np.ndarray, transl: np.ndarray) -> Motion:
    frames = len(rotvec)
    fields = {name: np.zeros((frames, width), np.float32) for name, width in WIDTHS.items()}
    fields["global_orient"] = rotvec.astype(np.float32)
    fields["left_hand_pose"] = np.tile(rotvec, 15).astype(np.float32)
    fields["transl"] = transl.astype(np.float32)
    return Motion(fps=fps, expression=np.zeros((frames, 2), np.float32), betas=None, source="test", **fields)


def test_resample_60_to_30_halves_frames_exactly() -> None:
    rng = np.random.default_rng(0)
    motion = motion_from(60.0, rng.uniform(-2, 2, (120, 3)), rng.normal(size=(120, 3)))
    out = resample(motion, 30.0)
    assert out.frames == 60 and out.fps == 30.0
    for name in ("global_orient", "left_hand_pose", "transl", "expression"):
        np.testing.assert_array_equal(getattr(out, name), getattr(motion, name)[::2])


def test_resample_25_to_30_constant_angular_velocity_is_exact() -> None:
    times = np.arange(50) / 25.0
    angle = 1.3 * times - 1.0  # rad/s about a fixed axis
    axis = np.array([0.6, 0.0, 0.8])
    out = resample(motion_from(25.0, angle[:, None] * axis, times[:, None] * [1.0, 2.0, 3.0]), 30.0)
    out_times = np.arange(out.frames) / 30.0
    assert out.frames == 59 and out_times[-1] <= times[-1]
    np.testing.assert_allclose(out.global_orient, (1.3 * out_times - 1.0)[:, None] * axis, atol=1e-5)
    np.testing.assert_allclose(out.left_hand_pose[:, 42:], out.global_orient, atol=1e-6)
    np.testing.assert_allclose(out.transl, out_times[:, None] * [1.0, 2.0, 3.0], atol=1e-5)


def test_resample_slerp_takes_short_way_across_pi_and_same_fps_copies() -> None:
    motion = motion_from(1.0, np.array([[0, 0, 3.0], [0, 0, -3.0]]), np.zeros((2, 3)))
    middle = resample(motion, 2.0).global_orient[1]
    assert abs(np.linalg.norm(middle) - np.pi) < 1e-5  # the long way would pass through identity
    assert Rotation.from_rotvec(middle).magnitude() == pytest.approx(np.pi, abs=1e-5)
    same = resample(motion, 1.0)
    assert same is not motion and same.global_orient is not motion.global_orient
    np.testing.assert_array_equal(same.global_orient, motion.global_orient)


# ---------------------------------------------------------------------------------------------------- pickle


class Payload:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.target}",)


def test_restricted_pickle_accepts_arrays_and_containers(tmp_path: Path) -> None:
    data = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": [1, (2.5, "x"), {"c": np.float64(3)}],
        "d": OrderedDict(e=np.array([True])),
        "f": {1, 2},
    }
    for protocol in (2, 4, 5):
        (tmp_path / "ok.pkl").write_bytes(pickle.dumps(data, protocol=protocol))
        loaded = load_pickle_restricted(tmp_path / "ok.pkl")
        np.testing.assert_array_equal(loaded["a"], data["a"])
        assert loaded["b"] == data["b"] and loaded["f"] == {1, 2}
        assert loaded["d"]["e"].tolist() == [True]


def test_restricted_pickle_turns_tensors_into_numpy(tmp_path: Path) -> None:
    import torch

    data = {"t": torch.arange(6, dtype=torch.float64).reshape(2, 3)[:, 1:], "p": torch.nn.Parameter(torch.ones(2))}
    (tmp_path / "t.pkl").write_bytes(pickle.dumps(data))
    loaded = load_pickle_restricted(tmp_path / "t.pkl")
    np.testing.assert_array_equal(loaded["t"], [[1, 2], [4, 5]])
    np.testing.assert_array_equal(loaded["p"], [1, 1])


def test_restricted_pickle_refuses_code_without_running_it(tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"poses": Payload(target)}))
    with pytest.raises(InputError) as info:
        load_pickle_restricted(tmp_path / "evil.pkl")
    assert not target.exists()
    assert str(info.value) == (
        f"evil.pkl: refused to unpickle {os.system.__module__}.system: only numpy arrays, tensors and plain containers "
        "are allowed"
    )
    with pytest.raises(InputError, match="refused to unpickle builtins.eval"):
        (tmp_path / "eval.pkl").write_bytes(b"cbuiltins\neval\n(S'1'\ntR.")
        load_pickle_restricted(tmp_path / "eval.pkl")
    with pytest.raises(InputError, match="refused to unpickle tests.models.test_motion_io.Payload"):
        (tmp_path / "cls.pkl").write_bytes(pickle.dumps(Payload))
        load_pickle_restricted(tmp_path / "cls.pkl")
    with pytest.raises(InputError, match="refused to unpickle a persistent reference"):
        (tmp_path / "pid.pkl").write_bytes(b"(S'storage'\nP0\n.")
        load_pickle_restricted(tmp_path / "pid.pkl")


def test_restricted_pickle_refuses_code_hidden_in_tensor_storage(tmp_path: Path) -> None:
    import torch

    target = tmp_path / "pwned"
    storage = io.BytesIO()
    torch.save(Payload(target), storage)

    class Storage:
        def __reduce__(self) -> tuple:
            return torch.storage._load_from_bytes, (storage.getvalue(),)

    class Tensor:
        def __reduce__(self) -> tuple:
            return torch._utils._rebuild_tensor_v2, (Storage(), 0, (1,), (1,), False, OrderedDict())

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"body_pose": Tensor()}))
    with pytest.raises(InputError) as info:
        load_pickle_restricted(tmp_path / "evil.pkl")
    assert not target.exists()
    assert str(info.value) == (
        f"evil.pkl: refused to unpickle {os.system.__module__}.system inside a tensor's storage: only numpy arrays, "
        "tensors and plain containers are allowed"
    )


def test_restricted_pickle_reads_numpy2_names(tmp_path: Path) -> None:
    data = pickle.dumps(np.arange(3.0), protocol=2)
    assert b"numpy.core.multiarray" in data
    (tmp_path / "np2.pkl").write_bytes(data.replace(b"numpy.core.multiarray", b"numpy._core.multiarray"))
    np.testing.assert_array_equal(load_pickle_restricted(tmp_path / "np2.pkl"), [0.0, 1.0, 2.0])


def test_restricted_pickle_cannot_alter_allowed_functions(tmp_path: Path) -> None:
    from models import motion_io

    # GLOBAL numpy.core.numeric._frombuffer, then BUILD {'x': 1} on it
    (tmp_path / "build.pkl").write_bytes(b"cnumpy.core.numeric\n_frombuffer\n(dS'x'\nI1\nsb.")
    with pytest.raises(InputError, match="not a readable pickle"):
        load_pickle_restricted(tmp_path / "build.pkl")
    assert not hasattr(motion_io._np_frombuffer, "x")


def test_restricted_pickle_refuses_forged_object_dtype(tmp_path: Path) -> None:
    # An int64 array re-labelled as object dtype: numpy alone would read the raw bytes as object pointers.
    raw = pickle.dumps(np.arange(2, dtype=np.int64), protocol=0)
    assert b"Vi8" in raw
    (tmp_path / "forged.pkl").write_bytes(raw.replace(b"Vi8", b"VO8"))
    with pytest.raises(InputError, match="numpy object data stored as bytes"):
        load_pickle_restricted(tmp_path / "forged.pkl")
    (tmp_path / "struct.pkl").write_bytes(pickle.dumps(np.zeros(2, [("a", "f4")])))
    with pytest.raises(InputError, match="refused to unpickle a structured numpy dtype"):
        load_pickle_restricted(tmp_path / "struct.pkl")


def test_restricted_pickle_matches_numpy_for_plain_data(tmp_path: Path) -> None:
    objects = np.empty(2, object)
    objects[:] = [np.ones(2, ">f8"), {"k": [np.int16(3)]}]
    shared = np.arange(4.0)
    data = {
        "be": np.arange(3, dtype=">i4"),
        "u": np.array(["ab", "c"]),
        "s": np.array([b"x"]),
        "obj": objects,
        "c": np.array([1 + 2j], np.complex64),
        "z": np.array(5.0),
        "f": np.asfortranarray(np.eye(2, 3)),
        "sc": [np.float32(1.5), np.int64(7), np.bool_(True), np.str_("hi")],
        "shared": (shared, shared),
    }
    for protocol in range(6):
        raw = pickle.dumps(data, protocol=protocol)
        (tmp_path / "d.pkl").write_bytes(raw)
        loaded, expected = load_pickle_restricted(tmp_path / "d.pkl"), pickle.loads(raw)
        for key in ("be", "u", "s", "c", "z", "f"):
            assert type(loaded[key]) is np.ndarray and loaded[key].dtype == expected[key].dtype, (protocol, key)
            np.testing.assert_array_equal(loaded[key], expected[key])
        assert type(loaded["obj"][0]) is np.ndarray and loaded["obj"][1] == {"k": [3]}
        assert loaded["sc"] == expected["sc"] and [type(x) for x in loaded["sc"]] == [type(x) for x in expected["sc"]]
        assert loaded["shared"][0] is loaded["shared"][1]
