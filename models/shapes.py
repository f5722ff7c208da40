"""The full-size SGDM (SD1.5 UNet + AnimateDiff v1.5 motion modules + mesh branch) and the parts it renders with
(SD's VAE, CLIP ViT-L/14's vision tower, SD's DDIM schedule), all with random weights.

No files are needed, so the real architecture's memory and speed can be measured on any machine before anyone
fetches the weights: the shapes are what matter, not the values (`models.bench`).
"""

from __future__ import annotations

import resource
import sys
from typing import Any

from diffusers import AutoencoderKL, DDIMScheduler, MotionAdapter, UNet2DConditionModel
from transformers import CLIPVisionConfig, CLIPVisionModel

from models.sgdm import SGDM
from models.sgdm_pipeline import SGDMPipeline

CLIP_VIT_L14_HIDDEN = 1024  # the SGDM projects it to the UNet's 768-wide cross-attention
CLIP_VIT_L14_TOKENS = 1 + (224 // 14) ** 2


def sd15_unet_config() -> dict[str, Any]:
    """Stable Diffusion 1.5's UNet (runwayml/stable-diffusion-v1-5 unet/config.json, non-default fields)."""
    return dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True,
        freq_shift=0, downsample_padding=1,
    )


def animatediff_v15_adapter_config() -> dict[str, Any]:
    """AnimateDiff's v1.5 (v2) motion adapter in diffusers' MotionAdapter terms."""
    return dict(
        block_out_channels=(320, 640, 1280, 1280), motion_layers_per_block=2, motion_mid_block_layers_per_block=1,
        motion_num_attention_heads=8, motion_norm_num_groups=32, motion_max_seq_length=32, use_motion_mid_block=True,
    )


def sd15_shapes_models(gradient_checkpointing: bool = True) -> SGDM:
    """The body SGDM at full size, randomly initialised (~1.7 G parameters, ~6.7 GB in float32)."""
    unet2d = UNet2DConditionModel(**sd15_unet_config())
    adapter = MotionAdapter(**animatediff_v15_adapter_config())
    model = SGDM.from_parts(unet2d, adapter, CLIP_VIT_L14_HIDDEN)
    del unet2d, adapter  # from_parts copies their weights
    if gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model


def sd15_vae() -> AutoencoderKL:
    """SD 1.5's VAE (factor 8, 4 latent channels), randomly initialised."""
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                         block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215)


def clip_vit_l14() -> CLIPVisionModel:
    """CLIP ViT-L/14's vision tower (224 px, 257 tokens of width 1024), randomly initialised."""
    return CLIPVisionModel(CLIPVisionConfig(hidden_size=CLIP_VIT_L14_HIDDEN, intermediate_size=4096,
                                            num_hidden_layers=24, num_attention_heads=16, image_size=224,
                                            patch_size=14, projection_dim=768))


def sd15_scheduler() -> DDIMScheduler:
    """SD 1.5's noise schedule with DDIM sampling (its scheduler_config.json)."""
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def sd15_shapes_pipeline(resolution: int = 512) -> SGDMPipeline:
    """Everything a full-size body checkpoint renders with, at random: the shapes of an `sd15` render."""
    return SGDMPipeline(sd15_shapes_models(gradient_checkpointing=False).eval(), sd15_vae().eval(),
                        clip_vit_l14().eval(), sd15_scheduler(), resolution)


def peak_rss_mb() -> float:
    """The process's peak resident memory so far (ru_maxrss is KB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10
