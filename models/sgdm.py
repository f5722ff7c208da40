"""The structure-guided diffusion model (SGDM) and its face variant, assembled from diffusers parts.

- UNet with AnimateDiff motion modules (`UNetMotionModel`): the video prior. Its temporal weights stay frozen in
  every training stage (paper §IV-C1: tuning them causes flicker); spatial weights train.
- A ControlNet-style branch copied from the UNet's encoder (`ControlNetModel.from_unet`, zero-initialised output
  convolutions) reads the rendered mesh; its residuals are added to the UNet with weight W_c (2 at inference).
- Instead of text, the cross-attention of both reads image-CLIP tokens of a reference frame taken before pooling,
  projected to the UNet's cross-attention width when the widths differ. Zero tokens are the dropped reference, the
  unconditional branch of classifier-free guidance.
- The Face SGDM is the same around an inpainting UNet: input = noisy latent, mask and masked-face latent.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import ControlNetModel, MotionAdapter, UNet2DConditionModel, UNetMotionModel
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D
from safetensors.torch import load_file, save_file
from torch import nn

TEMPORAL_KEY = "motion_modules"  # diffusers names every temporal (motion-module) parameter with this
PROJ_FILE = "image_proj.safetensors"
CONFIG_FILE = "sgdm_config.json"


class SGDM(nn.Module):
    def __init__(self, unet: UNetMotionModel, controlnet: ControlNetModel, token_dim: int, inpaint: bool = False
                 ) -> None:
        super().__init__()
        self.unet = unet
        self.controlnet = controlnet
        self.inpaint = inpaint
        self.token_dim = token_dim
        width = unet.config.cross_attention_dim
        self.image_proj = nn.Identity() if token_dim == width else nn.Linear(token_dim, width)

    # -- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_parts(cls, unet2d: UNet2DConditionModel, adapter: MotionAdapter, token_dim: int,
                   stem: tuple[int, ...] = (16, 32, 96, 256)) -> SGDM:
        """A new model: the base UNet with the motion modules inserted, the mesh branch copied from its encoder.
        `stem`: channels of the branch's image stem, one stride-2 step between entries (SD: 512 px → 64 latents)."""
        controlnet = ControlNetModel.from_unet(unet2d, conditioning_channels=3,
                                               conditioning_embedding_out_channels=stem)
        unet = UNetMotionModel.from_unet2d(unet2d, adapter)
        return cls(unet, controlnet, token_dim, inpaint=unet2d.config.in_channels == 2 * unet2d.config.out_channels + 1)

    def save_pretrained(self, path: Path) -> None:
        path = Path(path)
        self.unet.save_pretrained(path / "unet")
        self.controlnet.save_pretrained(path / "controlnet")
        for part in ("unet", "controlnet"):
            _drop_origin(path / part / "config.json")
        save_file({k: v.contiguous() for k, v in self.image_proj.state_dict().items()}, str(path / PROJ_FILE))
        (path / CONFIG_FILE).write_text(json.dumps({"token_dim": self.token_dim, "inpaint": self.inpaint}) + "\n")

    @classmethod
    def from_pretrained(cls, path: Path, torch_dtype: torch.dtype = torch.float32) -> SGDM:
        path = Path(path)
        missing = [p for p in ("unet", "controlnet", PROJ_FILE, CONFIG_FILE) if not (path / p).exists()]
        if missing:
            raise FileNotFoundError(f"{path}: not an SGDM checkpoint (missing {', '.join(missing)})")
        config = json.loads((path / CONFIG_FILE).read_text())
        model = cls(UNetMotionModel.from_pretrained(path / "unet", torch_dtype=torch_dtype),
                    ControlNetModel.from_pretrained(path / "controlnet", torch_dtype=torch_dtype),
                    config["token_dim"], config["inpaint"])
        model.image_proj.load_state_dict(load_file(str(path / PROJ_FILE)))
        model.image_proj.to(torch_dtype)
        return model

    # -- training set-up ------------------------------------------------------------------------------------
    def freeze_temporal(self) -> None:
        """Temporal (motion-module) weights frozen, every spatial weight of UNet and branch trainable."""
        for name, p in self.named_parameters():
            p.requires_grad_(TEMPORAL_KEY not in name)

    def skip_identity_temporal(self) -> int:
        """Motion modules whose output projection is exactly zero return their input unchanged (a residual plus
        zero), yet cost a third of a small model's step; freeze them and skip their computation. Exact: outputs
        are bit-identical. The cpu profile's modules are such; pretrained ones are never zero. Returns how many."""
        skipped = 0
        for module in self.unet.modules():
            if not isinstance(module, AnimateDiffTransformer3D):
                continue
            proj = module.proj_out
            if torch.count_nonzero(proj.weight) or (proj.bias is not None and torch.count_nonzero(proj.bias)):
                continue
            module.requires_grad_(False)
            module.forward = _pass_through
            skipped += 1
        return skipped

    def temporal_parameters(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.named_parameters() if TEMPORAL_KEY in n}

    def spatial_parameters(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.named_parameters() if TEMPORAL_KEY not in n}

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()
        self.controlnet.enable_gradient_checkpointing()

    # -- forward --------------------------------------------------------------------------------------------
    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, ref_tokens: torch.Tensor, cond: torch.Tensor,
                control_scale: float = 1.0) -> torch.Tensor:
        """sample (B, C, F, h, w) latents (C = 9 for the inpainting face model: latent, mask, masked latent);
        ref_tokens (B, N, token_dim); cond (B, 3, F, H, W) mesh images in [0, 1]. Returns the noise prediction
        (B, 4, F, h, w)."""
        b, c, f, h, w = sample.shape
        tokens = self.image_proj(ref_tokens).repeat_interleave(f, dim=0)
        timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(b)
        flat = sample.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        cond_flat = cond.permute(0, 2, 1, 3, 4).reshape(b * f, *cond.shape[1:2], *cond.shape[3:])
        down, mid = self.controlnet(flat, timestep.repeat_interleave(f), encoder_hidden_states=tokens,
                                    controlnet_cond=cond_flat.to(flat.dtype), conditioning_scale=control_scale,
                                    return_dict=False)
        return self.unet(sample, timestep, encoder_hidden_states=tokens, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample


def _drop_origin(config: Path) -> None:
    """diffusers records where a model was loaded from (`_name_or_path`); a checkpoint's bytes must not depend on
    the folder its parent sat in, or the same training in two workspaces would give two model versions."""
    data = json.loads(config.read_text())
    if data.pop("_name_or_path", None) is not None:
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _pass_through(hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    return hidden_states
