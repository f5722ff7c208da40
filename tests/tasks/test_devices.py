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


def test_gpu_locks_are_the_machines_by_gpu_uuid_whatever_index_a_process_sees(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Two workspaces' commands on one machine: the first sees both GPUs (cuda:1 is GPU-b), the second runs with
    CUDA_VISIBLE_DEVICES=1 (its cuda:0 is GPU-b). Neither passes a lock directory of its own: the user's runtime
    directory holds the machine's locks, by UUID, so the second waits for GPU-b instead of sharing it."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    seen = threading.local()  # each thread is one process's view of the machine

    class Props:
        def __init__(self, uuid: str) -> None:
            self.uuid = uuid

    monkeypatch.setattr(devices, "visible_gpus", lambda: len(seen.gpus))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: Props(seen.gpus[i]))
    holding, release, second = threading.Event(), threading.Event(), {}

    def first_workspace() -> None:
        seen.gpus = ["aaaa", "bbbb"]
        with devices.claim("cuda:1", poll_s=0.02) as device:
            assert device == torch.device("cuda", 1)
            holding.set()
            release.wait(10)

    def second_workspace() -> None:
        seen.gpus = ["bbbb"]
        with devices.claim("cuda", poll_s=0.02) as device:
            second["at"] = (device, time.monotonic())

    a = threading.Thread(target=first_workspace)
    a.start()
    assert holding.wait(10)
    b = threading.Thread(target=second_workspace)
    b.start()
    time.sleep(0.3)
    assert not second  # GPU-b is held, under another index
    freed = time.monotonic()
    release.set()
    for t in (a, b):
        t.join(10)
    assert second["at"][0] == torch.device("cuda", 0) and second["at"][1] >= freed
    assert sorted(p.name for p in (tmp_path / "run" / "anchor" / "gpu-locks").iterdir()) == ["GPU-bbbb.lock"]
    assert devices.lock_dir() == tmp_path / "run" / "anchor" / "gpu-locks"
    seen.gpus = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,GPU-1234")
    assert devices.gpu_ids(3) == ["index-3", "GPU-1234", "index-2"]  # no UUID from the driver: the machine's index


def test_a_stage_with_models_in_part_of_its_run_claims_the_device_only_for_that_part(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setattr(devices, "visible_gpus", lambda: 0)
    whole = devices.Compute(torch.device("cpu"))
    with whole.held() as device:  # claimed by the runner for the whole run: that device, nothing claimed again
        assert device == torch.device("cpu")
    part = devices.Compute(torch.device("cpu"), on_demand="cuda")
    with pytest.raises(StageError, match="no CUDA device"), part.held():  # the claim happens here, not before
        pass
    monkeypatch.setattr(devices, "visible_gpus", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with part.held() as device:
        assert device == torch.device("cuda", 0)
        with pytest.raises(StageError, match="only 1 CUDA"), devices.Compute(device, on_demand="cuda:1").held():
            pass
