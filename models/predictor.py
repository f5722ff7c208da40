"""The deterministic half of "predict and refine": mesh condition + reference frame → the frame, in one pass.

For one person and an exact mesh the frame is nearly a function of the mesh; a regressor's answer is the central
picture (the mean under squared error, the median under L1), and a diffusion model trained briefly from nothing
samples a blurred version of it at best (Blau & Michaeli 2018; ../shared/DESIGN.md §14). So a plain regressor learns
the central picture first: a UNet whose first layer reads the mesh condition and the identity's reference frame side
by side (both at the frame's resolution, so static detail — background, clothes, glasses — is there to copy),
trained with L1 and SSIM on the identity's own frames. Its output is the reference plus a learnt change, so what
never moves in the shot is right from the first step. It learns against one reference, kept with its weights (`side`
> 0): "what changes from this frame" is a narrower question than "what changes from any frame", and a render asks
only the first (measured on the seated clip: SSIM in the person 0.70 after 400 steps; with a random training frame
as reference a larger network stayed at 0.59, the reference itself, after 1,500 steps). The SGDM then adds what the
regressor's picture lacks, sampling from the prediction at moderate noise (`SGDMPipeline`'s `strength`).

A diffusers `ModelMixin`/`ConfigMixin` (a `UNet2DModel` on space-to-depth inputs inside), saved in the body
checkpoint's `predictor/` folder and read with `from_pretrained`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from models.refiner import residual_unet

INPUTS = 2  # images the predictor reads by default: the mesh condition and the reference frame


class Predictor(ModelMixin, ConfigMixin):
    """(B, 3, H, W) mesh condition and reference frame in [-1, 1] → (B, 3, H, W) frame in [-1, 1]; with `side`, the
    reference is its own (`remember`), a side × side frame saved with the weights. With `inputs` > 2 it reads more
    images beside them (the face detail model: the body's own face too); the change is still from the reference."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, channels: tuple[int, ...] = (32, 64, 128), layers_per_block: int = 1, unshuffle: int = 4,
                 norm_num_groups: int = 8, side: int = 0, inputs: int = INPUTS) -> None:
        super().__init__()
        # starts as the reference itself: the change is zero until it has learnt one
        self.net = residual_unet(inputs, channels, layers_per_block, unshuffle, norm_num_groups)
        self.register_buffer("reference", torch.zeros(3, side, side) if side else None)

    @property
    def own_reference(self) -> bool:
        return self.reference is not None

    def remember(self, reference: torch.Tensor) -> None:
        """Keep `reference` (3, side, side) in [-1, 1] as the frame every prediction starts from."""
        if self.reference is None or reference.shape != self.reference.shape:
            raise ValueError(f"reference {tuple(reference.shape)}: this predictor keeps one of "
                             f"{None if self.reference is None else tuple(self.reference.shape)}")
        with torch.no_grad():
            self.reference.copy_(reference)

    def forward(self, cond: torch.Tensor, reference: torch.Tensor | None = None, *more: torch.Tensor) -> torch.Tensor:
        if 2 + len(more) != self.config.inputs:
            raise ValueError(f"this predictor reads {self.config.inputs} images, given {2 + len(more)}")
        if reference is None:
            if self.reference is None:
                raise ValueError("this predictor keeps no reference of its own: pass one")
            reference = self.reference.expand(len(cond), -1, -1, -1)
        f = self.config.unshuffle
        if cond.shape[-1] % f or cond.shape[-2] % f:
            raise ValueError(f"predictor input {tuple(cond.shape[-2:])} is not a multiple of its grid cell {f}")
        x = torch.cat([F.pixel_unshuffle(image, f) for image in (cond, reference, *more)], dim=1)
        change = F.pixel_shuffle(self.net(x, 0).sample, f)
        return (reference + change).clamp(-1, 1)
