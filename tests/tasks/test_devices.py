"""Devices: a machine without CUDA says so in one line; with N GPUs each running task holds its own."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from core.errors import StageError
from tasks import devices


def test_cpu_and_auto_without_a_gpu_compute_on_the_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "visible_gpus", lambda: 0)
    for spec in ("cpu", "auto"):
        with devices.claim(spec, tmp_path) as device:
            assert device == torch.device("cpu")


@pytest.mark.parametrize(("spec", "message"), [
    ("cuda", "no CUDA device"), ("cuda:0", "no CUDA device"), ("gpu", "choose auto, cpu, cuda or cuda:N"),
    ("cuda:x", "choose auto"), ("cpu:1", "choose auto")])
def test_a_device_the_machine_lacks_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spec: str,
                                                      message: str) -> None:
    monkeypatch.setattr(devices, "visible_gpus", lambda: 0)
    with pytest.raises(StageError, match=message) as info, devices.claim(spec, tmp_path):
        pass
    assert "\n" not in str(info.value)


def test_each_running_task_holds_its_own_gpu_and_a_fourth_waits(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "visible_gpus", lambda: 3)  # a fake machine: three GPUs
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # so nothing calls into CUDA itself
    held: dict[str, int] = {}
    release = threading.Event()
    started = threading.Barrier(4)

    def task(name: str) -> None:
        started.wait()
        with devices.claim("cuda", tmp_path, poll_s=0.02) as device:
            held[name] = device.index
            release.wait()

    threads = [threading.Thread(target=task, args=(n,)) for n in "abc"]
    for t in threads:
        t.start()
    started.wait()
    deadline = time.monotonic() + 10
    while len(held) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(held.values()) == [0, 1, 2]  # one each, by index
    late: dict[str, int] = {}

    def fourth() -> None:
        with devices.claim("auto", tmp_path, poll_s=0.02) as device:
            late["d"] = device.index

    waiting = threading.Thread(target=fourth)
    waiting.start()
    time.sleep(0.3)
    assert not late  # all three are taken: it waits
    release.set()
    for t in (*threads, waiting):
        t.join(timeout=10)
    assert late["d"] in (0, 1, 2)
    with devices.claim("cuda:2", tmp_path) as device:  # a named GPU is that one
        assert device == torch.device("cuda", 2)
    with pytest.raises(StageError, match="only 3 CUDA device"), devices.claim("cuda:3", tmp_path):
        pass


def test_a_stage_that_sets_torchs_thread_count_leaves_it_as_it_found_it(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with devices.threads_kept():
            torch.set_num_threads(1)  # as the fit and the mesh renderer do for their own work
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert devices.default_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_peak_memory_sees_a_short_allocation() -> None:
    import numpy as np

    from core.monitor import PeakRSS

    with PeakRSS() as quiet:
        time.sleep(0.6)
    with PeakRSS() as busy:
        block = np.ones(200 << 20, np.uint8)  # 200 MB, held for a little over two samples
        time.sleep(0.6)
        del block
    assert busy.peak_mb - quiet.peak_mb > 150


def test_a_failed_task_lets_go_of_what_it_held_before_its_gpu_is_free(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import weakref

    monkeypatch.setattr(devices, "visible_gpus", lambda: 1)  # a fake one-GPU machine
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    events: list[str] = []

    class Lock(devices.FileLock):
        def release(self, force: bool = False) -> None:
            if self.is_locked:  # (not the no-op release of its clean-up when the lock object goes)
                events.append("gpu free")
            super().release(force)

    monkeypatch.setattr(devices, "FileLock", Lock)

    class Pipeline:  # what a stage builds on the GPU
        pass

    def stage() -> None:
        pipe = Pipeline()
        weakref.finalize(pipe, events.append, "pipeline gone")
        raise RuntimeError("the stage failed")

    with pytest.raises(RuntimeError, match="the stage failed"), devices.claim("cuda", tmp_path):
        stage()
    assert events == ["pipeline gone", "gpu free"]


def test_out_of_gpu_memory_is_one_error_naming_the_knobs_that_lower_it() -> None:
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 23.6 GiB total)\nmore")
    assert devices.is_out_of_memory(oom) and not devices.is_out_of_memory(MemoryError())
    err = devices.out_of_memory("render_body", torch.device("cuda", 0), ("steps", "window", "overlap", "dtype"), oom)
    assert isinstance(err, StageError) and "\n" not in str(err)
    assert str(err) == ("render_body: out of GPU memory on cuda:0 (CUDA out of memory. Tried to allocate 2.00 GiB "
                        "(GPU 0; 23.6 GiB total)); lower render_body.window, render_body.dtype, or free the GPU of "
                        "other work")
