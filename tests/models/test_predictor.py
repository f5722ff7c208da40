"""Predict and refine: the predictor starts as the reference and loads from its folder; the pipeline samples from
its frames at the strength asked (none of the sampler's steps at 0, all of them and no predictor at 1). Its training
is tested with the refiner's (test_refiner: one loop)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from models import parts, pipeline
from models.predictor import Predictor
from models.sgdm_pipeline import SGDMPipeline

SMALL = {"channels": (8, 16), "norm_num_groups": 4}


def test_a_new_predictor_is_the_reference_and_loads_from_its_folder(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    cond, ref = (torch.rand(2, 3, 32, 32, generator=g) * 2 - 1 for _ in range(2))
    predictor = Predictor(**SMALL).eval()
    with torch.no_grad():
        assert torch.equal(predictor(cond, ref), ref)
        for p in predictor.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        moved = predictor(cond, ref)
        # it reads the mesh: another condition, another frame
        assert not torch.allclose(predictor(-cond, ref), moved, atol=1e-3)
    assert moved.shape == (2, 3, 32, 32) and not torch.allclose(moved, ref, atol=1e-3)
    predictor.save_pretrained(tmp_path / "predictor")
    loaded = Predictor.from_pretrained(tmp_path / "predictor").eval()
    with torch.no_grad():
        assert torch.equal(loaded(cond, ref), moved)
    with pytest.raises(ValueError, match="not a multiple of its grid cell 4"):
        loaded(cond[..., :30, :30], ref[..., :30, :30])
    with pytest.raises(ValueError, match="keeps no reference of its own"):
        loaded(cond)


def test_a_predictor_of_three_inputs_reads_the_third_and_old_configs_load_as_two(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    cond, ref, soft = (torch.rand(2, 3, 16, 16, generator=g) * 2 - 1 for _ in range(3))
    predictor = Predictor(**SMALL, inputs=3).eval()
    with torch.no_grad():
        assert torch.equal(predictor(cond, ref, soft), ref)  # the change is from the reference, zero at first
        for p in predictor.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        assert not torch.allclose(predictor(cond, ref, soft), predictor(cond, ref, -soft), atol=1e-3)
    with pytest.raises(ValueError, match="reads 3 images, given 2"):
        predictor(cond, ref)
    # a predictor saved before `inputs` existed: its config has no such key, and it reads two
    Predictor(**SMALL).save_pretrained(tmp_path / "old")
    config = tmp_path / "old" / "config.json"
    config.write_text(config.read_text().replace('"inputs": 2,', ""))
    assert '"inputs"' not in config.read_text()
    old = Predictor.from_pretrained(tmp_path / "old")
    assert old.config.inputs == 2 and old(cond, ref).shape == cond.shape


def test_a_predictor_keeps_the_reference_it_learnt_against(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    cond, ref = (torch.rand(2, 3, 32, 32, generator=g) * 2 - 1 for _ in range(2))
    predictor = Predictor(**SMALL, side=32).eval()
    assert predictor.own_reference
    predictor.remember(ref[0])
    with torch.no_grad():
        assert torch.equal(predictor(cond), ref[:1].expand(2, -1, -1, -1))
    with pytest.raises(ValueError, match=r"reference \(3, 16, 16\): this predictor keeps one of \(3, 32, 32\)"):
        predictor.remember(ref[0, :, :16, :16])
    predictor.save_pretrained(tmp_path / "predictor")
    loaded = Predictor.from_pretrained(tmp_path / "predictor")
    assert torch.equal(loaded.reference, ref[0])


def _pipelines(tmp_path: Path) -> tuple[SGDMPipeline, SGDMPipeline]:
    base = parts.write_tiny(tmp_path / "base")
    sgdm = parts.new_sgdm(base, seed=1)
    predictor = Predictor(**SMALL)
    with torch.no_grad():
        predictor.net.conv_out.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    args = (sgdm, parts.load_vae(base), parts.load_image_encoder(base), parts.load_scheduler(base), 32)
    return SGDMPipeline(*args), SGDMPipeline(*args, predictor=predictor)


def test_the_pipeline_samples_from_the_prediction_at_the_strength_asked(tmp_path: Path) -> None:
    plain, pipe = _pipelines(tmp_path)
    rng = np.random.default_rng(0)
    conditions = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(5)]
    reference = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    kw = {"steps": 4, "guidance": 1.0, "control_scale": 1.0, "window": 4, "overlap_frames": 1}

    def render(p: SGDMPipeline, strength: float, seed: int = 0) -> tuple[np.ndarray, list[tuple[int, int]]]:
        calls: list[tuple[int, int]] = []
        frames = p(conditions, reference, generator=torch.Generator().manual_seed(seed), strength=strength,
                   callback=lambda i, n: calls.append((i, n)), **kw)
        return frames, calls

    # 0: the prediction as it is (through the codec), no sampler step, no noise
    predicted, calls = render(pipe, 0.0)
    assert calls == [] and pipe.denoising_steps(4, 0.0) == 0
    with torch.no_grad():
        cond = torch.from_numpy(np.stack(conditions)).permute(0, 3, 1, 2).float() / 127.5 - 1
        ref = torch.from_numpy(reference).permute(2, 0, 1)[None].float().expand(5, -1, -1, -1) / 127.5 - 1
        direct = (pipe.predictor(cond, ref) + 1) / 2
        latents = pipeline.encode_frames(pipe.vae, direct.permute(1, 0, 2, 3)[None])
        expected = pipeline.decode_latents(pipe.vae, latents)[0].permute(1, 2, 3, 0)
    assert np.abs(predicted.astype(np.int16) - (expected * 255).round().byte().numpy()).max() <= 1
    assert np.array_equal(render(pipe, 0.0, seed=7)[0], predicted)
    # 0.5: the last half of the steps, from the prediction noised: another picture, which the seed changes
    half, calls = render(pipe, 0.5)
    assert calls == [(1, 2), (2, 2)] and pipe.denoising_steps(4, 0.5) == 2
    assert np.abs(half.astype(np.int16) - predicted).mean() > 1.0
    assert not np.array_equal(render(pipe, 0.5, seed=7)[0], half)
    assert pipe.denoising_steps(4, 0.9) == 3 and pipe.denoising_steps(4, 0.2) == 0  # rounded down, as diffusers
    for kind in ("dpmpp", "unipc"):  # the multistep samplers start at their begin index
        sampler = SGDMPipeline(pipe.sgdm, pipe.vae, pipe.image_encoder, pipe.scheduler, 32, predictor=pipe.predictor)
        sampler.use_scheduler(kind)
        frames, calls = render(sampler, 0.5)
        assert calls == [(1, 2), (2, 2)] and frames.shape == (5, 32, 32, 3), kind
        assert not np.array_equal(frames, half) and np.abs(frames.astype(np.int16) - predicted).mean() > 1.0, kind
    # 1: from pure noise, as a checkpoint without a predictor renders (which ignores the strength)
    full, calls = render(pipe, 1.0)
    assert len(calls) == 4 and np.array_equal(full, render(plain, 1.0)[0])
    assert np.array_equal(render(plain, 0.0)[0], full) and plain.denoising_steps(4, 0.0) == 4
    with pytest.raises(ValueError, match="strength 1.5"):
        render(pipe, 1.5)
    # a predictor with its own reference starts from it, whatever reference the render passes
    own = Predictor(**SMALL, side=32)
    own.load_state_dict({**pipe.predictor.state_dict(), "reference": ref[0]})
    keeps = SGDMPipeline(pipe.sgdm, pipe.vae, pipe.image_encoder, pipe.scheduler, 32, predictor=own)
    assert np.abs(render(keeps, 0.0)[0].astype(np.int16) - predicted).max() <= 1
    other = keeps(conditions, 255 - reference, strength=0.0, **kw)
    assert np.array_equal(other, render(keeps, 0.0)[0])


def test_the_predictor_is_saved_with_the_checkpoint_and_only_when_there_is_one(tmp_path: Path) -> None:
    plain, pipe = _pipelines(tmp_path)
    pipe.save_pretrained(tmp_path / "body")
    plain.save_pretrained(tmp_path / "plain")
    shutil.rmtree(tmp_path / "base")
    loaded = SGDMPipeline.from_pretrained(tmp_path / "body")
    assert loaded.predictor is not None and loaded.output_resolution == 32
    for (name, a), b in zip(pipe.predictor.state_dict().items(), loaded.predictor.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not (tmp_path / "plain" / "predictor").exists()
    assert SGDMPipeline.from_pretrained(tmp_path / "plain").predictor is None
