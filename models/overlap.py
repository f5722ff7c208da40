"""Batch-overlapped temporal denoising (paper Algorithm 1): one diffusion process over a sequence of any length.

At every scheduler step the sequence is covered by windows of `window` frames that overlap by `overlap`; each
window's noise prediction is added to its frames, the sum is divided by how many windows saw each frame, and one
scheduler step moves the whole sequence. Overlapping predictions agree where windows meet, so the video stays
continuous across window borders at a cost of window / (window - overlap) evaluations per frame.

Windows are aligned so the last one ends on the last frame: there is never a short trailing window, which the
motion modules would see as a different clip length. A sequence no longer than one window is one window.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from models.latents import LatentStore


def window_starts(frames: int, window: int, overlap: int) -> list[int]:
    """First frame of each window. 300 frames, window 16, overlap 4 → 25 windows (0, 12, …, 276, 284)."""
    if frames < 1:
        raise ValueError(f"need at least one frame, got {frames}")
    if window < 1 or not 0 <= overlap < window:
        raise ValueError(f"window {window} / overlap {overlap}: need window ≥ 1 and 0 ≤ overlap < window")
    if frames <= window:
        return [0]
    starts = list(range(0, frames - window + 1, window - overlap))
    if starts[-1] + window < frames:
        starts.append(frames - window)
    return starts


def windows(frames: int, window: int, overlap: int) -> list[slice]:
    return [slice(s, min(s + window, frames)) for s in window_starts(frames, window, overlap)]


def chunks(frames: int, size: int) -> list[slice]:
    """Consecutive, disjoint pieces of at most `size` frames (for per-frame work: encoding, decoding)."""
    return [slice(s, min(s + size, frames)) for s in range(0, frames, size)]


def frame_counts(frames: int, window: int, overlap: int) -> np.ndarray:
    """How many windows cover each frame (the divisor of Algorithm 1)."""
    counts = np.zeros(frames, np.int64)
    for w in windows(frames, window, overlap):
        counts[w] += 1
    return counts


def evaluations_per_step(frames: int, window: int, overlap: int) -> int:
    """Frames passed through the denoiser per scheduler step (classifier-free guidance doubles the batch)."""
    return sum(w.stop - w.start for w in windows(frames, window, overlap))


Predict = Callable[[torch.Tensor, torch.Tensor, slice], torch.Tensor]


def blended_prediction(predict: Predict, latents: torch.Tensor, t: torch.Tensor, window: int, overlap: int
                       ) -> torch.Tensor:
    """Σ over windows of predict(latents[:, :, w], t, w), divided per frame by its window count.
    Latents are (B, C, F, h, w); `predict` returns the noise for its slice of frames."""
    f = latents.shape[2]
    total = torch.zeros_like(latents)
    for w in windows(f, window, overlap):
        total[:, :, w] += predict(latents[:, :, w], t, w)
    counts = torch.from_numpy(frame_counts(f, window, overlap)).to(latents)
    return total / counts.view(1, 1, f, 1, 1)


@torch.no_grad()
def denoise(predict: Predict, latents: torch.Tensor, scheduler, window: int, overlap: int,
            on_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """Run every timestep of `scheduler` (set_timesteps already called) over the whole sequence."""
    for i, t in enumerate(scheduler.timesteps):
        eps = blended_prediction(lambda x, tt, w: predict(scheduler.scale_model_input(x, tt), tt, w),
                                 latents, t, window, overlap)
        latents = scheduler.step(eps, t, latents).prev_sample
        if on_step:
            on_step(i + 1)
    return latents


@torch.no_grad()
def denoise_store(predict: Predict, latents: LatentStore, scheduler, window: int, overlap: int,
                  on_step: Callable[[int], None] | None = None, begin: int = 0) -> None:
    """`denoise` over a `LatentStore`, holding only about one window in memory: the same numbers, bit for bit.

    Within a step, windows are taken in order; once a window is done, the frames before the next window's start
    have all their predictions (no later window covers them), so they are averaged and stepped right away. Each
    such group of frames keeps its own copy of the scheduler: every update the samplers make (DDIM, DPM-Solver++,
    UniPC) is element by element with scalars from the timestep, so stepping groups apart equals stepping the
    whole sequence. A multistep solver's history (its previous model outputs, UniPC's last sample: two or three
    more latent videos) is kept between steps in stores like the latents' (`SamplerHistory`), so it is bounded
    the same way, in memory or on disk. `begin` skips the first timesteps (sampling from a partly noised start,
    with the scheduler's begin index set to it)."""
    n = latents.frames
    starts = window_starts(n, window, overlap)
    wins = windows(n, window, overlap)
    groups = [slice(s, starts[k + 1] if k + 1 < len(starts) else n) for k, s in enumerate(starts)]
    counts = torch.from_numpy(frame_counts(n, window, overlap)).to(latents.device, torch.float32)
    per_group = [copy.deepcopy(scheduler) for _ in groups]
    history = SamplerHistory(latents)
    try:
        for i, t in enumerate(scheduler.timesteps[begin:]):
            eps: torch.Tensor | None = None  # summed predictions of frames [lo, lo + eps.shape[2])
            lo, next_group = 0, 0
            for k, w in enumerate(wins):
                x = latents.read(w)
                pred = predict(scheduler.scale_model_input(x, t), t, w).to(torch.float32)
                if eps is None:
                    eps = torch.zeros_like(pred)
                    lo = w.start
                if w.stop > lo + eps.shape[2]:
                    grow = torch.zeros((*eps.shape[:2], w.stop - lo - eps.shape[2], *eps.shape[3:]), dtype=eps.dtype,
                                       device=eps.device)
                    eps = torch.cat([eps, grow], dim=2)
                eps[:, :, w.start - lo:w.stop - lo] += pred
                complete = starts[k + 1] if k + 1 < len(starts) else n
                while next_group < len(groups) and groups[next_group].stop <= complete:
                    g = groups[next_group]
                    mean = eps[:, :, g.start - lo:g.stop - lo] / counts[g].view(1, 1, -1, 1, 1)
                    sched = per_group[next_group]
                    history.restore(sched, g)
                    latents.write(g, sched.step(mean, t, latents.read(g, torch.float32)).prev_sample)
                    history.stash(sched, g)
                    next_group += 1
                eps = eps[:, :, complete - lo:]
                lo = complete
            if on_step:
                on_step(i + 1)
    finally:
        history.close()


def history_videos(scheduler: Any) -> int:
    """How many latent videos a sampler keeps between steps: DPM-Solver++'s and UniPC's previous model outputs
    (one per order) and UniPC's last sample; none for DDIM."""
    outputs = getattr(scheduler, "model_outputs", None)
    return (len(outputs) if isinstance(outputs, list) else 0) + int(hasattr(scheduler, "last_sample"))


class _Stashed:
    """Where a per-frame tensor of a sampler's state went while its group waits for the next step."""

    def __init__(self, key: tuple[str, int | None], dtype: torch.dtype) -> None:
        self.key, self.dtype = key, dtype


class SamplerHistory:
    """The per-frame tensors a multistep sampler keeps between steps, for every group of frames, in `LatentStore`s
    made `like` the latent video (in memory while the latents are, else in scratch files beside them): each
    group's sampler holds them only while it steps. Float32 in, float32 out: the numbers are unchanged."""

    def __init__(self, latents: LatentStore) -> None:
        self.latents = latents
        self.stores: dict[tuple[str, int | None], LatentStore] = {}

    def stash(self, sched: Any, g: slice) -> None:
        for name, value in list(vars(sched).items()):
            if self._per_frame(value, g):
                setattr(sched, name, self._put((name, None), value, g))
            elif isinstance(value, list) and any(self._per_frame(v, g) for v in value):
                setattr(sched, name, [self._put((name, j), v, g) if self._per_frame(v, g) else v
                                      for j, v in enumerate(value)])

    def restore(self, sched: Any, g: slice) -> None:
        for name, value in list(vars(sched).items()):
            if isinstance(value, _Stashed):
                setattr(sched, name, self._get(value, g))
            elif isinstance(value, list) and any(isinstance(v, _Stashed) for v in value):
                setattr(sched, name, [self._get(v, g) if isinstance(v, _Stashed) else v for v in value])

    def close(self) -> None:
        for store in self.stores.values():
            store.close()
        self.stores.clear()

    def _per_frame(self, value: object, g: slice) -> bool:
        return (isinstance(value, torch.Tensor) and value.dim() == 5 and value.shape[1] == self.latents.channels
                and value.shape[2] == g.stop - g.start)

    def _put(self, key: tuple[str, int | None], value: torch.Tensor, g: slice) -> _Stashed:
        if key not in self.stores:
            self.stores[key] = self.latents.like()
        self.stores[key].write(g, value)
        return _Stashed(key, value.dtype)

    def _get(self, stashed: _Stashed, g: slice) -> torch.Tensor:
        return self.stores[stashed.key].read(g, stashed.dtype)
