"""Shared fixtures: temporary workspaces, short real clips, one Prefect test database for the session."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TESTDATA = ROOT / "../shared/testdata"

# Prefect reads its settings at import: keep everything it writes out of the repository and the user's home. Each
# pytest-xdist worker gets its own (it inherits the controller's environment, which loaded this file first), so two
# workers' command-line runs never share one embedded Prefect database.
_SCRATCH: list[str] = []  # this process's own temporary homes, removed when its session ends


def _scratch(prefix: str) -> str:
    _SCRATCH.append(tempfile.mkdtemp(prefix=prefix))
    return _SCRATCH[-1]


if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["PREFECT_HOME"] = _scratch(f"anchor-test-prefect-{os.environ['PYTEST_XDIST_WORKER']}-")
    # one compute thread per worker (and per command it starts): two workers on two cores each spinning two OpenMP
    # threads made every torch-heavy test three times slower, not two
    for _threads in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[_threads] = "1"
else:
    os.environ.setdefault("PREFECT_HOME", _scratch("anchor-test-prefect-"))
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")
os.environ.pop("ANCHOR_WORKSPACE", None)
os.environ["ANCHOR_CACHE_HOME"] = _scratch("anchor-test-cache-")  # Prefect's records, per user
os.environ["ANCHOR_CHECK_CONTRACT"] = "1"  # every stage a test runs reads and writes only what it declares

TEST_PARAMS = {"profile": "tiny", "ingest": {"resolution": 128, "clip_frames": 45}, "matting": {"workers": 1},
               "keypoints": {"workers": 1}, "follow": {"max_frames": 8}}


def shared_video(name: str) -> Path:
    path = TESTDATA / name
    if not path.is_file():
        pytest.fail(f"test video missing: {path} (see ../shared/testdata/README.md)")
    return path


_EMPTY: list[Path] = []


def make_workspace(root: Path, overrides: dict | None = None) -> Path:
    """A new workspace at root as `anchor init` makes it (git and DVC initialised, the mannequin body model made:
    once per session, then copied, a few seconds saved each time), then small-and-fast params for tests."""
    import shutil

    if not _EMPTY:
        from cli.commands.workspace import init
        from core.workspace import Workspace
        from tasks import runner

        template = Path(_scratch("anchor-test-empty-")) / "ws"
        init(template)
        runner.body_model_path(Workspace(template))  # the generated mannequin, once (4 s a workspace otherwise)
        _EMPTY.append(template)
    shutil.copytree(_EMPTY[0], root, symlinks=True)
    params = yaml.safe_load((root / "params.yaml").read_text())
    merge_params(params, overrides if overrides is not None else TEST_PARAMS)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def merge_params(params: dict, overrides: dict) -> None:
    """Sections are updated key by key; top-level values (`profile`) replaced."""
    for section, values in overrides.items():
        if isinstance(values, dict):
            params.setdefault(section, {}).update(values)
        else:
            params[section] = values


def cut_clip(src: Path, dst: Path, frames: int, width: int, height: int, audio: bool = False) -> Path:
    """A short H.264 clip of a real test video (made in a temp dir, never committed); with `audio`, its sound
    over the same frames as AAC."""
    import av

    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast"}
        for i, frame in enumerate(inp.decode(video=0)):
            if i >= frames:
                break
            for packet in stream.encode(frame.reformat(width=width, height=height, format="yuv420p")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    if audio:
        _add_audio(src, dst, frames / 30)
    return dst


def encode_aac(wav: Path, out: Path) -> Path:
    """A wav re-encoded as AAC in whatever container `out`'s suffix names (.m4a, .mp4: audio only)."""
    import av

    with av.open(str(wav)) as src, av.open(str(out), "w") as dst:
        stream = dst.add_stream("aac", rate=src.streams.audio[0].rate, layout="mono")
        for frame in src.decode(audio=0):
            frame.pts = None
            for packet in stream.encode(frame):
                dst.mux(packet)
        for packet in stream.encode():
            dst.mux(packet)
    return out


def _add_audio(src: Path, video: Path, seconds: float) -> None:
    """Mux the first `seconds` of `src`'s audio into `video` (its video stream copied as is)."""
    import av

    tmp = video.with_name(f"audio-{video.name}")
    with av.open(str(video)) as vin, av.open(str(src)) as ain, av.open(str(tmp), "w") as out:
        vs = out.add_stream_from_template(vin.streams.video[0])
        rate = ain.streams.audio[0].rate
        aus = out.add_stream("aac", rate=rate, layout="mono")
        resampler = av.AudioResampler(format="fltp", layout="mono", rate=rate)
        for packet in vin.demux(vin.streams.video[0]):
            if packet.dts is not None:
                packet.stream = vs
                out.mux(packet)
        done = 0
        for frame in ain.decode(audio=0):
            if done >= seconds * rate:
                break
            for part in resampler.resample(frame):
                part.pts = None
                done += part.samples
                for packet in aus.encode(part):
                    out.mux(packet)
        for packet in aus.encode():
            out.mux(packet)
    tmp.replace(video)


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], object]) -> Path:
    """`name`, made by `build(path)` once per test session: with pytest-xdist, by the first worker that asks (the
    others wait for it, then read the same files), so no template is made twice. Templates are never changed."""
    import shutil

    from filelock import FileLock

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        path = tmp_path_factory.mktemp(name) / "ws"
        build(path)
        return path
    shared = tmp_path_factory.getbasetemp().parent / "built-once"  # the session's folder, above every worker's
    shared.mkdir(exist_ok=True)
    path, done = shared / name / "ws", shared / name / "done"
    with FileLock(str(shared / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(path.parent, ignore_errors=True)  # what a worker that failed half-way left
            path.parent.mkdir()
            build(path)
            done.touch()
    return path


@pytest.fixture(scope="session")
def short_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2.1 s (63 frames) of the seated anchor at 360x640 with its speech: one train clip and one test clip."""
    def build(path: Path) -> None:
        path.mkdir()
        cut_clip(shared_video("anchor_seated_hevc.mp4"), path / "short.mp4", 63, 360, 640, audio=True)

    return built_once(tmp_path_factory, "video", build) / "short.mp4"


ONBOARDED_ID = "demo"


@pytest.fixture(scope="session")
def onboarded(tmp_path_factory: pytest.TempPathFactory, short_video: Path) -> Path:
    """A workspace (TEST_PARAMS) with the short clip onboarded as `demo` (every onboard stage): a template that tests
    copy with `copy_workspace` rather than onboard again."""
    from core.workspace import Workspace
    from tasks import runner

    def build(path: Path) -> None:
        ws = Workspace(make_workspace(path))
        ws.register_identity(ONBOARDED_ID)
        runner.execute(ws, "source", ONBOARDED_ID, external=short_video)
        for stage in ("ingest", "keypoints", "matting", "smplx_fit", "perturb", "render_mesh", "speech"):
            runner.execute(ws, stage, ONBOARDED_ID)

    return built_once(tmp_path_factory, "onboarded", build)


SECOND_ID = "half"


@pytest.fixture(scope="session")
def second_person(tmp_path_factory: pytest.TempPathFactory, onboarded: Path) -> Path:
    """The onboarded template with a second, different person beside `demo` (2.1 s of the half-body portrait),
    fitted: source → ingest → keypoints → smplx_fit. A template for motion from another body; copy it."""
    from core.workspace import Workspace
    from tasks import runner

    def build(path: Path) -> None:
        ws = Workspace(copy_workspace(onboarded, path))
        video = cut_clip(shared_video("halfbody_portrait.mp4"), path.parent / "half.mp4", 63, 240, 454)
        runner.execute(ws, "source", SECOND_ID, external=video)
        for stage in ("ingest", "keypoints", "smplx_fit"):
            runner.execute(ws, stage, SECOND_ID)

    return built_once(tmp_path_factory, "second", build)


def copy_workspace(template: Path, dest: Path, overrides: dict | None = None) -> Path:
    """A private copy of a template workspace, with params sections updated by `overrides`."""
    import shutil

    shutil.copytree(template, dest, symlinks=True)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    merge_params(params, overrides or {})
    (dest / "params.yaml").write_text(yaml.safe_dump(params))
    return dest


_PREFECT = contextlib.ExitStack()
_PREFECT_URL: list[str] = []


def prefect_server() -> str:
    """The session's one Prefect server (Prefect's test harness: a temporary database), started on first use:
    flows run in this process and `anchor` subprocesses (through PREFECT_API_URL) all talk to it, so no test pays
    for a server start of its own. Stopped when the session ends."""
    if not _PREFECT_URL:
        from prefect.settings import PREFECT_API_URL
        from prefect.testing.utilities import prefect_test_harness

        _PREFECT.enter_context(prefect_test_harness(server_startup_timeout=120))
        _PREFECT_URL.append(PREFECT_API_URL.value())
    os.environ["PREFECT_API_URL"] = _PREFECT_URL[0]
    return _PREFECT_URL[0]


@pytest.fixture(autouse=True)
def _environment_restored() -> Iterator[None]:
    """What a test, or a command it runs in this process, sets in os.environ ends with the test (the session's
    Prefect server stays named)."""
    before = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(before)
    if _PREFECT_URL:
        os.environ["PREFECT_API_URL"] = _PREFECT_URL[0]


TEMPLATES = ("onboarded", "second", "trained")  # built once per session, by the first worker needing one


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Test files in the order that finishes the suite soonest on two workers (`make test` hands files out in this
    order: `--dist loadfile --no-loadscope-reorder`): the longest first, by tests/durations.json (seconds per file
    measured in a whole run; a file not in it counts as short), so no worker is left with a long file at the end
    while the other idles; and second, the longest file that needs no shared template, so one worker has its own
    work while the other builds the template the first file needs."""
    import json

    seconds = json.loads((Path(__file__).with_name("durations.json")).read_text())
    files: dict[str, bool] = {}  # file → needs a template
    for item in items:
        name = item.nodeid.split("::")[0]
        files[name] = files.get(name, False) or bool(set(TEMPLATES) & set(getattr(item, "fixturenames", ())))
    order = sorted(files, key=lambda f: -seconds.get(f, 0))
    if order and files[order[0]]:
        free = next((f for f in order[1:] if not files[f]), None)
        if free is not None:
            order.remove(free)
            order.insert(1, free)
    rank = {f: i for i, f in enumerate(order)}
    items.sort(key=lambda item: rank[item.nodeid.split("::")[0]])


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    import logging
    import shutil

    logging.disable(logging.INFO)  # the server's "stopping" line: a pytest-xdist worker's output is closed by now
    try:
        _PREFECT.close()
    finally:
        logging.disable(logging.NOTSET)
        for path in _SCRATCH:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[str]:
    yield prefect_server()


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    return make_workspace(tmp_path / "ws")


# ------------------------------------------------------------------------------------- a briefly trained identity
FEW = {"steps": {"tiny": 2, "cpu": 1, "sd15": 1}, "face_steps": {"tiny": 2, "cpu": 1, "sd15": 1}}
FAST = {"render_body": {"steps": 3}, "face": {"steps": 3}, "assemble": {"preset": "veryfast"}}


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, onboarded: Path) -> Path:
    """The onboarded template, pretrained and finetuned for a few tiny steps (FEW) with fast render params (FAST):
    a template that tests copy with `copy_workspace`, never change."""
    from core.workspace import SHARED, Workspace
    from tasks import runner

    def build(path: Path) -> None:
        ws = Workspace(copy_workspace(onboarded, path, {"pretrain": FEW, "finetune": FEW, **FAST}))
        runner.execute(ws, "pretrain", SHARED)
        runner.execute(ws, "finetune", ONBOARDED_ID)

    return built_once(tmp_path_factory, "trained", build)


def held_out(ws) -> tuple[dict, float]:
    """The trained identity's held-out clips as one motion (its own fit) and where its audio starts."""
    from tasks import registry
    from tasks.stages import motion

    return motion.held_out(registry.artifact_dir(ws, "smplx_fit", ONBOARDED_ID),
                           registry.artifact_dir(ws, "ingest", ONBOARDED_ID))


def render(ws, blocks: dict, audio: Path | None = None, overrides: dict[str, dict] | None = None,
           kind: str = "test") -> str:
    """motion → render_body → face → hands → assemble through the runner; returns the render subject."""
    from core.workspace import render_subject
    from tasks import runner
    from tasks.stages import motion

    key, staged = motion.stage(ws.state / "motions", blocks, {"kind": kind}, audio)
    subject = render_subject(ONBOARDED_ID, key)
    runner.execute(ws, "motion", subject, external=staged)
    for stage in ("render_body", "face", "hands", "assemble"):
        runner.execute(ws, stage, subject, overrides=(overrides or {}).get(stage))
    return subject


def video_frames(path: Path) -> list:
    import av

    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def cli(root: Path, *args: str, timeout: float = 900, env: dict | None = None,
        embedded: bool = False) -> subprocess.CompletedProcess[str]:
    """`anchor -w ROOT ARGS` in a subprocess, as a user runs it, on the session's Prefect server (`embedded`: on
    an embedded server of its own, as a user's command starts one, for tests of that server)."""
    env = dict(env if env is not None else os.environ)
    if embedded:
        env.pop("PREFECT_API_URL", None)
    else:
        env["PREFECT_API_URL"] = prefect_server()
    return subprocess.run([sys.executable, "-m", "cli.main", "-w", str(root), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def anchor(root: Path | None, *args: str) -> subprocess.CompletedProcess[str]:
    """`anchor -w ROOT ARGS` in this process: the command line's own entry point (`cli.main.main`) with its exit
    code, stdout and stderr, on the session's Prefect server, without a new interpreter. For tests of what a
    command does; `cli` for those of how a process behaves."""
    import io
    import signal
    from unittest import mock

    from cli import env as cli_env
    from cli import main as cli_main
    from core import interrupt

    prefect_server()
    argv = ["anchor", *(["-w", str(root)] if root is not None else []), *args]
    stdout, stderr = io.StringIO(), io.StringIO()
    sigint, saved_argv = signal.getsignal(signal.SIGINT), sys.argv
    code: int | str | None = 0
    try:
        sys.argv = argv
        # what a command sets up for its process (environment, log routing) ends with it here too
        with mock.patch.dict(os.environ), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            cli_main.main()
    except SystemExit as ended:
        code = ended.code
    finally:
        sys.argv = saved_argv
        signal.signal(signal.SIGINT, sigint)
        interrupt._REQUESTED.clear()
        cli_env.unroute_logs()
    returncode = code if isinstance(code, int) else (0 if code is None else 1)
    return subprocess.CompletedProcess(argv, returncode, stdout.getvalue(), stderr.getvalue())


def set_param(root: Path, section: str, key: str, value: object) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params[section][key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def show_pickle(path: Path, frames: int = 40) -> Path:
    """A pickle laid out as SHOW writes it: axis-angle body under body_pose_axis, (T, 1, 3) root, 12 PCA
    components per hand, 100 expressions, 300 betas, and its camera and bookkeeping entries."""
    import pickle

    import numpy as np

    rng = np.random.default_rng(3)
    t = np.linspace(0, 2 * np.pi, frames, dtype=np.float32)
    data = {
        "body_pose_axis": (0.05 * rng.standard_normal((frames, 63))).astype(np.float32),
        "global_orient": np.tile(np.float32([[[np.pi, 0, 0]]]), (frames, 1, 1)),
        "transl": np.stack([0.05 * np.sin(t), 0 * t, 0 * t], 1).astype(np.float32),
        "left_hand_pose": (0.5 * rng.standard_normal((frames, 12))).astype(np.float32),
        "right_hand_pose": (0.5 * rng.standard_normal((frames, 12))).astype(np.float32),
        "jaw_pose": np.stack([0.2 * (1 + np.sin(t)), 0 * t, 0 * t], 1).astype(np.float32),
        "leye_pose": np.zeros((frames, 3), np.float32), "reye_pose": np.zeros((frames, 3), np.float32),
        "expression": (0.1 * rng.standard_normal((frames, 100))).astype(np.float32),
        "betas": np.zeros((1, 300), np.float32),
        "camera_transl": np.zeros((frames, 3), np.float32), "focal_length": np.float32(5000),
        "width": 1280, "height": 720, "center": np.float32([640, 360]), "batch_size": frames,
        "pose_embedding": np.zeros((frames, 32), np.float32), "mica_head_transl": np.zeros((1, 3), np.float32),
        "losses_to_log": {"loss": 1.0}, "speaker_name": "someone",
    }
    path.write_bytes(pickle.dumps(data))
    return path
