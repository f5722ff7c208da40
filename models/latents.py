"""A latent video of any length in bounded memory: in RAM while small, in a file beside the render when not.

Algorithm 1 reads and updates the whole sequence at every step, but only a window at a time, so nothing but the
frames at hand needs to be in memory. `LatentStore` keeps the (C, h, w) latent of every frame either as one tensor
on the compute device (up to `max_bytes`) or in a scratch file, frame after frame, read and written a few frames at
a time with positioned I/O (no memory map, whose pages would count as the process's own).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch


class LatentStore:
    """Latents (1, C, F, h, w) addressed by frame slices; `read` returns them on `device` in `dtype`."""

    def __init__(self, channels: int, frames: int, height: int, width: int, *, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, max_bytes: int = 1 << 31, spill_dir: Path | None = None,
                 copies: int = 1) -> None:
        """`copies`: how many videos of this shape the render will hold in all (a multistep sampler's history
        adds two or three, `like`): they fit `max_bytes` together, or all go to disk."""
        self.channels, self.frames, self.height, self.width = channels, frames, height, width
        self.device, self.dtype, self.spill_dir = torch.device(device), dtype, spill_dir
        self.frame_elems = channels * height * width
        self.nbytes = frames * self.frame_elems * 4  # float32 whatever the compute dtype: steps accumulate in it
        self.copies = copies
        self.on_disk = self.nbytes * copies > max_bytes
        self._file: int | None = None
        self._path: Path | None = None
        if self.on_disk:
            fd, name = tempfile.mkstemp(prefix=".latents-", suffix=".f32", dir=spill_dir)
            os.ftruncate(fd, self.nbytes)
            self._file, self._path = fd, Path(name)
            self._ram: torch.Tensor | None = None
        else:
            self._ram = torch.zeros((1, channels, frames, height, width), device=self.device, dtype=torch.float32)

    def like(self) -> LatentStore:
        """Another video of the same shape, kept where this one is (memory or disk): for a sampler's history."""
        return LatentStore(self.channels, self.frames, self.height, self.width, device=self.device, dtype=self.dtype,
                           max_bytes=0 if self.on_disk else self.nbytes, spill_dir=self.spill_dir)

    @property
    def memory_bytes(self) -> int:
        """What this video and the copies it was made for hold in memory (nothing when they are on disk)."""
        return 0 if self.on_disk else self.nbytes * self.copies

    # ----------------------------------------------------------------------------------------------- frames
    def read(self, frames: slice, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The latents of `frames` on the store's device, in its compute dtype (or `dtype`: float32 is exact)."""
        start, stop = frames.start or 0, frames.stop if frames.stop is not None else self.frames
        dtype = dtype or self.dtype
        if self._ram is not None:
            view = self._ram[:, :, start:stop]
        else:
            buf = os.pread(self._file, (stop - start) * self.frame_elems * 4, start * self.frame_elems * 4)
            arr = np.frombuffer(buf, np.float32).reshape(stop - start, self.channels, self.height, self.width)
            view = torch.from_numpy(arr.copy()).permute(1, 0, 2, 3)[None]
        # a fresh contiguous tensor either way: the store's later writes never reach what a reader (a scheduler
        # keeping its last sample) holds, and both modes give every computation the same layout
        out = torch.empty(view.shape, dtype=dtype, device=self.device)
        out.copy_(view)
        return out

    def write(self, frames: slice, values: torch.Tensor) -> None:
        start = frames.start or 0
        values = values.detach().to(torch.float32)
        if self._ram is not None:
            self._ram[:, :, start:start + values.shape[2]] = values
            return
        arr = values[0].permute(1, 0, 2, 3).contiguous().cpu().numpy()
        os.pwrite(self._file, arr.tobytes(), start * self.frame_elems * 4)

    def fill_noise(self, generator: torch.Generator, shared: bool = False, chunk_frames: int = 64) -> None:
        """Gaussian noise, the same numbers torch.randn((1, C, F, h, w), generator) gives, drawn a slab at a time
        in that order (channel after channel, frames in order): a slab of n·16 numbers is the same draw in pieces.
        `shared`: one frame of noise repeated over all frames (the official code's choice)."""
        if shared:
            one = torch.randn((1, self.channels, 1, self.height, self.width), generator=generator,
                              device=generator.device).to(torch.float32)
            for start in range(0, self.frames, chunk_frames):
                stop = min(start + chunk_frames, self.frames)
                self.write(slice(start, stop), one.expand(-1, -1, stop - start, -1, -1))
            return
        plane = self.height * self.width
        if self._ram is not None or plane % 16:
            if self._ram is None:
                raise ValueError(f"a {self.height}x{self.width} latent cannot be drawn in pieces; keep it in RAM")
            noise = torch.randn((1, self.channels, self.frames, self.height, self.width), generator=generator,
                                device=generator.device)
            self._ram.copy_(noise.to(self.device, torch.float32))
            return
        for c in range(self.channels):
            for start in range(0, self.frames, chunk_frames):
                stop = min(start + chunk_frames, self.frames)
                slab = torch.randn((stop - start) * plane, generator=generator, device=generator.device)
                self._write_channel(c, start, slab.reshape(stop - start, self.height, self.width))

    def _write_channel(self, c: int, start: int, planes: torch.Tensor) -> None:
        arr = planes.to(torch.float32).cpu().numpy()
        plane_bytes = self.height * self.width * 4
        for k, frame in enumerate(arr):
            os.pwrite(self._file, frame.tobytes(), ((start + k) * self.channels + c) * plane_bytes)

    def scale(self, factor: float, chunk_frames: int = 64) -> None:
        """Multiply every latent by `factor` (the scheduler's initial noise sigma)."""
        if factor == 1.0:
            return
        for start in range(0, self.frames, chunk_frames):
            frames = slice(start, min(start + chunk_frames, self.frames))
            self.write(frames, self.read(frames, torch.float32) * factor)

    def close(self) -> None:
        if self._file is not None:
            os.close(self._file)
            self._file = None
        if self._path is not None:
            self._path.unlink(missing_ok=True)
            self._path = None

    def __enter__(self) -> LatentStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
