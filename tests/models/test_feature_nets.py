"""FID / FVD feature networks and the Fréchet distance (models/fid, models/fvd)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from models import fid, fvd

# --------------------------------------------------------------------------- Fréchet distance


def _reference_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Independent of scipy.linalg.sqrtm: Tr (s1 s2)^½ = Σ √λ of the symmetric s1^½ s2 s1^½ (eigh only)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    lam = np.linalg.eigvalsh(root1 @ s2 @ root1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(lam, 0, None)).sum())


def _features(seed: int, n: int = 200, d: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mix + rng.normal(size=d)


def test_frechet_distance_matches_an_independent_implementation() -> None:
    a, b = _features(0), _features(1) * 1.3 + 0.2
    got = fid.frechet_distance(*fid.statistics(a), *fid.statistics(b))
    want = _reference_distance(a, b)
    assert want > 1.0
    assert got == pytest.approx(want, rel=1e-6)
    assert fvd.fvd(a, b) == pytest.approx(got, rel=1e-12)


def test_frechet_distance_matches_the_textbook_formula_with_scipys_matrix_square_root() -> None:
    """d² = |μ1 − μ2|² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½), the root taken by scipy.linalg.sqrtm as pytorch-fid does (that
    package needs torchvision, which has no CPU build here)."""
    from scipy import linalg

    a, b = _features(2), _features(3)
    m1, s1 = fid.statistics(a)
    m2, s2 = fid.statistics(b)
    root = linalg.sqrtm(s1 @ s2).real
    want = float(((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * root))
    assert fid.frechet_distance(m1, s1, m2, s2) == pytest.approx(want, rel=1e-6)


def test_analytic_cases() -> None:
    a = _features(4)
    stats = fid.statistics(a)
    assert abs(fid.frechet_distance(*stats, *stats)) < 1e-6

    shift = np.linspace(-1.0, 2.0, a.shape[1])
    assert fid.frechet_distance(*stats, *fid.statistics(a + shift)) == pytest.approx((shift ** 2).sum(), rel=1e-6)

    centred = a - a.mean(0)
    trace = np.trace(np.cov(centred, rowvar=False))
    for s in (0.5, 2.0, 3.0):
        got = fid.frechet_distance(*fid.statistics(centred), *fid.statistics(s * centred))
        assert got == pytest.approx(trace * (1 - s) ** 2, rel=1e-6)


def test_singular_covariances_still_give_a_finite_distance() -> None:
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(10, 64)), rng.normal(size=(10, 64)) + 0.1  # fewer samples than dimensions
    got = fid.frechet_distance(*fid.statistics(a), *fid.statistics(b))
    assert np.isfinite(got)
    assert got == pytest.approx(_reference_distance(a, b), rel=1e-3)


def test_statistics_refuse_too_few_rows_and_bad_shapes() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        fid.statistics(np.zeros((1, 8)))
    with pytest.raises(ValueError):
        fid.statistics(np.zeros(8))
    mu, sigma = fid.statistics(np.arange(6.0).reshape(3, 2))
    assert mu.dtype == np.float64 and sigma.shape == (2, 2)
    with pytest.raises(ValueError, match="shape"):
        fid.frechet_distance(mu, sigma, np.zeros(3), np.eye(3))


# --------------------------------------------------------------------------- Inception


@pytest.fixture(scope="module")
def small_inception() -> fid.InceptionV3Pool:
    torch.manual_seed(0)
    model = fid.InceptionV3Pool(width=0.125)
    with torch.no_grad():  # non-trivial running statistics so the saved buffers matter
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def test_small_inception_round_trips_through_a_file(small_inception: fid.InceptionV3Pool, tmp_path: Path) -> None:
    path = tmp_path / "inception.pth"
    state = small_inception.state_dict()
    assert "Conv2d_1a_3x3.conv.weight" in state and "Conv2d_1a_3x3.bn.running_mean" in state
    assert "Mixed_5b.branch1x1.conv.weight" in state and "Mixed_7c.branch_pool.conv.weight" in state
    state = {**state, "fc.weight": torch.zeros(1008, small_inception.dim), "fc.bias": torch.zeros(1008)}
    torch.save(state, path)

    loaded = fid.load_inception(path)
    assert not loaded.training
    assert small_inception.dim == 256 == round(2048 * 0.125) and loaded.dim == small_inception.dim
    images = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = small_inception(images), loaded(images)
    assert got.shape == (2, small_inception.dim) and got.dtype == torch.float32
    assert torch.equal(got, want)
    assert got.std() > 0

    # files written before BatchNorm counted its batches have no num_batches_tracked buffers
    old = tmp_path / "old.pth"
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, old)
    reloaded = fid.load_inception(old).state_dict()
    assert all(torch.equal(reloaded[k], v) for k, v in small_inception.state_dict().items()
               if not k.endswith("num_batches_tracked"))


def test_inception_features_stream_frames(small_inception: fid.InceptionV3Pool) -> None:
    rng = np.random.default_rng(6)
    frames = [rng.integers(0, 256, (32, 24, 3), dtype=np.uint8) for _ in range(3)]
    feats = fid.inception_features(small_inception, iter(frames), batch=2)
    assert feats.shape == (3, small_inception.dim) and feats.dtype == np.float32
    with torch.no_grad():
        x = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255
        direct = small_inception(x).numpy()
    np.testing.assert_allclose(feats, direct, rtol=1e-4, atol=1e-5)
    assert fid.inception_features(small_inception, []).shape == (0, small_inception.dim)
    with pytest.raises(ValueError, match="uint8"):
        fid.inception_features(small_inception, [np.zeros((8, 8, 3), np.float32)])


def test_bad_inception_files_are_refused(small_inception: fid.InceptionV3Pool, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"metrics\.inception_weights") as missing:
        fid.load_inception(tmp_path / "nope.pth")
    assert "nope.pth" in str(missing.value)

    state = dict(small_inception.state_dict())
    state["Mixed_6b.branch7x7_2.conv.weightz"] = state.pop("Mixed_6b.branch7x7_2.conv.weight")
    path = tmp_path / "renamed.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"Mixed_6b\.branch7x7_2\.conv\.weight") as bad:
        fid.load_inception(path)
    assert "renamed.pth" in str(bad.value) and "weightz" in str(bad.value)


def test_pool_branches_are_the_fid_variants(small_inception: fid.InceptionV3Pool) -> None:
    """The FID graph's pool branches: averages that ignore padding (A, C, first E), a max in the last E."""
    net = small_inception
    seen: dict[str, torch.Tensor] = {}

    def capture(name: str) -> Callable[[torch.nn.Module, tuple[torch.Tensor, ...]], None]:
        return lambda _module, args: seen.__setitem__(name, args[0])

    blocks = {"Mixed_5b": net.Conv2d_4a_3x3.out_channels, "Mixed_6b": net.Mixed_6a.out_channels,
              "Mixed_7b": net.Mixed_7a.out_channels, "Mixed_7c": net.Mixed_7b.out_channels}
    hooks = [getattr(net, name).branch_pool.register_forward_pre_hook(capture(name)) for name in blocks]
    try:
        with torch.no_grad():
            for name in ("Mixed_5b", "Mixed_6b", "Mixed_7b"):
                getattr(net, name)(torch.ones(1, blocks[name], 9, 9))
                assert torch.equal(seen[name], torch.ones_like(seen[name])), name  # borders not diluted by padding
            spike = torch.zeros(1, blocks["Mixed_7c"], 8, 8)
            spike[0, :, 4, 4] = 1.0
            net.Mixed_7c(spike)
            assert torch.equal(seen["Mixed_7c"][0, 0, 3:6, 3:6], torch.ones(3, 3))  # a max spreads the spike unchanged
            assert seen["Mixed_7c"][0, 0].sum() == 9
    finally:
        for h in hooks:
            h.remove()


def test_full_width_network_matches_inception_v3() -> None:
    with torch.device("meta"):
        model = fid.InceptionV3Pool()
    assert model.dim == 2048
    state = model.state_dict()
    convs = [k for k in state if k.endswith(".conv.weight")]
    assert len(convs) == 94  # Inception-v3 without the auxiliary head
    assert all(state[k.replace("conv.weight", "bn.running_var")].shape[0] == state[k].shape[0] for k in convs)
    assert all(m.eps == 0.001 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert tuple(state["Mixed_7c.branch_pool.conv.weight"].shape) == (192, 2048, 1, 1)
    assert tuple(state["Mixed_6e.branch7x7dbl_5.conv.weight"].shape) == (192, 192, 1, 7)
    # torchvision's inception_v3 has 27,161,264 parameters; minus its fc (2048·1000 + 1000) and its auxiliary head
    # (1×1 conv 768→128 + bn, 5×5 conv 128→768 + bn, fc 768→1000) that leaves 21,785,568.
    assert sum(p.numel() for p in model.parameters()) == 27_161_264 - 2_049_000 - (98_304 + 256 + 2_457_600
                                                                                    + 1_536 + 769_000)


# --------------------------------------------------------------------------- I3D / FVD


class _StandInI3D(torch.nn.Module):
    """Same call signature as the real I3D TorchScript file; checks what it is given, returns a fixed projection
    of the per-channel, per-frame mean of the rescaled video."""

    def __init__(self, frames: int, height: int, width: int) -> None:
        super().__init__()
        self.frames, self.height, self.width = frames, height, width
        self.register_buffer("proj", torch.randn(3 * frames, 400, generator=torch.Generator().manual_seed(7)))

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        assert rescale and resize and return_features, "expected rescale=True, resize=True, return_features=True"
        assert x.dtype == torch.uint8, "expected uint8 values 0..255"
        assert x.dim() == 5 and x.shape[1] == 3, "expected (B, 3, T, H, W)"
        assert x.shape[2] == self.frames and x.shape[3] == self.height and x.shape[4] == self.width, "bad T/H/W"
        v = x.float() / 255.0 * 2.0 - 1.0
        return v.mean(dim=(3, 4)).flatten(1) @ self.proj


@pytest.fixture(scope="module")
def stand_in_i3d(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    module = _StandInI3D(fvd.CLIP_LENGTH, 12, 20)
    path = tmp_path_factory.mktemp("i3d") / "i3d_torchscript.pt"
    torch.jit.save(torch.jit.script(module), str(path))
    return path, module.proj


def test_i3d_features_use_the_torchscript_convention(stand_in_i3d: tuple[Path, torch.Tensor]) -> None:
    path, proj = stand_in_i3d
    model = fvd.load_i3d(path)
    assert isinstance(model, torch.jit.ScriptModule) and not model.training
    rng = np.random.default_rng(8)
    frames = [rng.integers(0, 256, (12, 20, 3), dtype=np.uint8) for _ in range(5 * fvd.CLIP_LENGTH + 3)]
    clips = fvd.clips_of(frames)
    assert len(clips) == 5 and clips[0].shape == (fvd.CLIP_LENGTH, 12, 20, 3)

    feats = fvd.i3d_features(model, clips, batch=2)
    assert feats.shape == (5, 400) and feats.dtype == np.float32
    # (T, H, W, RGB) → per (channel, frame) mean in [-1, 1], channel-major, as the stand-in projects it
    pooled = np.stack([(c.astype(np.float64) / 255 * 2 - 1).mean(axis=(1, 2)).T.reshape(-1) for c in clips])
    np.testing.assert_allclose(feats, pooled @ proj.double().numpy(), rtol=1e-4, atol=1e-4)

    with pytest.raises(torch.jit.Error, match="bad T/H/W"):  # a short clip reaches the network as it is
        fvd.i3d_features(model, [clips[0][:8]])
    # 5 clips in 400 dims: singular covariances, where the square root is only good to ~√ε of the scale
    assert abs(fvd.fvd(feats, feats)) < 1e-6 * np.trace(np.cov(feats.astype(np.float64), rowvar=False))


def test_clips_of_splits_without_overlap() -> None:
    frames = [np.full((2, 2, 3), i, np.uint8) for i in range(40)]
    clips = fvd.clips_of(frames, 16)
    assert len(clips) == 2
    assert [int(c[0, 0, 0, 0]) for c in clips] == [0, 16] and int(clips[1][-1, 0, 0, 0]) == 31
    assert fvd.clips_of(frames[:15]) == []
    assert len(fvd.clips_of(frames[:32])) == 2


def test_missing_i3d_file_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"metrics\.i3d_weights") as missing:
        fvd.load_i3d(tmp_path / "i3d_torchscript.pt")
    assert str(tmp_path / "i3d_torchscript.pt") in str(missing.value)
