"""The contract check itself: what a watched block may open, and that a caught violation still fails it."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import pytest

from core import contract


@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(contract.ENV, "1")
    root = tmp_path / "ws"
    for d in ("in", "other", "out"):
        (root / d).mkdir(parents=True)
        (root / d / "f.txt").write_text(d)
    return root


def test_declared_reads_output_writes_and_temporary_space_pass(ws: Path, tmp_path: Path) -> None:
    import tempfile

    with contract.watch("s", ws, [ws / "in"], [ws / "out"]):
        assert (ws / "in" / "f.txt").read_text() == "in"
        (ws / "out" / "new.txt").write_text("made")
        assert sorted(p.name for p in (ws / "out").iterdir()) == ["f.txt", "new.txt"]
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "scratch").write_text("x")
        import json  # noqa: F401 - the interpreter's own files
    assert (ws / "out" / "new.txt").read_text() == "made"


@pytest.mark.parametrize("act, says", [
    (lambda ws: (ws / "other" / "f.txt").read_text(), "read {ws}/other/f.txt (in the workspace)"),
    (lambda ws: (ws / "in" / "new.txt").write_text("x"), "wrote {ws}/in/new.txt (in the workspace)"),
    (lambda ws: sorted((ws / "other").iterdir()), "read {ws}/other (in the workspace)"),
    (lambda ws: (ws / "out" / "f.txt").rename(ws / "moved.txt"), "wrote {ws}/moved.txt"),
    (lambda ws: (ws / "in" / "f.txt").unlink(), "wrote {ws}/in/f.txt"),
])
def test_an_undeclared_read_or_a_write_outside_the_output_fails(ws: Path, act, says: str) -> None:
    with pytest.raises(contract.ContractViolation, match=re.escape(says.format(ws=ws.resolve()))), \
            contract.watch("s", ws, [ws / "in"], [ws / "out"]):
        act(ws)


def test_outside_the_workspace_only_libraries_and_temporary_space(ws: Path) -> None:
    elsewhere = Path(__file__).parents[2] / "pyproject.toml"  # beside the code: neither a library nor declared
    with pytest.raises(contract.ContractViolation, match="outside the workspace"), \
            contract.watch("s", ws, [ws / "in"], [ws / "out"]):
        elsewhere.read_text()
    with contract.watch("s", ws, [elsewhere], [ws / "out"]):  # declared (an external input): fine
        elsewhere.read_text()


def test_a_violation_a_library_swallowed_still_fails_the_stage(ws: Path) -> None:
    with pytest.raises(contract.ContractViolation, match="other/f.txt"), \
            contract.watch("s", ws, [ws / "in"], [ws / "out"]):
        with contextlib.suppress(Exception):  # what a careless library does
            (ws / "other" / "f.txt").read_text()
        (ws / "out" / "after.txt").write_text("went on")


def test_threads_the_stage_starts_are_judged_others_and_disabled_checks_are_not(
        ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def read_other() -> str:
        return (ws / "other" / "f.txt").read_text()

    with pytest.raises(contract.ContractViolation, match="other/f.txt"), \
            contract.watch("s", ws, [ws / "in"], [ws / "out"]), ThreadPoolExecutor(2) as pool:
        pool.submit(read_other).result()
    with ThreadPoolExecutor(1) as elsewhere:  # its thread started before the stage: not the stage's
        elsewhere.submit(int).result()
        with contract.watch("s", ws, [ws / "in"], [ws / "out"]):
            assert elsewhere.submit(read_other).result() == "other"
        assert elsewhere.submit(read_other).result() == "other"
    monkeypatch.setenv(contract.ENV, "0")
    with contract.watch("s", ws, [ws / "in"], [ws / "out"]):
        assert read_other() == "other"


def test_temporary_space_is_the_stages_own(ws: Path, tmp_path: Path) -> None:
    """What the stage makes in temporary space it may read back; another workspace there it may not."""
    import tempfile

    elsewhere = tmp_path / "another-ws" / "data.txt"
    elsewhere.parent.mkdir()
    elsewhere.write_text("not yours")
    with contract.watch("s", ws, [ws / "in"], [ws / "out"]):
        with tempfile.TemporaryDirectory() as scratch:
            (Path(scratch) / "a.txt").write_text("mine")
            assert (Path(scratch) / "a.txt").read_text() == "mine"
        with pytest.raises(contract.ContractViolation, match="another-ws/data.txt"):
            elsewhere.read_text()
        contract._current().violations.clear()  # type: ignore[union-attr] - go on checking the rest


def test_native_readers_and_writers_are_judged_too(ws: Path) -> None:
    import cv2
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    cv2.imwrite(str(ws / "other" / "img.png"), np.zeros((4, 4, 3), np.uint8))
    pq.write_table(pa.table({"a": [1]}), ws / "other" / "t.parquet")
    for act, says in ((lambda: cv2.imread(str(ws / "other" / "img.png")), "read"),
                      (lambda: pq.read_table(ws / "other" / "t.parquet"), "read"),
                      (lambda: cv2.imwrite(str(ws / "in" / "x.png"), np.zeros((4, 4, 3), np.uint8)), "wrote"),
                      (lambda: pq.write_table(pa.table({"a": [1]}), ws / "in" / "t.parquet"), "wrote")):
        with pytest.raises(contract.ContractViolation, match=f"s {says} "), \
                contract.watch("s", ws, [ws / "in"], [ws / "out"]):
            act()
    with contract.watch("s", ws, [ws / "other"], [ws / "out"]):
        assert cv2.imread(str(ws / "other" / "img.png")).shape == (4, 4, 3)
        pq.write_table(pa.table({"a": [1]}), ws / "out" / "t.parquet")


def test_a_spawned_worker_is_held_to_the_same_allowance(ws: Path) -> None:
    from core.progress import NullProgress
    from tasks.workers import run_parallel

    tests = Path(__file__).parents[1]  # where the worker imports `_read` from
    with contract.watch("s", ws, [ws / "in", tests], [ws / "out"]):
        assert run_parallel(_read, [str(ws / "in" / "f.txt")], 1, NullProgress()) == ["in"]
        with pytest.raises(contract.ContractViolation, match="other/f.txt"):
            run_parallel(_read, [str(ws / "other" / "f.txt")], 1, NullProgress())


def _read(path: str, report) -> str:
    return Path(path).read_text()


def test_a_native_reader_first_imported_in_a_worker_is_judged_and_the_check_loads_no_torch(ws: Path) -> None:
    """The native readers are wrapped when first imported, not loaded up front by the check (a worker of a stage
    that never uses torch used to import it, ~3 s, for safetensors' sake); those the fork server preloaded (cv2)
    are wrapped when the worker's check is installed."""
    import cv2
    import numpy as np
    from safetensors.numpy import save_file

    from core.progress import NullProgress
    from tasks.workers import run_parallel

    for d in ("in", "other"):
        save_file({"a": np.zeros((3, 5), np.float32)}, str(ws / d / "t.safetensors"))
        cv2.imwrite(str(ws / d / "a.png"), np.zeros((3, 5, 3), np.uint8))
    tests = Path(__file__).parents[1]
    with contract.watch("s", ws, [ws / "in", tests], [ws / "out"]):
        assert run_parallel(_read_tensor, [str(ws / "in")], 1, NullProgress()) == [((3, 5), (3, 5, 3), False)]
        for name in ("t.safetensors", "a.png"):
            with pytest.raises(contract.ContractViolation, match=f"other/{name}"):
                run_parallel(_read_tensor, [str(ws / "other" / name)], 1, NullProgress())


def _read_tensor(path: str, report) -> tuple[tuple[int, ...], tuple[int, ...], bool]:
    """Both files of a folder; a file alone: only that one (the test of a refused read)."""
    import sys

    assert "safetensors" not in sys.modules  # imported here, after the worker's check was installed
    import cv2
    from safetensors import safe_open

    if path.endswith(".png"):
        return (), cv2.imread(path).shape, False
    if path.endswith(".safetensors"):
        with safe_open(path, framework="np") as f:
            return f.get_tensor("a").shape, (), False
    with safe_open(f"{path}/t.safetensors", framework="np") as f:
        shape = f.get_tensor("a").shape
    return shape, cv2.imread(f"{path}/a.png").shape, "torch" in sys.modules


def test_stages_side_by_side_each_with_its_own_pools_are_each_judged_by_their_own(ws: Path) -> None:
    """Two stages in two threads, each writing through pools it starts again and again (threads come and go, their
    idents reused): each write is judged by the stage that started the thread, never the other."""
    from concurrent.futures import ThreadPoolExecutor

    for d in ("a", "b"):
        (ws / d).mkdir()

    def stage(name: str) -> int:
        with contract.watch(name, ws, [ws / "in"], [ws / name]):
            for round_ in range(20):
                with ThreadPoolExecutor(2) as pool:
                    list(pool.map(lambda i, r=round_: (ws / name / f"{r}-{i}.txt").write_text(name), range(4)))
        return len(list((ws / name).iterdir()))

    with ThreadPoolExecutor(2) as stages:
        assert list(stages.map(stage, ("a", "b"))) == [80, 80]


def test_a_library_building_its_font_cache_on_a_new_machine_is_not_the_stages_doing(ws: Path, tmp_path: Path) -> None:
    """MediaPipe imports matplotlib, which lists every font directory (`~/.fonts` among them) the first time it
    runs for a user: on a machine where that never happened, every stage that imported it failed the check."""
    import os
    import subprocess
    import sys

    home = tmp_path / "home"
    (home / ".fonts").mkdir(parents=True)
    (home / "notes.txt").write_text("the user's, not a library's")
    script = ("import pathlib, sys; from core import contract\n"
              "ws = pathlib.Path(sys.argv[1])\n"
              "with contract.watch('s', ws, [ws / 'in'], [ws / 'out']):\n"
              "    import matplotlib.font_manager\n"
              "try:\n"
              "    with contract.watch('s', ws, [ws / 'in'], [ws / 'out']):\n"
              "        (pathlib.Path.home() / 'notes.txt').read_text()\n"
              "except contract.ContractViolation as e:\n"
              "    print(e)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("MPLCONFIGDIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME")}
    done = subprocess.run([sys.executable, "-c", script, str(ws)], env={**env, "HOME": str(home)},
                          cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (home / ".cache" / "matplotlib").is_dir()  # the cache was built under the check, as on a new machine
    notes = (home / "notes.txt").resolve()
    assert done.stdout.strip() == f"s read {notes} (outside the workspace), which it does not declare"
