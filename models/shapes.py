"""The full-size SGDM (SD1.5 UNet + AnimateDiff v1.5 motion modules + mesh branch) with random weights.

No files are needed, so the real architecture's memory and step time can be measured on any machine before
anyone fetches the weights: the shapes are what matter, not the values.
"""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

import torch
from diffusers import MotionAdapter, UNet2DConditionModel

from models.sgdm import SGDM

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


def peak_rss_mb() -> float:
    """The process's peak resident memory so far (ru_maxrss is KB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def time_train_step(model: SGDM, size: int = 256, frames: int = 4, batch: int = 1, seed: int = 0) -> dict[str, float]:
    """One training forward + backward (temporal frozen, checkpointing on, no optimiser) on random inputs at image
    size `size`. Peak RSS is the process's, so it includes building the model: what a training run needs too."""
    model.freeze_temporal()
    model.enable_gradient_checkpointing()
    model.train()
    g = torch.Generator().manual_seed(seed)
    latent = size // 8
    channels = model.unet.config.in_channels
    x = torch.randn(batch, channels, frames, latent, latent, generator=g)
    cond = torch.rand(batch, 3, frames, size, size, generator=g)
    tokens = torch.randn(batch, CLIP_VIT_L14_TOKENS, model.token_dim, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    target = torch.randn(batch, 4, frames, latent, latent, generator=g)
    start = time.perf_counter()
    loss = torch.nn.functional.mse_loss(model(x, t, tokens, cond), target)
    loss.backward()
    elapsed = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.zero_grad(set_to_none=True)
    return {"step_s": elapsed, "peak_rss_mb": peak_rss_mb(), "params_m": params / 1e6,
            "trainable_m": trainable / 1e6, "loss": float(loss)}


if __name__ == "__main__":
    import json

    built = time.perf_counter()
    sgdm = sd15_shapes_models()
    print(json.dumps({"build_s": time.perf_counter() - built, "after_build_rss_mb": peak_rss_mb(),
                      **time_train_step(sgdm)}))
