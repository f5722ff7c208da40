"""The cpu profile's parts: weight-free codecs, the base folder it writes, x0 training, and the baseline scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from core.errors import ParamsError
from models import parts, pipeline, scores
from models.codec import PatchTokens, SpaceToDepth
from tasks import training
from tasks.registry import parse_params
from tasks.stages import metrics


@pytest.fixture(scope="module")
def cpu_paths(tmp_path_factory: pytest.TempPathFactory) -> parts.BasePaths:
    return parts.write_cpu(tmp_path_factory.mktemp("cpu-base"))


def test_space_to_depth_is_lossless_and_loads_from_its_folder(cpu_paths: parts.BasePaths) -> None:
    vae = parts.load_vae(cpu_paths)
    assert isinstance(vae, SpaceToDepth) and pipeline.vae_factor(vae) == 4
    assert vae.config.latent_channels == 48 and parts.vae_factor_from_config(cpu_paths.sd15 / "vae") == 4
    frames = torch.randint(0, 256, (1, 3, 2, 64, 64)).float() / 255
    latents = pipeline.encode_frames(vae, frames)
    assert latents.shape == (1, 48, 2, 16, 16)
    # a pixel lands in one channel of one latent cell: the top-left pixel of frame 1 is channel 0 of cell (0, 0)
    assert latents[0, 0, 1, 0, 0] == pytest.approx(float(frames[0, 0, 1, 0, 0]) * 2 - 1)
    assert torch.allclose(pipeline.decode_latents(vae, latents), frames, atol=1e-6)
    with pytest.raises(ValueError, match="power of two"):
        SpaceToDepth(factor=6)


def test_patch_tokens_are_the_reference_pixels(cpu_paths: parts.BasePaths) -> None:
    encoder = parts.load_image_encoder(cpu_paths)
    assert isinstance(encoder, PatchTokens)
    image = torch.zeros(1, 3, 64, 64)
    image[:, :, :8, 8:16] = 1.0  # only the second patch of the first row is white
    tokens = pipeline.encode_reference(encoder, image)
    assert tokens.shape == (1, 64, 192)
    differs = [i for i in range(64) if not torch.allclose(tokens[0, i], tokens[0, 0])]
    assert differs == [1]
    assert torch.all(tokens[0, 1] > tokens[0, 0])  # its 3 × 8 × 8 values are the white pixels


def test_cpu_base_builds_both_sgdms_with_identity_motion_modules(cpu_paths: parts.BasePaths) -> None:
    body, face = parts.new_sgdm(cpu_paths), parts.new_sgdm(cpu_paths, face=True)
    assert body.unet.config.in_channels == 48 and not body.inpaint
    assert face.unet.config.in_channels == 2 * 48 + 1 and face.inpaint
    assert body.controlnet.config.conditioning_embedding_out_channels == (16, 32, 64)
    sched = parts.load_scheduler(cpu_paths)
    assert sched.config.prediction_type == "sample" and sched.config.beta_schedule == "squaredcos_cap_v2"
    # the frozen motion modules start as the identity: reversing the frames reverses the output, nothing mixes
    body.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 48, 4, 8, 8, generator=g)
    cond = torch.rand(1, 3, 4, 32, 32, generator=g)
    tokens = torch.randn(1, 64, 192, generator=g)
    with torch.no_grad():
        out = body(x, 500, tokens, cond)
        rev = body(x.flip(2), 500, tokens, cond.flip(2))
    assert out.shape == (1, 48, 4, 8, 8)
    assert torch.allclose(out.flip(2), rev, atol=1e-5)
    # so their computation is skipped, exactly; a module that does something is kept
    with torch.no_grad():
        next(body.unet.mid_block.motion_modules[0].proj_out.parameters()).add_(0.01)
        moved = body(x, 500, tokens, cond)
    assert not torch.equal(moved, out)
    assert body.skip_identity_temporal() == 9
    with torch.no_grad():
        assert torch.equal(body(x, 500, tokens, cond), moved)
    assert not any(p.requires_grad for p in body.unet.up_blocks[0].motion_modules.parameters())


def test_base_folder_with_a_stem_that_does_not_meet_the_latents_is_refused(tmp_path: Path) -> None:
    paths = parts.write_cpu(tmp_path)
    (paths.sd15 / parts.BRANCH_FILE).write_text('{"stem": [16, 32]}')
    with pytest.raises(parts.ModelFilesError, match="shrinks images by 2, the VAE by 4"):
        parts.new_sgdm(paths)


def test_loss_target_follows_the_prediction_type(cpu_paths: parts.BasePaths) -> None:
    model = parts.new_sgdm(cpu_paths).eval()
    g = torch.Generator().manual_seed(1)
    batch = {"latents": torch.rand(1, 48, 4, 8, 8, generator=g) * 2 - 1, "tokens": torch.randn(1, 64, 192),
             "cond": torch.rand(1, 3, 4, 32, 32, generator=g)}
    x0 = DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="sample")
    eps = DDIMScheduler.from_config(x0.config, prediction_type="epsilon")
    # the draws loss_on makes: the noise, then the timestep
    draw = torch.Generator().manual_seed(7)
    noise = torch.randn(batch["latents"].shape, generator=draw)
    t = torch.randint(0, 1000, (1,), generator=draw)
    with torch.no_grad():
        pred = model(x0.add_noise(batch["latents"], noise, t), t, batch["tokens"], batch["cond"])
        got_x0 = training.loss_on(model, batch, x0, torch.Generator().manual_seed(7), 0.0, 1.0)
        got_eps = training.loss_on(model, batch, eps, torch.Generator().manual_seed(7), 0.0, 1.0)
    assert float(got_x0) == pytest.approx(float(((pred - batch["latents"]) ** 2).mean()), rel=1e-5)
    assert float(got_eps) == pytest.approx(float(((pred - noise) ** 2).mean()), rel=1e-5)


def test_cpu_is_the_default_profile_and_ema_is_checked() -> None:
    params = parse_params({})
    assert params.profile == "cpu"
    assert params.finetune.for_profile("cpu")["ema"] == 0.995 and params.pretrain.for_profile("cpu")["steps"] == 0
    with pytest.raises(ParamsError, match=r"ema: decays must be in \[0, 1\)"):
        parse_params({"finetune": {"ema": {"tiny": 0.0, "cpu": 1.0, "sd15": 0.0}}})


def test_ssim_counts_only_the_person() -> None:
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), np.float32)
    mask[8:32, 8:32] = 1.0
    changed_outside = real.copy()
    changed_outside[48:, 48:] = 0
    assert scores.ssim_in_mask(changed_outside, real, mask) == pytest.approx(1.0)
    changed_inside = real.copy()
    changed_inside[12:28, 12:28] = 255 - changed_inside[12:28, 12:28]
    assert scores.ssim_in_mask(changed_inside, real, mask) < 0.5
    assert np.isnan(scores.ssim_in_mask(real, real, np.zeros((64, 64))))
    with pytest.raises(ValueError, match="shapes differ"):
        scores.ssim_in_mask(real[:32], real, mask)


def test_nearest_frames_matches_on_points_found_in_both() -> None:
    pool = np.array([[[0, 0], [10, 10]], [[5, 5], [50, 50]], [[np.nan, np.nan], [np.nan, np.nan]]], float)
    query = np.array([[[5, 5], [np.nan, np.nan]],  # only the first point: pool 1 is exact
                      [[1, 1], [11, 11]],  # both points: pool 0
                      [[np.nan, np.nan], [np.nan, np.nan]]], float)  # nothing found: no match
    assert scores.nearest_frames(query, pool).tolist() == [1, 0, -1]
    # a pool frame showing only part of what the query shows loses to one showing all of it, however close
    partial = np.array([[[1, 1], [np.nan, np.nan]], [[9, 9], [19, 19]]], float)
    assert scores.nearest_frames(query[1:2], partial).tolist() == [1]
    with pytest.raises(ValueError, match="poses must be"):
        scores.nearest_frames(query[:, :1], pool)


def test_real_landmarks_outside_the_frame_are_left_out_of_lmd() -> None:
    side = 100
    real = np.zeros((33, 4))
    real[:, :2] = 50.0
    real[27:, 1] = side + 80  # ankles and feet below the crop: MediaPipe's guess, nothing in the picture
    generated = real.copy()
    generated[:, 0] += 3.0  # every point 3 px away ...
    generated[27:, 1] += 40.0  # ... the guessed feet far away
    rows = [{"body": real.ravel().tolist(), "face": None, "left_hand": None, "right_hand": None}] * 2
    gen_rows = [dict(r, body=generated.ravel().tolist()) for r in rows]
    lmd, per_frame = metrics.landmark_scores(gen_rows, rows, side, hand_outlier=0.1)
    assert lmd["lmd_body"]["value"] == pytest.approx(3.0) and lmd["lmd_body"]["pct"] == pytest.approx(3.0)
    assert lmd["lmd_body"]["real_points_outside_frame"] == 2 * 6
    assert per_frame[0]["lmd_body_px"] == pytest.approx(3.0)
    assert lmd["lmd_face"]["value"] is None


def test_inference_scales_are_per_profile() -> None:
    params = parse_params({})
    assert params.render_body.control_scale["cpu"] == 1.0 and params.render_body.control_scale["sd15"] == 2.0
    assert params.face.control_scale == params.render_body.control_scale
    with pytest.raises(ParamsError, match="control_scale needs one value per profile"):
        parse_params({"render_body": {"control_scale": {"cpu": 1.0}}})
    with pytest.raises(ParamsError, match=r"control_scale: scales must be between 0 and 10"):
        parse_params({"face": {"control_scale": {"tiny": 2.0, "cpu": 11.0, "sd15": 2.0}}})
    # one check for every per-profile table, the training ones included
    with pytest.raises(ParamsError, match="steps: values must not be negative"):
        parse_params({"finetune": {"steps": {"tiny": 30, "cpu": -1, "sd15": 1}}})


def test_the_cpu_cascade_and_sampler_are_per_profile_and_a_single_value_holds_for_all() -> None:
    params = parse_params({})
    assert params.finetune.for_profile("cpu")["refiner_steps"] > 0 == params.finetune.for_profile("sd15")[
        "refiner_steps"]
    assert "refiner_steps" not in params.pretrain.for_profile("cpu")  # the refiner learns the identity, in finetune
    assert params.finetune.for_profile("cpu")["perturbed_share"] == 0.0
    assert params.finetune.for_profile("sd15")["perturbed_share"] == 0.5
    for section in (params.render_body, params.face):
        assert (section.scheduler["cpu"], section.steps["cpu"]) == ("dpmpp", 4)
        assert (section.scheduler["sd15"], section.steps["sd15"]) == ("ddim", 20)
    older = parse_params({"render_body": {"steps": 4, "scheduler": "unipc"}, "finetune": {"perturbed_share": 0.3}})
    assert older.render_body.steps == {"tiny": 4, "cpu": 4, "sd15": 4}
    assert set(older.render_body.scheduler.values()) == {"unipc"}
    assert older.finetune.for_profile("tiny")["perturbed_share"] == 0.3
    with pytest.raises(ParamsError, match="scheduler"):
        parse_params({"face": {"scheduler": "euler"}})
    with pytest.raises(ParamsError, match="steps must be between 1 and 1000"):
        parse_params({"face": {"steps": {"tiny": 0, "cpu": 10, "sd15": 20}}})
    with pytest.raises(ParamsError, match="with a refiner the body model renders at half the side"):
        parse_params({"finetune": {"resolution": {"tiny": 64, "cpu": 252, "sd15": 512}}})
    assert parse_params({"finetune": {"resolution": {"tiny": 64, "cpu": 252, "sd15": 512},
                                      "refiner_steps": {"tiny": 0, "cpu": 0, "sd15": 0}}})
    with pytest.raises(ParamsError, match=r"perturbed_share: shares must be in \[0, 1\]"):
        parse_params({"finetune": {"perturbed_share": {"tiny": 0.5, "cpu": 1.5, "sd15": 0.5}}})


def test_the_cpu_mesh_branch_starts_live_and_the_tiny_one_at_zero(cpu_paths: parts.BasePaths,
                                                                   tmp_path: Path) -> None:
    live = parts.new_sgdm(cpu_paths).controlnet
    convs = (*live.controlnet_down_blocks, live.controlnet_mid_block, live.controlnet_cond_embedding.conv_out)
    assert all(torch.count_nonzero(c.weight) > 0 for c in convs)
    # seeded: the same call builds the same branch
    again = parts.new_sgdm(cpu_paths).controlnet
    assert torch.equal(again.controlnet_mid_block.weight, live.controlnet_mid_block.weight)
    zero = parts.new_sgdm(parts.write_tiny(tmp_path / "tiny")).controlnet
    assert all(torch.count_nonzero(c.weight) == 0 for c in zero.controlnet_down_blocks)
    # the input stem likewise: live on cpu, at zero on a base that stands for a pretrained one
    assert torch.count_nonzero(parts.new_sgdm(cpu_paths, conditioning="input").guider.conv_out.weight) > 0
    tiny = parts.new_sgdm(parts.write_tiny(tmp_path / "tiny2"), conditioning="both")
    assert torch.count_nonzero(tiny.guider.conv_out.weight) == 0
