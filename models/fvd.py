"""Fréchet Video Distance: the Fréchet distance between Gaussians fitted to I3D (Kinetics-400) clip features.

The network is the TorchScript port of the tf.hub I3D that StyleGAN-V published (`i3d_torchscript.pt`) and that
most video-generation papers now share, so its calling convention is fixed by that code: videos as a
(B, 3, T, H, W) uint8 tensor of RGB values 0..255, called with `rescale=True` (the module maps 0..255 to the
[-1, 1] range I3D was trained on), `resize=True` (it resizes frames to 224×224 itself) and
`return_features=True` (the 400-d pre-softmax features rather than probabilities). FVD is computed over 16-frame
clips, the length the reference implementations use. Nothing is downloaded: the file's path comes from
params.yaml (`metrics.i3d_weights`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from models.fid import frechet_distance, stacked_batches, statistics

CLIP_LENGTH = 16
FEATURE_DIM = 400


def load_i3d(path: Path | str) -> torch.jit.ScriptModule:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"FVD I3D TorchScript file not found: {path} — it is set in params.yaml as `metrics.i3d_weights` "
            "(StyleGAN-V's i3d_torchscript.pt)")
    return torch.jit.load(str(path), map_location="cpu").eval()


def clips_of(frames: list[np.ndarray], length: int = CLIP_LENGTH) -> list[np.ndarray]:
    """Consecutive non-overlapping (length, H, W, 3) clips; a trailing partial clip is dropped, because I3D
    features of a shorter clip are not comparable with those of full ones."""
    if length < 1:
        raise ValueError(f"clip length must be ≥ 1, got {length}")
    return [np.stack(frames[i:i + length]) for i in range(0, len(frames) - length + 1, length)]


def i3d_features(model: torch.jit.ScriptModule | torch.nn.Module, clips: Iterable[np.ndarray],
                 batch: int = 4) -> np.ndarray:
    """(N, 400) float32 features of uint8 RGB clips (T, H, W, 3), streamed in batches of clips."""
    device = next(iter(model.parameters()), torch.empty(0)).device
    out: list[np.ndarray] = []
    with torch.no_grad():
        for stack in stacked_batches(clips, batch, ndim=4):
            x = torch.from_numpy(stack).to(device).permute(0, 4, 1, 2, 3).contiguous()  # (B, 3, T, H, W) uint8
            features = model(x, rescale=True, resize=True, return_features=True)
            out.append(features.detach().cpu().numpy().astype(np.float32).reshape(len(stack), -1))
    return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM), np.float32)


def fvd(features_a: np.ndarray, features_b: np.ndarray) -> float:
    return frechet_distance(*statistics(features_a), *statistics(features_b))
