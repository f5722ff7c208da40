"""The cpu cascade's 2× refiner: it starts as plain upsampling, loads from its folder, the pipeline renders through it
at twice the SGDM's side; training it, or the predictor (one loop), on an identity's frames learns, resumes exactly
and needs frames."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models import parts
from models.predictor import Predictor
from models.refiner import Refiner, degrade
from models.sgdm_pipeline import SGDMPipeline
from tasks import training
from tasks.training_data import Identity

SMALL = {"channels": (8, 16), "norm_num_groups": 4}


def test_a_new_refiner_is_the_plain_upsampling_and_loads_from_its_folder(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    low, cond, ref = (torch.rand(2, 3, s, s, generator=g) * 2 - 1 for s in (16, 32, 32))
    refiner = Refiner(**SMALL).eval()
    with torch.no_grad():
        out = refiner(low, cond, ref)
    assert out.shape == (2, 3, 32, 32)
    assert torch.allclose(out, F.interpolate(low, size=(32, 32), mode="bilinear", align_corners=False).clamp(-1, 1))
    with torch.no_grad():
        for p in refiner.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        moved = refiner(low, cond, ref)
    assert not torch.allclose(moved, out, atol=1e-3)
    refiner.save_pretrained(tmp_path / "refiner")
    loaded = Refiner.from_pretrained(tmp_path / "refiner").eval()
    assert loaded.config.channels == [8, 16] or tuple(loaded.config.channels) == (8, 16)
    with torch.no_grad():
        assert torch.equal(loaded(low, cond, ref), moved)


def test_degrade_halves_the_frame_and_is_the_same_for_the_same_generator() -> None:
    image = F.interpolate(torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1, size=(32, 32),
                          mode="bilinear", align_corners=False)  # smooth, like a picture
    a = degrade(image, torch.Generator().manual_seed(5))
    b = degrade(image, torch.Generator().manual_seed(5))
    c = degrade(image, torch.Generator().manual_seed(6))
    assert a.shape == (3, 3, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= -1 and float(a.max()) <= 1
    # close to the plain half-size image: a degraded copy, not another picture
    half = F.interpolate(image, scale_factor=0.5, mode="area")
    own, other = float((a - half).abs().mean()), float((a - half.roll(1, dims=0)).abs().mean())
    assert own < 0.4 * other


def test_the_pipeline_renders_through_its_refiner_at_twice_the_side(tmp_path: Path) -> None:
    base = parts.write_tiny(tmp_path / "base")
    sgdm = parts.new_sgdm(base, seed=1)
    plain = SGDMPipeline(sgdm, parts.load_vae(base), parts.load_image_encoder(base), parts.load_scheduler(base), 32)
    rng = np.random.default_rng(0)
    conditions = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(5)]
    kw = {"steps": 2, "guidance": 1.0, "control_scale": 1.0, "window": 4, "overlap_frames": 1}

    def render(pipe: SGDMPipeline) -> np.ndarray:
        return pipe(conditions, conditions[0], generator=torch.Generator().manual_seed(0), **kw)

    base_frames = render(plain)
    assert base_frames.shape == (5, 32, 32, 3)
    upsampled = F.interpolate(torch.from_numpy(base_frames).permute(0, 3, 1, 2).float(), size=(64, 64),
                              mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
    # a new refiner adds nothing: the SGDM's frames upsampled (within the rounding of the 8-bit frames)
    fresh = render(SGDMPipeline(sgdm, plain.vae, plain.image_encoder, plain.scheduler, 32, Refiner(**SMALL)))
    assert fresh.shape == (5, 64, 64, 3)
    assert np.abs(fresh.astype(np.float32) - upsampled).max() <= 1.5
    # a trained one adds its detail, and the checkpoint folder alone renders the same frames
    refiner = Refiner(**SMALL)
    with torch.no_grad():
        refiner.net.conv_out.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    pipe = SGDMPipeline(sgdm, plain.vae, plain.image_encoder, plain.scheduler, 32, refiner)
    refined = render(pipe)
    assert np.abs(refined.astype(np.float32) - upsampled).mean() > 1.0
    pipe.save_pretrained(tmp_path / "body")
    shutil.rmtree(tmp_path / "base")
    loaded = SGDMPipeline.from_pretrained(tmp_path / "body")
    assert (loaded.resolution, loaded.output_resolution) == (32, 64) and loaded.refiner is not None
    for (name, a), b in zip(refiner.state_dict().items(), loaded.refiner.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # (a reloaded SGDM differs from the in-memory one by float rounding only)
    assert np.abs(render(loaded).astype(np.int16) - refined).max() <= 2
    assert not (tmp_path / "plain").exists()
    plain.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain" / "refiner").exists()
    assert SGDMPipeline.from_pretrained(tmp_path / "plain").output_resolution == 32


class _Frames(Identity):
    """An identity whose frames (sharp blocks) and conditions (their negatives) are arrays in memory."""

    def __init__(self, n: int, side: int) -> None:
        rng = np.random.default_rng(3)
        small = rng.integers(0, 256, (n, side // 8, side // 8, 3)).astype(np.float32)
        self.images = [np.asarray(F.interpolate(torch.from_numpy(s).permute(2, 0, 1)[None], size=(side, side),
                                                mode="nearest")[0]
                                  .permute(1, 2, 0)).astype(np.uint8) for s in small]
        super().__init__("mem", [Path(f"{i}") for i in range(n)], [Path(f"{i}") for i in range(n)], [], [(0, n)],
                         side)

    def frame(self, i: int) -> np.ndarray:
        return self.images[i]

    def cond(self, i: int) -> np.ndarray:
        return 255 - self.images[i]


def _refiner_l1(refiner: Refiner, ident: _Frames) -> float:
    with torch.no_grad():
        real = torch.from_numpy(np.stack(ident.images)).permute(0, 3, 1, 2).float() / 127.5 - 1
        cond = torch.from_numpy(np.stack([ident.cond(i) for i in range(len(ident))])).permute(0, 3, 1, 2).float()
        low = F.interpolate(real, scale_factor=0.5, mode="area")
        return float((refiner(low, cond / 127.5 - 1, real[:1].expand_as(real)) - real).abs().mean())


def _predictor_l1(predictor: Predictor, ident: _Frames) -> float:
    with torch.no_grad():
        real = torch.from_numpy(np.stack(ident.images)).permute(0, 3, 1, 2).float() / 127.5 - 1
        cond = torch.from_numpy(np.stack([ident.cond(i) for i in range(len(ident))])).permute(0, 3, 1, 2).float()
        return float((predictor(cond / 127.5 - 1, real[:1].expand_as(real)) - real).abs().mean())


# the two deterministic regressors learnt in finetune, one training loop: (model, its training call, its L1, steps,
# the step a kill lands after, the step saved before it, how far the L1 must fall)
REGRESSORS = {
    "refiner": (Refiner, lambda model, frames, steps, **kw: training.train_refiner(model, frames, steps, 5e-3, **kw),
                _refiner_l1, 120, 75, 70, 0.85),
    "predictor": (Predictor, lambda model, frames, steps, **kw: training.train_predictor(model, frames, steps, 5e-3,
                                                                                          0.5, **kw),
                  _predictor_l1, 80, 45, 40, 0.7),
}


@pytest.mark.slow
def test_a_predictor_with_weighted_hands_learns_them_closer(tmp_path: Path) -> None:
    """The same frames, start and steps: weighting one square of every frame (the hands') in the predictor's L1
    brings that square closer to the real frames than an even loss does."""
    ident = _Frames(6, 32)
    ident.hands = [[[0.5, 0.25, 0.25]] for _ in range(len(ident))]  # the square x 16-24, y 8-16 of 32 px

    def square_l1(predictor: Predictor) -> float:
        with torch.no_grad():
            real = torch.from_numpy(np.stack(ident.images)).permute(0, 3, 1, 2).float() / 127.5 - 1
            cond = torch.from_numpy(np.stack([ident.cond(i) for i in range(len(ident))])).permute(0, 3, 1, 2)
            out = predictor(cond.float() / 127.5 - 1, real[:1].expand_as(real))
            return float((out - real)[..., 8:16, 16:24].abs().mean())

    errors = {}
    for weight in (1.0, 10.0):
        torch.manual_seed(0)
        model = Predictor(**SMALL)
        training.train_predictor(model, [ident], 60, 5e-3, 0.5, 0, tmp_path / str(weight), hand_weight=weight)
        errors[weight] = square_l1(model)
    assert errors[10.0] < 0.9 * errors[1.0], errors


@pytest.mark.slow
@pytest.mark.parametrize("kind", REGRESSORS)
def test_a_regressor_learns_and_resumes_to_the_same_weights(kind: str, tmp_path: Path) -> None:
    cls, train, l1, steps, kill_at, saved_at, factor = REGRESSORS[kind]
    ident = _Frames(6, 32)
    torch.manual_seed(0)
    model = cls(**SMALL)
    before = l1(model, ident)
    result = train(model, [ident], steps, seed=0, out=tmp_path / "a")
    assert result["steps"] == steps and result["resumed_at"] == 0
    assert l1(model, ident) < factor * before

    # killed mid-run, then started again: the weights of the run that never stopped
    class Killed(Exception):
        pass

    done = []

    def kill() -> None:
        done.append(1)
        if len(done) == kill_at:
            raise Killed

    torch.manual_seed(0)
    with pytest.raises(Killed):
        train(cls(**SMALL), [ident], steps, seed=0, out=tmp_path / "b", advance=kill, save_every=10)
    torch.manual_seed(0)
    resumed = cls(**SMALL)
    again = train(resumed, [ident], steps, seed=0, out=tmp_path / "b", save_every=10)
    assert again["resumed_at"] == saved_at
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("kind", REGRESSORS)
def test_a_regressor_needs_frames(kind: str, tmp_path: Path) -> None:
    from core.errors import StageError

    cls, train = REGRESSORS[kind][:2]
    with pytest.raises(StageError, match=f"no training frames for the {kind}"):
        train(cls(**SMALL), [], 5, seed=0, out=tmp_path)
