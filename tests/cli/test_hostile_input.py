"""Hostile or absurd input: each is one line on stderr, a non-zero exit, and nothing written."""

from __future__ import annotations

import errno
import pickle
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from core.errors import StageError
from tests.conftest import ONBOARDED_ID, anchor, cli, copy_workspace

ID = ONBOARDED_ID
slow = pytest.mark.slow  # on an onboarded identity


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory, onboarded: Path) -> Path:
    return copy_workspace(onboarded, tmp_path_factory.mktemp("hostile") / "ws", {"motion": {"max_frames": 900}})


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")
            if p.is_file() and ".anchor" not in p.relative_to(root).parts}


def _refused(root: Path, proc, *needles: str) -> None:  # noqa: ANN001 - a CompletedProcess
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode != 0, proc.stdout
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def _amass(path: Path, frames: int, fps: float) -> Path:
    np.savez(path, poses=np.zeros((frames, 165), np.float32), trans=np.zeros((frames, 3), np.float32),
             mocap_frame_rate=np.array(fps))
    return path


@slow
def test_a_motion_at_an_impossible_frame_rate(ws: Path, tmp_path: Path) -> None:
    from core.errors import AnchorError
    from flows.motion import import_motion

    before = _files(ws)
    out = tmp_path / "out.parquet"
    proc = cli(ws, "motion", "import", str(_amass(tmp_path / "m.npz", 40, 1e-6)), "--identity", ID, "--out", str(out))
    _refused(ws, proc, "frame rate")  # as the command line says it
    for fps in (0.0, -30.0, 1e6):  # the same check, without a process each
        with pytest.raises(AnchorError, match="frame rate"):
            import_motion.fn(str(ws), ID, str(_amass(tmp_path / f"m{fps}.npz", 40, fps)), str(out))
    assert not out.exists() and _files(ws) == before


@slow
def test_a_motion_longer_than_a_render_may_be(ws: Path, tmp_path: Path) -> None:
    before = _files(ws)
    proc = anchor(ws, "motion", "import", str(_amass(tmp_path / "long.npz", 2000, 60.0)), "--identity", ID, "--out",
                  str(tmp_path / "out.parquet"))  # 2000 frames at 60 fps: 1000 at 30, more than the 900 allowed
    _refused(ws, proc, "more than motion.max_frames = 900")
    assert _files(ws) == before


@slow
def test_an_npz_whose_header_claims_gigabytes(ws: Path, tmp_path: Path) -> None:
    path = tmp_path / "huge.npz"
    header = {"descr": "<f4", "fortran_order": False, "shape": (50_000_000, 165)}  # 33 GB said, a few bytes given
    with zipfile.ZipFile(path, "w") as archive:
        for name in ("poses", "trans"):
            with archive.open(f"{name}.npy", "w") as member:
                np.lib.format.write_array_header_1_0(member, header)
                member.write(b"\0" * 64)
    proc = anchor(ws, "motion", "import", str(path), "--identity", ID, "--out", str(tmp_path / "o.parquet"))
    _refused(ws, proc, "claims", "GiB", "not a motion file")


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - what a malicious pickle does
        return (Path.write_text, (self.marker, "ran"))


@slow
def test_a_body_model_pickle_carrying_code_is_refused_unrun(ws: Path, tmp_path: Path) -> None:
    from tasks import body_file
    from tasks.stages.smplx_fit import SmplxFitParams  # noqa: F401 - the stage that would load it

    marker = tmp_path / "pwned"
    folder = tmp_path / "smplx"
    folder.mkdir()
    (folder / "SMPLX_NEUTRAL.pkl").write_bytes(pickle.dumps({"v_template": _Payload(marker)}))
    w = copy_workspace(ws, tmp_path / "ws")
    params = yaml.safe_load((w / "params.yaml").read_text())
    params["body_model"]["path"] = str(folder)
    (w / "params.yaml").write_text(yaml.safe_dump(params))
    before = _files(w)
    proc = anchor(w, "stage", "run", "smplx_fit", ID)
    _refused(w, proc, "refused to unpickle", "use the SMPL-X .npz files")
    assert not marker.exists() and _files(w) == before
    # an .npz holding a pickled object is refused the same way; one of plain arrays is taken as it is
    bad = tmp_path / "bad" / "SMPLX_NEUTRAL.npz"
    bad.parent.mkdir()
    np.savez(bad, v_template=np.array([_Payload(marker)], dtype=object))
    with pytest.raises(StageError, match="holds a pickled object array"):
        body_file.safe(bad, tmp_path / "cache")
    assert not marker.exists()
    # one emptied or cut short is one line saying so, not a traceback
    whole = _mannequin(w).read_bytes()
    for name, spoilt in (("empty", b""), ("cut", whole[: len(whole) // 2])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "SMPLX_NEUTRAL.npz").write_bytes(spoilt)
        with pytest.raises(StageError, match="not a readable SMPL-X .npz"):
            body_file.safe(tmp_path / name / "SMPLX_NEUTRAL.npz", tmp_path / "cache")
    # a pickle of plain arrays (what a real SMPL-X .pkl is) becomes a plain .npz, the same bytes every time
    plain = tmp_path / "plain.pkl"
    with np.load(_mannequin(w)) as model:
        plain.write_bytes(pickle.dumps({k: model[k] for k in model.files}))
    first = body_file.safe(plain, tmp_path / "cache")
    assert first.suffix == ".npz" and first.read_bytes() == body_file.safe(plain, tmp_path / "cache2").read_bytes()
    from models import body

    assert body.load(first).faces.shape == (20908, 3)


def _mannequin(root: Path) -> Path:
    return next((root / ".anchor" / "body_models").glob("mannequin-*/SMPLX_NEUTRAL.npz"))


@slow
def test_paths_named_like_rich_markup_are_printed_as_they_are(ws: Path, tmp_path: Path) -> None:
    motion = _amass(tmp_path / "take [2] [bold]x.npz", 40, 30.0)
    out = tmp_path / "interview [take2] [red]y.parquet"
    done = anchor(ws, "motion", "import", str(motion), "--identity", ID, "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout and out.is_file()
    missing = anchor(ws, "onboard", ID, "--video", str(tmp_path / "gone [take3] [bold]z.mp4"))
    _refused(ws, missing, "gone [take3] [bold]z.mp4: no such file")


@slow
def test_an_unexpected_exception_is_one_line_naming_its_log(ws: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from cli import main
    from flows import versions

    def boom(*_: object, **__: object) -> None:
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(versions, "status", boom)
    monkeypatch.setattr(sys, "argv", ["anchor", "-w", str(ws), "status"])
    with pytest.raises(SystemExit) as exit_info:
        main.main()
    assert exit_info.value.code == 1
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: unexpected RuntimeError: disk on fire (full traceback in ")
    log = Path(lines[0].rsplit("full traceback in ", 1)[1].rstrip(")"))
    assert log.parent == ws / ".anchor" / "logs" and "Traceback" in log.read_text() and "boom" in log.read_text()


def test_a_full_disk_is_not_retried_as_transient() -> None:
    from flows.execution import is_transient

    assert not is_transient(OSError(errno.ENOSPC, "No space left on device"))
    assert is_transient(OSError(errno.EIO, "I/O error")) and is_transient(TimeoutError())
    assert not is_transient(FileNotFoundError(errno.ENOENT, "no such file"))


@slow
def test_cuda_on_a_machine_without_it_is_one_line_before_any_work(ws: Path, tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    w = copy_workspace(ws, tmp_path / "ws", {"execution": {"device": "cuda"}})
    before = _files(w)
    _refused(w, anchor(w, "finetune", ID), "execution.device = 'cuda'", "no CUDA device")
    assert _files(w) == before
    for bench in (("render", "--profile", "sd15-shapes", "--device", "cuda:1"),
                  ("render", "--profile", "tiny", "--device", "cuda"),
                  ("render", "--profile", "cpu", "--device", "cuda"),
                  ("train", "--profile", "tiny", "--device", "cuda"),
                  ("train", "--profile", "sd15-shapes", "--device", "cuda:0")):
        _refused(w, anchor(w, "bench", *bench, "--json"), f"device '{bench[-1]}'", "no CUDA device")
