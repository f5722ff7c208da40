"""SGDM and Face SGDM on the tiny profile: real diffusers parts, loaded from disk, the video prior kept frozen."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from models import parts
from models.sgdm import SGDM, TEMPORAL_KEY

B, F = 1, 4


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> parts.BasePaths:
    return parts.write_tiny(tmp_path_factory.mktemp("tiny-base"))


@pytest.fixture(scope="module")
def tokens(paths: parts.BasePaths) -> torch.Tensor:
    enc = parts.load_image_encoder(paths)
    with torch.no_grad():
        return enc(pixel_values=torch.rand(B, 3, 32, 32, generator=torch.Generator().manual_seed(0))).last_hidden_state


def _inputs(channels: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, channels, F, 16, 16, generator=g), torch.rand(B, 3, F, 64, 64, generator=g)


def _other_mesh(cond: torch.Tensor) -> torch.Tensor:
    """A different mesh image from its own generator (the global one can replay `cond`'s numbers)."""
    other = torch.rand(cond.shape, generator=torch.Generator().manual_seed(99))
    assert not torch.equal(other, cond)
    return other


def test_tiny_base_is_written_in_sd15_layout_and_loads(paths: parts.BasePaths, tokens: torch.Tensor) -> None:
    parts.check(paths)
    assert json.loads((paths.inpaint / "unet/config.json").read_text())["in_channels"] == 9
    assert parts.vae_factor_from_config(paths.sd15 / "vae") == 4
    # image-CLIP tokens before pooling: the class token and every patch token
    assert tokens.shape == (B, 1 + (32 // 8) ** 2, 32)
    vae = parts.load_vae(paths)
    with torch.no_grad():
        latents = vae.encode(torch.rand(1, 3, 64, 64)).latent_dist.mean
    assert latents.shape == (1, 4, 16, 16)


def test_forward_shapes_and_zero_initialised_mesh_branch(paths: parts.BasePaths, tokens: torch.Tensor) -> None:
    model = parts.new_sgdm(paths).eval()
    x, cond = _inputs()
    with torch.no_grad():
        out = model(x, torch.tensor([10]), tokens, cond)
        other_mesh = model(x, torch.tensor([10]), tokens, _other_mesh(cond))
        no_ref = model(x, torch.tensor([10]), torch.zeros_like(tokens), cond)
    assert out.shape == (B, 4, F, 16, 16) and torch.isfinite(out).all()
    # the branch's output convolutions start at zero: a new model ignores the mesh until it is trained
    assert torch.equal(out, other_mesh)
    # the reference tokens do reach the cross-attention; zeros are the dropped (unconditional) reference
    assert not torch.allclose(out, no_ref)


def test_face_model_takes_latent_mask_and_masked_latent(paths: parts.BasePaths, tokens: torch.Tensor) -> None:
    face = parts.new_sgdm(paths, face=True).eval()
    assert face.inpaint and face.unet.config.in_channels == 9 and face.controlnet.config.in_channels == 9
    x, cond = _inputs(channels=9)
    with torch.no_grad():
        assert face(x, torch.tensor([3]), tokens, cond).shape == (B, 4, F, 16, 16)


def test_training_moves_spatial_weights_and_never_temporal_ones(paths: parts.BasePaths, tokens: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = parts.new_sgdm(paths)
    model.freeze_temporal()
    temporal = model.temporal_parameters()
    assert temporal and all(not p.requires_grad for p in temporal.values())
    assert all(p.requires_grad for p in model.spatial_parameters().values())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x, cond = _inputs()
    target = torch.randn_like(x)
    for _ in range(6):  # the branch's zero convolutions open first, its image stem only after them
        loss = (model(x, torch.tensor([10]), tokens, cond) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in temporal)  # bit-identical
    changed = [n for n in model.spatial_parameters() if not torch.equal(before[n], after[n])]
    assert len(changed) == len(model.spatial_parameters())
    assert any(n.startswith("controlnet.") for n in changed) and any(n.startswith("unet.") for n in changed)
    assert all(TEMPORAL_KEY not in n for n in changed)
    # once trained, the mesh branch matters (after a few small steps only slightly: exactly unequal is the test)
    with torch.no_grad():
        assert not torch.equal(model(x, torch.tensor([10]), tokens, cond),
                               model(x, torch.tensor([10]), tokens, _other_mesh(cond)))


def test_checkpoint_round_trip(paths: parts.BasePaths, tokens: torch.Tensor, tmp_path: Path) -> None:
    model = parts.new_sgdm(paths).eval()
    model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt/unet/diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "ckpt/controlnet/config.json").is_file()
    loaded = SGDM.from_pretrained(tmp_path / "ckpt").eval()
    assert model.state_dict().keys() == loaded.state_dict().keys()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    x, cond = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x, torch.tensor([7]), tokens, cond),
                                   loaded(x, torch.tensor([7]), tokens, cond), atol=1e-5, rtol=1e-5)
    with pytest.raises(FileNotFoundError, match="not an SGDM checkpoint .missing controlnet"):
        shutil.rmtree(tmp_path / "ckpt/controlnet")
        SGDM.from_pretrained(tmp_path / "ckpt")


def test_clip_width_differing_from_cross_attention_is_projected(paths: parts.BasePaths, tmp_path: Path) -> None:
    wide = tmp_path / "image_encoder"
    shutil.copytree(paths.image_encoder, wide)
    from transformers import CLIPVisionConfig, CLIPVisionModel

    CLIPVisionModel(CLIPVisionConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, image_size=32, patch_size=8)).save_pretrained(wide)
    model = parts.new_sgdm(parts.BasePaths(paths.sd15, paths.inpaint, wide, paths.motion_adapter)).eval()
    assert isinstance(model.image_proj, torch.nn.Linear) and model.image_proj.in_features == 48
    x, cond = _inputs()
    with torch.no_grad():
        assert model(x, torch.tensor([1]), torch.randn(B, 17, 48), cond).shape == (B, 4, F, 16, 16)


def test_missing_or_wrong_model_directories_are_named(paths: parts.BasePaths, tmp_path: Path) -> None:
    gone = parts.BasePaths(tmp_path / "nope", paths.inpaint, paths.image_encoder, paths.motion_adapter)
    with pytest.raises(parts.ModelFilesError, match=r"sd15: .*nope is not a directory .*unet/config.json"):
        parts.new_sgdm(gone)
    empty = tmp_path / "adapter"
    empty.mkdir()
    with pytest.raises(parts.ModelFilesError, match=r"motion_adapter: .*adapter has no config.json"):
        parts.check(parts.BasePaths(paths.sd15, paths.inpaint, paths.image_encoder, empty))
    # an ordinary UNet where the inpainting one belongs
    with pytest.raises(parts.ModelFilesError, match="has 4 input channels; an inpainting UNet has 9"):
        parts.new_sgdm(parts.BasePaths(paths.sd15, paths.sd15, paths.image_encoder, paths.motion_adapter), face=True)


def _reference(seed: int = 5) -> torch.Tensor:
    return torch.rand(B, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("conditioning", ["input", "both"])
def test_mesh_and_reference_at_the_input(paths: parts.BasePaths, tokens: torch.Tensor, tmp_path: Path,
                                         conditioning: str) -> None:
    model = parts.new_sgdm(paths, conditioning=conditioning).eval()
    assert model.conditioning == conditioning
    assert (model.controlnet is None) == (conditioning == "input")
    with torch.no_grad():  # the tiny base starts its stems at zero, as SD's would: open it as training would
        torch.nn.init.normal_(model.guider.conv_out.weight, std=0.1)
    x, cond = _inputs()
    t = torch.tensor([10])
    with torch.no_grad():
        out = model(x, t, tokens, cond, reference=_reference())
        # the mesh and the reference frame both reach the UNet through its first layer
        assert not torch.allclose(out, model(x, t, tokens, _other_mesh(cond), reference=_reference()))
        assert not torch.allclose(out, model(x, t, tokens, cond, reference=_reference(6)))
        # the stem's features live for one call only: a later pass of the UNet alone gets none of them
        assert model._guidance is None
        # guidance's unconditional branch drops the frame with its tokens: a blank frame, as training dropped it
        from models import pipeline

        blank = model(x, t, torch.zeros_like(tokens), cond, reference=torch.zeros_like(_reference()))
        guided = pipeline.predict_noise(model, x, t, tokens, cond, 3.0, 1.0, reference=_reference())
        torch.testing.assert_close(guided, blank + 3.0 * (out - blank), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match=r"reads the reference frame at its input: pass reference \(1, 3, 64, 64\)"):
        model(x, t, tokens, cond)
    model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt/controlnet").is_dir() == (conditioning == "both")
    assert json.loads((tmp_path / "ckpt/sgdm_config.json").read_text())["conditioning"] == conditioning
    loaded = SGDM.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.conditioning == conditioning
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, tokens, cond, reference=_reference()), out, atol=1e-5, rtol=1e-5)
    (tmp_path / "ckpt/input_guider.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing input_guider.safetensors"):
        SGDM.from_pretrained(tmp_path / "ckpt")


def test_a_branch_checkpoint_keeps_its_config_and_an_unknown_place_is_refused(paths: parts.BasePaths,
                                                                              tmp_path: Path) -> None:
    parts.new_sgdm(paths).save_pretrained(tmp_path / "ckpt")
    # the bytes checkpoints made before the input stem had: they load as the branch they are
    assert json.loads((tmp_path / "ckpt/sgdm_config.json").read_text()) == {"token_dim": 32, "inpaint": False}
    assert not (tmp_path / "ckpt/input_guider.safetensors").exists()
    assert SGDM.from_pretrained(tmp_path / "ckpt").conditioning == "branch"
    with pytest.raises(ValueError, match="conditioning 'skip': choose branch, input, both"):
        parts.new_sgdm(paths, conditioning="skip")
