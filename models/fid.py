"""Fréchet Inception Distance: the Fréchet distance between Gaussians fitted to Inception-v3 pool features.

FID numbers are only comparable with published ones (paper Table I: 35.91) when the features come from the exact
network the reference implementations use: the TensorFlow "2015-12-05" Inception graph, as ported to PyTorch by
pytorch-fid. That port differs from torchvision's Inception-v3 in its pooling branches (average pools that do not
count padding, a max pool in the last block), so the network is written out here with those variants and with
pytorch-fid's state-dict names, letting its weights file (`pt_inception-2015-12-05-6726825d.pth`) load strictly.
Nothing is downloaded: the file's path comes from params.yaml (`metrics.inception_weights`).

`width` shrinks every convolution so tests can build, save and reload a small random network through the same
loading path as the real weights.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn

INPUT_SIZE = 299
FULL_DIM = 2048


# --------------------------------------------------------------------------- Fréchet distance


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64: the covariance of 2048-d features loses digits in float32)."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be a 2-d array (samples, dims), got shape {x.shape}")
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 feature rows for a covariance, got {x.shape[0]}")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def _sqrtm_residual(root: np.ndarray, a: np.ndarray) -> float:
    scale = np.linalg.norm(a)
    return float(np.linalg.norm(root @ root - a) / scale) if scale > 0 else float(np.linalg.norm(root))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """||mu1 - mu2||² + Tr(s1 + s2 - 2 (s1 s2)^½).

    With fewer samples than dimensions the covariances are singular and the square root of their product can come
    out non-finite or wrong; as in the reference implementations, eps·I is then added to both covariances."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != mu2.shape or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")

    product = s1 @ s2
    with warnings.catch_warnings():  # a singular product (fewer samples than dims) is handled just below
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(product)
    if not np.isfinite(root).all() or _sqrtm_residual(root, product) > 1e-4:
        offset = np.eye(d) * eps
        product = (s1 + offset) @ (s2 + offset)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
            root = scipy.linalg.sqrtm(product)
    if not np.isfinite(root).all():
        raise ValueError("matrix square root of the covariance product is not finite, even with eps·I added")
    if np.iscomplexobj(root):
        imaginary = np.abs(np.diagonal(root).imag).max()
        if imaginary > 1e-3 * max(1.0, np.abs(np.diagonal(root).real).max()):
            raise ValueError(f"matrix square root has a significant imaginary part ({imaginary:.3g})")
        root = root.real

    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(root))


# --------------------------------------------------------------------------- Inception-v3 (FID variant)


class _Scale:
    """Channel counts of the full network, shrunk by `width` (never below one channel)."""

    def __init__(self, width: float) -> None:
        if not width > 0:
            raise ValueError(f"width must be > 0, got {width}")
        self.width = width

    def __call__(self, channels: int) -> int:
        return max(1, int(round(channels * self.width)))


class BasicConv2d(nn.Module):
    """conv (no bias) → batch norm (eps 0.001, the TF graph's value) → relu; names `conv` / `bn` as in the file."""

    def __init__(self, cin: int, cout: int, **conv: object) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **conv)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)
        self.out_channels = cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class _InceptionA(nn.Module):
    """35×35 block; its pool branch averages without counting padding (FID graph, unlike torchvision)."""

    def __init__(self, cin: int, pool_features: int, s: _Scale) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, s(64), kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, s(48), kernel_size=1)
        self.branch5x5_2 = BasicConv2d(s(48), s(64), kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, s(64), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(s(64), s(96), kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(s(96), s(96), kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, s(pool_features), kernel_size=1)
        self.out_channels = s(64) + s(64) + s(96) + s(pool_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
        return torch.cat([b1, b5, b3, bp], 1)


class _InceptionB(nn.Module):
    """35 → 17 reduction (same as torchvision)."""

    def __init__(self, cin: int, s: _Scale) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, s(384), kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, s(64), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(s(64), s(96), kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(s(96), s(96), kernel_size=3, stride=2)
        self.out_channels = s(384) + s(96) + cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, bd, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class _InceptionC(nn.Module):
    """17×17 block with factorised 7×7 convolutions; pool branch without padding in the average (FID graph)."""

    def __init__(self, cin: int, channels_7x7: int, s: _Scale) -> None:
        super().__init__()
        c7 = s(channels_7x7)
        self.branch1x1 = BasicConv2d(cin, s(192), kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, s(192), kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, s(192), kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, s(192), kernel_size=1)
        self.out_channels = 4 * s(192)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
        return torch.cat([b1, b7, bd, bp], 1)


class _InceptionD(nn.Module):
    """17 → 8 reduction (same as torchvision)."""

    def __init__(self, cin: int, s: _Scale) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, s(192), kernel_size=1)
        self.branch3x3_2 = BasicConv2d(s(192), s(320), kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, s(192), kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(s(192), s(192), kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(s(192), s(192), kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(s(192), s(192), kernel_size=3, stride=2)
        self.out_channels = s(320) + s(192) + cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class _InceptionE(nn.Module):
    """8×8 block. The FID graph pools differently in its two copies: Mixed_7b averages without counting padding,
    Mixed_7c takes a max (`max_pool=True`)."""

    def __init__(self, cin: int, s: _Scale, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, s(320), kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, s(384), kernel_size=1)
        self.branch3x3_2a = BasicConv2d(s(384), s(384), kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(s(384), s(384), kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, s(448), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(s(448), s(384), kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(s(384), s(384), kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(s(384), s(384), kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, s(192), kernel_size=1)
        self.out_channels = s(320) + 4 * s(384) + s(192)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        if self.max_pool:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        return torch.cat([b1, b3, bd, self.branch_pool(pooled)], 1)


class InceptionV3Pool(nn.Module):
    """Inception-v3 as used for FID, up to the global average pool: (N,3,H,W) in [0,1] → (N, dim) features."""

    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        s = _Scale(width)
        self.width = width
        self.Conv2d_1a_3x3 = BasicConv2d(3, s(32), kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(s(32), s(32), kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(s(32), s(64), kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(s(64), s(80), kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(s(80), s(192), kernel_size=3)
        self.Mixed_5b = _InceptionA(s(192), 32, s)
        self.Mixed_5c = _InceptionA(self.Mixed_5b.out_channels, 64, s)
        self.Mixed_5d = _InceptionA(self.Mixed_5c.out_channels, 64, s)
        self.Mixed_6a = _InceptionB(self.Mixed_5d.out_channels, s)
        self.Mixed_6b = _InceptionC(self.Mixed_6a.out_channels, 128, s)
        self.Mixed_6c = _InceptionC(self.Mixed_6b.out_channels, 160, s)
        self.Mixed_6d = _InceptionC(self.Mixed_6c.out_channels, 160, s)
        self.Mixed_6e = _InceptionC(self.Mixed_6d.out_channels, 192, s)
        self.Mixed_7a = _InceptionD(self.Mixed_6e.out_channels, s)
        self.Mixed_7b = _InceptionE(self.Mixed_7a.out_channels, s, max_pool=False)
        self.Mixed_7c = _InceptionE(self.Mixed_7b.out_channels, s, max_pool=True)
        self.dim = self.Mixed_7c.out_channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (N, 3, H, W), got shape {tuple(images.shape)}")
        x = F.interpolate(images.float(), size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        x = 2.0 * x - 1.0  # the TF graph takes [-1, 1]
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1).float()


def load_inception(path: Path | str) -> InceptionV3Pool:
    """Build the network the state-dict file describes and load it strictly (minus the classifier `fc.*`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"FID Inception weights file not found: {path} — it is set in params.yaml as `metrics.inception_weights` "
            "(pytorch-fid's pt_inception-2015-12-05-6726825d.pth)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    first = state.get("Conv2d_1a_3x3.conv.weight")
    if first is None:
        raise ValueError(f"{path}: not an FID Inception state dict (missing key Conv2d_1a_3x3.conv.weight)")
    model = InceptionV3Pool(width=first.shape[0] / 32)
    expected = model.state_dict()
    for key in expected:  # files saved before BatchNorm counted its batches lack these buffers
        if key.endswith(".num_batches_tracked") and key not in state:
            state[key] = expected[key].clone()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ValueError(f"{path}: state dict does not match the FID Inception network; "
                         f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    wrong = [f"{k} {tuple(state[k].shape)} ≠ {tuple(v.shape)}" for k, v in expected.items()
             if tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        raise ValueError(f"{path}: tensor shapes do not match the FID Inception network: {wrong[:5]}")
    model.load_state_dict(state, strict=True)
    return model.eval()


def stacked_batches(frames: Iterable[np.ndarray], batch: int, ndim: int) -> Iterator[np.ndarray]:
    """Stacks of up to `batch` uint8 arrays, split where the shape changes (so frames of any size stream)."""
    if batch < 1:
        raise ValueError(f"batch must be ≥ 1, got {batch}")
    pending: list[np.ndarray] = []
    for item in frames:
        a = np.asarray(item)
        if a.dtype != np.uint8 or a.ndim != ndim or a.shape[-1] != 3:
            raise ValueError(f"expected uint8 RGB arrays with {ndim} dims (…, 3), got {a.dtype} {a.shape}")
        if pending and (len(pending) == batch or a.shape != pending[0].shape):
            yield np.stack(pending)
            pending = []
        pending.append(a)
    if pending:
        yield np.stack(pending)


def inception_features(model: InceptionV3Pool, frames: Iterable[np.ndarray], batch: int = 16) -> np.ndarray:
    """(N, dim) float32 features of RGB uint8 frames (H, W, 3), streamed so a long video never sits in memory."""
    device = next(model.parameters()).device
    out: list[np.ndarray] = []
    with torch.no_grad():
        for stack in stacked_batches(frames, batch, ndim=3):
            x = torch.from_numpy(stack).to(device).permute(0, 3, 1, 2).float() / 255.0
            out.append(model(x).cpu().numpy().astype(np.float32))
    return np.concatenate(out) if out else np.zeros((0, model.dim), np.float32)
