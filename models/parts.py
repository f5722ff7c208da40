"""Base weights the SGDMs start from, always read with `from_pretrained` from local diffusers-layout folders.

`sd15` points at real local directories (Stable Diffusion 1.5, SD inpainting, a CLIP vision encoder, an
AnimateDiff motion adapter). `tiny` and `cpu` are written in the same layout on first use, so every profile goes
through exactly the loading code a GPU machine uses:

- `tiny`: small random-initialised configs, milliseconds per step; proves the plumbing, its pictures are noise.
- `cpu`: the architecture sized to learn one person from scratch on a 2-core CPU (docs/cpu-profile.md): the SGDM
  at 128 px, a learned 2× refiner (trained in finetune) to 256 px.
  Nothing in it needs pretrained weights: the VAE is the lossless `SpaceToDepth` codec, the image encoder is
  `PatchTokens`, the UNets start random, and the motion modules are written with zero output projections, so the
  frozen video prior is the identity until real AnimateDiff weights replace it (none exist that fit these widths).
  Its scheduler predicts x0 ("sample") on a cosine schedule with trailing timesteps: what small models trained
  briefly in pixel space learn fastest and sample best in few steps.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, MotionAdapter, UNet2DConditionModel
from transformers import CLIPVisionConfig, CLIPVisionModel

from models.codec import PatchTokens, SpaceToDepth, load_codec, load_encoder, saved_class
from models.sgdm import SGDM


class ModelFilesError(FileNotFoundError):
    """A configured model directory is missing or is not what it should be."""


@dataclass(frozen=True)
class BasePaths:
    sd15: Path  # unet/, vae/, scheduler/
    inpaint: Path  # unet/ with 9 input channels
    image_encoder: Path  # a CLIP vision model
    motion_adapter: Path  # an AnimateDiff MotionAdapter


EXPECT = {
    "sd15": ("unet/config.json", "vae/config.json", "scheduler/scheduler_config.json"),
    "inpaint": ("unet/config.json",),
    "image_encoder": ("config.json",),
    "motion_adapter": ("config.json",),
}
BRANCH_FILE = "mesh_branch.json"  # optional, in the sd15 folder: the mesh branch's image stem channels


def check(paths: BasePaths) -> None:
    """One clear error naming the directory and what it should hold, before anything heavy loads."""
    for field, files in EXPECT.items():
        root = Path(getattr(paths, field))
        if not root.is_dir():
            raise ModelFilesError(f"{field}: {root} is not a directory (expected a local diffusers/transformers "
                                  f"folder holding {', '.join(files)})")
        missing = [f for f in files if not (root / f).is_file()]
        if missing:
            raise ModelFilesError(f"{field}: {root} has no {', '.join(missing)} (is it the right folder?)")


def write_tiny(root: Path, seed: int = 0) -> BasePaths:
    """Small random-initialised base models in the SD1.5 folder layout (a few ms per step on a CPU)."""
    torch.manual_seed(seed)
    paths = BasePaths(root / "sd15", root / "sd15_inpaint", root / "image_encoder", root / "motion_adapter")
    unet_cfg = dict(sample_size=16, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
                    norm_num_groups=8)
    UNet2DConditionModel(in_channels=4, **unet_cfg).save_pretrained(paths.sd15 / "unet")
    UNet2DConditionModel(in_channels=9, **unet_cfg).save_pretrained(paths.inpaint / "unet")
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32),
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        norm_num_groups=8, sample_size=64)
    # like SD's 0.18215, a scaling factor that gives latents unit variance, here measured on smooth random images;
    # with the default the random encoder's latents would be tiny next to the diffusion noise
    smooth = torch.nn.functional.interpolate(torch.rand(8, 3, 8, 8), size=(64, 64), mode="bilinear") * 2 - 1
    with torch.no_grad():
        spread = float(vae.encode(smooth).latent_dist.mean.std())
    vae.register_to_config(scaling_factor=round(1.0 / spread, 4))
    vae.save_pretrained(paths.sd15 / "vae")
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                  set_alpha_to_one=False).save_pretrained(paths.sd15 / "scheduler")
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     image_size=32, patch_size=8)).save_pretrained(paths.image_encoder)
    MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=1, motion_num_attention_heads=2,
                  motion_norm_num_groups=8, motion_max_seq_length=32).save_pretrained(paths.motion_adapter)
    return paths


def write_cpu(root: Path, seed: int = 0, factor: int = 4, resolution: int = 128) -> BasePaths:
    """The `cpu` profile's starting point: 128 px frames as (3·f²)×(128/f)² lossless latents (the 2× refiner the
    finetune learns makes the 256 px output), a three-level UNet (64, 128, 128) with one layer per block and
    attention (reference cross-attention) only at the lowest level."""
    torch.manual_seed(seed)
    paths = BasePaths(root / "sd15", root / "sd15_inpaint", root / "image_encoder", root / "motion_adapter")
    codec = SpaceToDepth(factor=factor)
    latent = codec.config.latent_channels
    unet_cfg = dict(sample_size=resolution // factor, out_channels=latent, layers_per_block=1,
                    block_out_channels=(64, 128, 128),
                    down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"), cross_attention_dim=128,
                    attention_head_dim=32, norm_num_groups=32)
    UNet2DConditionModel(in_channels=latent, **unet_cfg).save_pretrained(paths.sd15 / "unet")
    UNet2DConditionModel(in_channels=2 * latent + 1, **unet_cfg).save_pretrained(paths.inpaint / "unet")
    codec.save_pretrained(paths.sd15 / "vae")
    # the branch's zero convolutions protect a pretrained UNet from an untrained branch; from scratch there is
    # nothing to protect, and a live start lets the mesh steer from the first step (measured: SSIM in the person
    # 0.658 against 0.643 after 800 steps, with lr 5e-4 against 2e-4)
    (paths.sd15 / BRANCH_FILE).write_text(json.dumps({"stem": [16, 32, 64, 128][: int(math.log2(factor)) + 1],
                                                      "zero_start": False}) + "\n")
    DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="sample", clip_sample=True,
                  clip_sample_range=1.0, set_alpha_to_one=True, timestep_spacing="trailing"
                  ).save_pretrained(paths.sd15 / "scheduler")
    PatchTokens(image_size=64, patch_size=8).save_pretrained(paths.image_encoder)
    adapter = MotionAdapter(block_out_channels=(64, 128, 128), motion_layers_per_block=1,
                            motion_num_attention_heads=4, motion_norm_num_groups=32, motion_max_seq_length=32)
    with torch.no_grad():  # identity at start: a frozen random temporal layer would only add fixed noise
        for name, p in adapter.named_parameters():
            if ".proj_out." in name:
                p.zero_()
    adapter.save_pretrained(paths.motion_adapter)
    return paths


def load_vae(paths: BasePaths, dtype: torch.dtype = torch.float32) -> AutoencoderKL | SpaceToDepth:
    return load_codec(paths.sd15 / "vae", dtype)


def load_scheduler(paths: BasePaths) -> DDIMScheduler:
    return DDIMScheduler.from_pretrained(paths.sd15 / "scheduler")


def load_image_encoder(paths: BasePaths, dtype: torch.dtype = torch.float32) -> CLIPVisionModel | PatchTokens:
    return load_encoder(paths.image_encoder, dtype)


def _token_dim(paths: BasePaths) -> int:
    if saved_class(paths.image_encoder) == PatchTokens.__name__:
        return int(PatchTokens.load_config(paths.image_encoder)["hidden_size"])
    return CLIPVisionConfig.from_pretrained(paths.image_encoder).hidden_size


def new_sgdm(paths: BasePaths, *, face: bool = False, dtype: torch.dtype = torch.float32, seed: int = 0,
             conditioning: str = "branch") -> SGDM:
    """A fresh (body or face) SGDM from the base weights: the video prior inserted, the mesh branch copied and/or
    an input stem added (`conditioning`, models.sgdm). The new parts are initialised from `seed`, so the same call
    builds the same model."""
    check(paths)
    unet2d = UNet2DConditionModel.from_pretrained((paths.inpaint if face else paths.sd15) / "unet", torch_dtype=dtype)
    latent = int(json.loads((paths.sd15 / "vae" / "config.json").read_text())["latent_channels"])
    if face and unet2d.config.in_channels != 2 * latent + 1:
        raise ModelFilesError(f"inpaint: {paths.inpaint / 'unet'} has {unet2d.config.in_channels} input channels; "
                              f"an inpainting UNet has {2 * latent + 1} (latent, mask, masked latent)")
    adapter = MotionAdapter.from_pretrained(paths.motion_adapter, torch_dtype=dtype)
    factor = int(vae_factor_from_config(paths.sd15 / "vae"))
    # the mesh branch's input stem must shrink images by the VAE's factor to meet the latents
    branch = paths.sd15 / BRANCH_FILE
    config = json.loads(branch.read_text()) if branch.is_file() else {}
    stem = tuple(config.get("stem") or (16, 32, 96, 256)[: int(math.log2(factor)) + 1])
    if len(stem) != int(math.log2(factor)) + 1:
        raise ModelFilesError(f"{branch}: a stem of {len(stem)} stages shrinks images by {2 ** (len(stem) - 1)}, "
                              f"the VAE by {factor}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SGDM.from_parts(unet2d, adapter, _token_dim(paths), stem, conditioning)
        if not config.get("zero_start", True):
            cn = model.controlnet
            convs = [*cn.controlnet_down_blocks, cn.controlnet_mid_block, cn.controlnet_cond_embedding.conv_out
                     ] if cn is not None else []
            for conv in (*convs, *([model.guider.conv_out] if model.guider is not None else [])):
                conv.reset_parameters()
    return model if dtype == torch.float32 else model.to(dtype)


def vae_factor_from_config(vae_dir: Path) -> int:
    config = json.loads((vae_dir / "config.json").read_text())
    if "factor" in config:
        return int(config["factor"])
    return 2 ** (len(config["block_out_channels"]) - 1)
