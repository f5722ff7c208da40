"""Stand-ins for the VAE and the CLIP image encoder that need no training: the `cpu` profile's image codecs.

No pretrained autoencoder or CLIP can be downloaded, and training one on a minute of video would eat the whole CPU
budget. Both jobs have exact, weight-free answers:

- `SpaceToDepth` replaces the VAE: `pixel_unshuffle` by `factor` is a lossless latent (3·f² channels at 1/f size),
  so the diffusion model sees every pixel and decoding is exact. It answers the calls the pipeline makes of a VAE
  (`encode(x).latent_dist.mean`, `decode(z).sample`, `config.latent_channels`, `config.scaling_factor`).
- `PatchTokens` replaces CLIP: the reference image, resized and cut into patches, one token per patch (its pixels).
  The SGDM's trained input projection maps them to the cross-attention width, so the reference path is learned
  end to end like every other weight.

Both are diffusers `ModelMixin`/`ConfigMixin` models, saved and read with `save_pretrained`/`from_pretrained` like
the real parts, and `load_codec` / `load_encoder` pick the class from the saved config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from transformers import CLIPVisionModel


@dataclass
class _Dist:
    mean: torch.Tensor  # a point mass: the representation is deterministic


@dataclass
class _Encoded:
    latent_dist: _Dist


@dataclass
class _Decoded:
    sample: torch.Tensor


@dataclass
class _Tokens:
    last_hidden_state: torch.Tensor


class SpaceToDepth(ModelMixin, ConfigMixin):
    """Lossless latents: images (B, 3, H, W) in [-1, 1] ↔ (B, 3·f², H/f, W/f)."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, factor: int = 8, in_channels: int = 3, latent_channels: int | None = None,
                 scaling_factor: float = 1.0) -> None:
        super().__init__()
        if factor < 1 or factor & (factor - 1):
            raise ValueError(f"factor {factor}: must be a power of two")
        expected = in_channels * factor * factor
        if latent_channels not in (None, expected):
            raise ValueError(f"latent_channels {latent_channels}: pixel_unshuffle by {factor} of {in_channels} "
                             f"channels gives {expected}")
        self.register_to_config(latent_channels=expected)
        # the pipeline asks a module for its device and dtype; this one has no weights, so it carries a marker
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def encode(self, x: torch.Tensor) -> _Encoded:
        return _Encoded(_Dist(F.pixel_unshuffle(x, self.config.factor)))

    def decode(self, z: torch.Tensor) -> _Decoded:
        return _Decoded(F.pixel_shuffle(z, self.config.factor))


class PatchTokens(ModelMixin, ConfigMixin):
    """Reference tokens without a trained encoder: (B, 3, H, W) → (B, (size/patch)², 3·patch²) pixel patches."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, image_size: int = 64, patch_size: int = 8, hidden_size: int | None = None) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.register_to_config(hidden_size=3 * patch_size * patch_size)
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> _Tokens:
        patches = F.pixel_unshuffle(pixel_values, self.config.patch_size)  # (B, 3p², n, n)
        return _Tokens(patches.flatten(2).transpose(1, 2))


def device_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where a module computes: its first parameter, else its first buffer (the weight-free codecs)."""
    for t in (*module.parameters(), *module.buffers()):
        return t.device, t.dtype
    return torch.device("cpu"), torch.float32


def saved_class(folder: Path, config: str = "config.json") -> str | None:
    """The `_class_name` a part was saved with (None when the folder has no readable config)."""
    try:
        return json.loads((Path(folder) / config).read_text()).get("_class_name")
    except (OSError, ValueError):
        return None


def _weightless(cls: type, folder: Path, dtype: torch.dtype) -> SpaceToDepth | PatchTokens:
    """The codecs have a config and no weights: `from_pretrained` would look for a weights file."""
    model = cls.from_config(cls.load_config(folder))
    return model if dtype == torch.float32 else model.to(dtype)  # a same-dtype cast only makes diffusers warn


def load_codec(folder: Path, dtype: torch.dtype = torch.float32) -> AutoencoderKL | SpaceToDepth:
    """SD's VAE or the space-to-depth codec, whichever the folder holds."""
    if saved_class(folder) == SpaceToDepth.__name__:
        return _weightless(SpaceToDepth, folder, dtype)
    return AutoencoderKL.from_pretrained(folder, torch_dtype=dtype)


def load_encoder(folder: Path, dtype: torch.dtype = torch.float32) -> CLIPVisionModel | PatchTokens:
    """A CLIP vision model or the pixel-patch encoder, whichever the folder holds."""
    if saved_class(folder) == PatchTokens.__name__:
        return _weightless(PatchTokens, folder, dtype)
    return CLIPVisionModel.from_pretrained(folder, torch_dtype=dtype)
