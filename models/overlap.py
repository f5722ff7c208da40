"""Batch-overlapped temporal denoising (paper Algorithm 1): one diffusion process over a sequence of any length.

At every scheduler step the sequence is covered by windows of `window` frames that overlap by `overlap`; each
window's noise prediction is added to its frames, the sum is divided by how many windows saw each frame, and one
scheduler step moves the whole sequence. Overlapping predictions agree where windows meet, so the video stays
continuous across window borders at a cost of window / (window - overlap) evaluations per frame.

Windows are aligned so the last one ends on the last frame: there is never a short trailing window, which the
motion modules would see as a different clip length. A sequence no longer than one window is one window.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


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
