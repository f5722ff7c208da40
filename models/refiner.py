"""The cascade's second stage: a small learned 2× refiner from the SGDM's frames to the output resolution.

A CPU can afford an SGDM whose latent grid is 32 × 32; at 256 px that grid holds 8 × 8-pixel cells, and a model
trained for minutes paints them as blocks. At 128 px (4 × 4 cells) the same grid learns sharp pictures, so the
`cpu` profile denoises at 128 px and this network adds the second octave: it reads the SGDM frame upsampled to
256 px, the mesh condition at 256 px and the reference frame at 256 px, and predicts the missing detail as a
residual. It is deterministic (one pass, no sampling), trained on the identity's own frames against their own
128 px versions, degraded the way a generated frame differs from a real one (`degrade`).

A diffusers `ModelMixin`/`ConfigMixin` (a `UNet2DModel` on space-to-depth inputs inside), saved beside the SGDM in
the body checkpoint's `refiner/` folder and read with `from_pretrained`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

INPUTS = 3  # images the refiner reads: the upsampled frame, the mesh condition, the reference


def residual_unet(inputs: int, channels: tuple[int, ...], layers_per_block: int, unshuffle: int,
                  norm_num_groups: int) -> UNet2DModel:
    """A UNet2DModel reading `inputs` RGB images packed space-to-depth by `unshuffle` and writing one packed RGB
    change, whose last layer starts at zero: a network added to an image leaves it as it is until it has learnt
    something. Its time input is unused (always 0): one deterministic pass."""
    packed = 3 * unshuffle * unshuffle
    depth = len(channels)
    net = UNet2DModel(in_channels=inputs * packed, out_channels=packed, block_out_channels=tuple(channels),
                      layers_per_block=layers_per_block, down_block_types=("DownBlock2D",) * depth,
                      up_block_types=("UpBlock2D",) * depth, norm_num_groups=norm_num_groups, add_attention=False)
    with torch.no_grad():
        net.conv_out.weight.zero_()
        net.conv_out.bias.zero_()
    return net


class Refiner(ModelMixin, ConfigMixin):
    """(B, 3, H/2, W/2) frame in [-1, 1] + (B, 3, H, W) condition and reference in [-1, 1] → (B, 3, H, W)."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, channels: tuple[int, ...] = (32, 64, 128), layers_per_block: int = 1, unshuffle: int = 4,
                 norm_num_groups: int = 8) -> None:
        super().__init__()
        # starts as the plain upsampling: the residual is zero until it has learnt something
        self.net = residual_unet(INPUTS, channels, layers_per_block, unshuffle, norm_num_groups)

    def forward(self, low: torch.Tensor, cond: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        f = self.config.unshuffle
        up = F.interpolate(low, size=cond.shape[-2:], mode="bilinear", align_corners=False)
        x = torch.cat([F.pixel_unshuffle(t, f) for t in (up, cond, reference)], dim=1)
        residual = self.net(x, 0).sample
        return (up + F.pixel_shuffle(residual, f)).clamp(-1, 1)


def degrade(image: torch.Tensor, gen: torch.Generator, max_blur: float = 1.0, max_noise: float = 0.03,
            max_shift: float = 0.01) -> torch.Tensor:
    """A real frame (B, 3, H, W) in [-1, 1] at half size, made to look like a generated one: a random blur (the
    SGDM is softer than the truth), a small brightness/colour drift and pixel noise. The refiner learns to add
    detail to what the SGDM gives, not only to a perfect downscale, so it never sharpens its errors into edges."""
    b = image.shape[0]
    low = F.interpolate(image, scale_factor=0.5, mode="area")
    out = []
    for k in range(b):
        x = low[k:k + 1]
        sigma = float(torch.rand(1, generator=gen)) * max_blur
        if sigma > 0.2:
            radius = max(1, int(round(2 * sigma)))
            grid = torch.arange(-radius, radius + 1, dtype=x.dtype)
            kernel = torch.exp(-grid ** 2 / (2 * sigma ** 2))
            kernel = kernel / kernel.sum()
            x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
            x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
            x = F.conv2d(x, kernel.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)
        drift = (torch.rand(1, 3, 1, 1, generator=gen) * 2 - 1) * max_shift * 2
        noise = torch.randn(x.shape, generator=gen) * float(torch.rand(1, generator=gen)) * max_noise * 2
        out.append(x + drift + noise)
    return torch.cat(out).clamp(-1, 1)
