"""Sampling a window on the tiny profile (its pictures are noise: this proves the plumbing), and the full-size
architecture's config numbers checked without allocating it."""

from __future__ import annotations

import pytest
import torch
from diffusers import ControlNetModel, MotionAdapter, UNet2DConditionModel

from models import parts as mparts
from models import pipeline, shapes

B, F, H = 1, 3, 32  # tiny VAE factor 4 → 8x8 latents


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> mparts.BasePaths:
    return mparts.write_tiny(tmp_path_factory.mktemp("tiny-base"))


@pytest.fixture(scope="module")
def parts(paths: mparts.BasePaths) -> dict:
    return {"body": mparts.new_sgdm(paths).eval(), "face": mparts.new_sgdm(paths, face=True).eval(),
            "vae": mparts.load_vae(paths).eval(), "scheduler": mparts.load_scheduler(paths),
            "encoder": mparts.load_image_encoder(paths).eval()}


@pytest.fixture(scope="module")
def tokens(parts: dict) -> torch.Tensor:
    return pipeline.encode_reference(parts["encoder"], torch.rand(B, 3, 48, 40, generator=torch.Generator()
                                                                   .manual_seed(1)))


def _cond(seed: int = 0) -> torch.Tensor:
    return torch.rand(B, 3, F, H, H, generator=torch.Generator().manual_seed(seed))


def _run(parts: dict, tokens: torch.Tensor, seed: int, face: bool = False, **kw) -> torch.Tensor:
    extra = {}
    if face:
        mask = torch.zeros(B, 1, F, H, H)
        mask[..., 8:24, 8:24] = 1
        extra = {"mask": mask, "masked_image": torch.where(mask > 0.5, 0.5, _cond(5))}
    return pipeline.sample(parts["face" if face else "body"], parts["vae"], parts["scheduler"], tokens, _cond(),
                           steps=kw.pop("steps", 3), generator=torch.Generator().manual_seed(seed), **extra, **kw)


def test_encode_reference_returns_every_token_before_pooling(parts: dict, tokens: torch.Tensor) -> None:
    cfg = parts["encoder"].config
    assert tokens.shape == (B, 1 + (cfg.image_size // cfg.patch_size) ** 2, cfg.hidden_size)
    # the input is resized to the encoder's size: any picture size gives the same token layout
    other = pipeline.encode_reference(parts["encoder"], torch.rand(2, 3, 100, 64))
    assert other.shape == (2, *tokens.shape[1:])
    # normalised with CLIP's statistics: the tokens are those of the normalised pixel values
    img = torch.rand(1, 3, cfg.image_size, cfg.image_size)
    mean, std = torch.tensor(pipeline.CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(pipeline.CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        direct = parts["encoder"](pixel_values=(img - mean) / std).last_hidden_state
    torch.testing.assert_close(pipeline.encode_reference(parts["encoder"], img), direct)


def test_encode_frames_scales_latents_and_decodes_back_to_frame_shape(parts: dict) -> None:
    vae = parts["vae"]
    frames = torch.rand(2, 3, 5, H, H)  # 10 frames: more than one VAE chunk
    latents = pipeline.encode_frames(vae, frames)
    assert latents.shape == (2, 4, 5, H // 4, H // 4)
    # frame order and batch order survive the per-frame flattening; latents are the scaled means
    with torch.no_grad():
        one = vae.encode(frames[1, :, 3][None] * 2 - 1).latent_dist.mean * vae.config.scaling_factor
    torch.testing.assert_close(latents[1, :, 3], one[0], atol=1e-5, rtol=1e-5)
    back = pipeline.decode_latents(vae, latents)
    assert back.shape == frames.shape and back.min() >= 0 and back.max() <= 1


def test_sample_body_and_face_shapes_range_and_seed(parts: dict, tokens: torch.Tensor) -> None:
    for face in (False, True):
        out = _run(parts, tokens, seed=0, face=face)
        assert out.shape == (B, 3, F, H, H)
        assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
        assert torch.equal(out, _run(parts, tokens, seed=0, face=face))
        assert not torch.allclose(out, _run(parts, tokens, seed=1, face=face))


def test_sample_leaves_the_callers_scheduler_alone(parts: dict, tokens: torch.Tensor) -> None:
    sched = parts["scheduler"]
    sched.set_timesteps(7)
    before = sched.timesteps.clone()
    _run(parts, tokens, seed=0, steps=2)
    assert torch.equal(sched.timesteps, before)


def test_guidance_combines_the_unconditional_and_conditional_branches(parts: dict, tokens: torch.Tensor) -> None:
    model = parts["body"]
    g = torch.Generator().manual_seed(3)
    x, t, cond = torch.randn(B, 4, F, 8, 8, generator=g), torch.tensor(500), _cond()
    with torch.no_grad():
        plain = model(x, t, tokens, cond, control_scale=2.0)
        uncond = model(x, t, torch.zeros_like(tokens), cond, control_scale=2.0)
        one = pipeline.predict_noise(model, x, t, tokens, cond, 1.0, 2.0)
        guided = pipeline.predict_noise(model, x, t, tokens, cond, 3.5, 2.0)
    torch.testing.assert_close(one, plain)
    torch.testing.assert_close(guided, uncond + 3.5 * (plain - uncond), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(guided, plain)
    assert not torch.allclose(_run(parts, tokens, seed=0, guidance=1.0), _run(parts, tokens, seed=0, guidance=3.5))


def test_face_inputs_are_mask_at_latent_size_then_masked_latent(parts: dict) -> None:
    mask = torch.zeros(B, 1, F, H, H)
    mask[:, :, 1, :16] = 1  # top half of the middle frame only
    masked = torch.rand(B, 3, F, H, H)
    extra = pipeline.inpaint_inputs(parts["vae"], mask, masked)
    assert extra.shape == (B, 5, F, 8, 8)
    assert extra[:, 0, 1, :4].eq(1).all() and extra[:, 0, 1, 4:].eq(0).all() and extra[:, 0, [0, 2]].eq(0).all()
    torch.testing.assert_close(extra[:, 1:], pipeline.encode_frames(parts["vae"], masked))


def test_sample_refuses_mismatched_inpaint_inputs(parts: dict, tokens: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="needs mask and masked_image"):
        pipeline.sample(parts["face"], parts["vae"], parts["scheduler"], tokens, _cond(), steps=1,
                        generator=torch.Generator())
    with pytest.raises(ValueError, match="not an inpainting one"):
        pipeline.sample(parts["body"], parts["vae"], parts["scheduler"], tokens, _cond(), steps=1,
                        generator=torch.Generator(), mask=torch.zeros(B, 1, F, H, H), masked_image=_cond())


def test_sd15_shapes_configs_give_the_published_parameter_counts() -> None:
    """Built on the meta device (no memory): the counts of SD1.5's UNet, its ControlNet and AnimateDiff v1.5's
    motion adapter pin every width, depth and head number in the configs."""
    cfg = shapes.sd15_unet_config()
    assert cfg["block_out_channels"] == (320, 640, 1280, 1280) and cfg["cross_attention_dim"] == 768
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
        adapter = MotionAdapter(**shapes.animatediff_v15_adapter_config())
        controlnet = ControlNetModel.from_unet(unet, conditioning_channels=3)
    assert next(unet.parameters()).is_meta
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert sum(p.numel() for p in controlnet.parameters()) == 361_279_120
    assert sum(p.numel() for p in adapter.parameters()) == 453_209_280
    assert adapter.config.motion_max_seq_length == 32 and adapter.config.use_motion_mid_block
