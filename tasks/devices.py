"""Where a stage's models compute: `execution.device` (auto | cpu | cuda | cuda:N), one GPU per running task.

With N GPUs visible, N heavy tasks run at once (the `gpu` concurrency limit defaults to N) and each holds its own
GPU for its duration: `claim` takes the first free one under a lock file named by the GPU's UUID in the user's
runtime directory, so threads of one process, Dask workers, other commands and other workspaces on the same
machine never share a GPU by accident, whatever index CUDA_VISIBLE_DEVICES gives it in each process.
"""

from __future__ import annotations

import gc
import os
import sys
import time
import traceback
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from filelock import FileLock, Timeout

from core.errors import StageError

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Compute:
    """What a model-running stage gets from the runner: execution settings that never change its results."""

    device: torch.device
    max_latent_bytes: int = 1 << 31
    on_demand: str | None = None  # a stage with models in part of its run: the device spec `held` claims then

    @contextmanager
    def held(self) -> Iterator[torch.device]:
        """The device for the part of a stage that runs models: the one claimed for the whole run, or (on demand)
        one claimed now and freed when the part ends, so the rest of the run holds no GPU."""
        if self.on_demand is None:
            yield self.device
            return
        with claim(self.on_demand) as device:
            yield device


def gpu_limit(limits: dict[str, int]) -> int:
    """The `gpu` tag's concurrency limit: as set, else one task per visible GPU (one on a machine without)."""
    return limits.get("gpu") or max(1, visible_gpus())


def visible_gpus() -> int:
    """CUDA devices this process may use (CUDA_VISIBLE_DEVICES applies). Where no NVIDIA device node exists and
    torch is not loaded yet, none, without the seconds importing torch takes (a cached run needs nothing else)."""
    import sys

    if sys.platform == "linux" and "torch" not in sys.modules and not any(Path("/dev").glob("nvidia[0-9]*")):
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check(spec: str) -> None:
    """One clear error for a device this machine does not have (before any work starts)."""
    kind, _, index = spec.partition(":")
    if kind not in DEVICES or (index and (kind != "cuda" or not index.isdigit())):
        raise StageError(f"execution.device = {spec!r}: choose auto, cpu, cuda or cuda:N")
    if kind == "cuda":
        count = visible_gpus()
        if count == 0:
            raise StageError(f"execution.device = {spec!r}, but this machine has no CUDA device "
                             "(torch.cuda.is_available() is False); use cpu or auto")
        if index and int(index) >= count:
            raise StageError(f"execution.device = {spec!r}, but only {count} CUDA device(s) are visible")


def lock_dir() -> Path:
    """Where GPU locks live: one directory per user for the whole machine ($XDG_RUNTIME_DIR, else the temp dir),
    not per workspace, since two workspaces on one machine share its GPUs."""
    import getpass
    import tempfile

    runtime = os.environ.get("XDG_RUNTIME_DIR")
    path = Path(runtime) / "anchor" if runtime else Path(tempfile.gettempdir()) / f"anchor-{getpass.getuser()}"
    (path / "gpu-locks").mkdir(parents=True, exist_ok=True, mode=0o700)
    return path / "gpu-locks"


def gpu_ids(count: int) -> list[str]:
    """The visible GPUs' identities, in torch's order: each one's UUID, the same in every process whatever index
    CUDA_VISIBLE_DEVICES gives it there (without one from the driver: its index on the machine)."""
    import torch

    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    ids = []
    for i in range(count):
        uuid = getattr(torch.cuda.get_device_properties(i), "uuid", None) if torch.cuda.is_available() else None
        if uuid:
            ids.append(f"GPU-{uuid}")
        elif i < len(visible):
            ids.append(visible[i] if visible[i].startswith(("GPU-", "MIG-")) else f"index-{visible[i]}")
        else:
            ids.append(f"index-{i}")
    return ids


@contextmanager
def claim(spec: str, locks: Path | None = None, poll_s: float = 1.0) -> Iterator[torch.device]:
    """The device a task computes on, held for as long as the context lasts. cpu (or auto without a GPU): the CPU;
    cuda:N: that GPU; cuda (or auto with GPUs): the first GPU no other task holds, waiting for one if all are.
    `locks`: where the machine's GPU locks are (default `lock_dir()`)."""
    import torch

    check(spec)
    kind, _, index = spec.partition(":")
    count = visible_gpus()
    if kind == "cpu" or (kind == "auto" and count == 0):
        yield torch.device("cpu")
        return
    candidates = [int(index)] if index else list(range(count))
    ids = gpu_ids(count)
    locks = locks or lock_dir()
    locks.mkdir(parents=True, exist_ok=True)
    while True:
        for i in candidates:
            lock = FileLock(locks / f"{ids[i]}.lock")
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue
            try:
                if torch.cuda.is_available():
                    torch.cuda.set_device(i)
                yield torch.device("cuda", i)
            except BaseException as failed:
                # the traceback holds the failed work's frames (pipeline, model, optimiser): cleared, collected
                # and the cache emptied before the GPU is free, or the next task to claim it runs out of memory
                _forget(failed)
                gc.collect()
                raise
            finally:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                lock.release()
            return
        time.sleep(poll_s)


@contextmanager
def threads_kept() -> Iterator[None]:
    """torch's CPU thread count as it was before a stage ran: stages that set it for their own work (the fit, the
    mesh renderer, matting) would otherwise leave every later stage of the process, training included, on one core."""
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    try:
        yield
    finally:
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(before or default_threads())


def default_threads() -> int:
    """What torch starts with: OMP_NUM_THREADS if set, else one thread per physical core."""
    import psutil

    return int(os.environ.get("OMP_NUM_THREADS") or 0) or psutil.cpu_count(logical=False) or 1


def is_out_of_memory(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(exc, torch.OutOfMemoryError)


def out_of_memory(stage: str, device: torch.device, fields: Iterable[str], exc: BaseException) -> StageError:
    """One clear error for a CUDA out-of-memory error, naming the knobs of the stage's params section that lower
    its memory (`fields`: the section's)."""
    knobs = [k for k in ("window", "batch_size", "resolution", "dtype", "gradient_checkpointing") if k in fields]
    lower = ", ".join(f"{stage}.{k}" for k in knobs) or "the size of what it computes"
    said = (str(exc).strip().splitlines() or [""])[0]
    return StageError(f"{stage}: out of GPU memory on {device} ({said}); lower {lower}, or free the GPU of other "
                      "work")


def _forget(failed: BaseException) -> None:
    """Clear the frames of a failed run's tracebacks (the exception and what it was raised from) so what they
    held can be collected."""
    seen: set[int] = set()
    exc: BaseException | None = failed
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__
