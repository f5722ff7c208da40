"""The structure-guided diffusion model (SGDM) and its face variant, assembled from diffusers parts.

- UNet with AnimateDiff motion modules (`UNetMotionModel`): the video prior. Its temporal weights stay frozen in
  every training stage (paper §IV-C1: tuning them causes flicker); spatial weights train.
- Where the mesh (and the reference frame) enter is the model's `conditioning`:
  - `branch` (the paper's): a ControlNet-style branch copied from the UNet's encoder (`ControlNetModel.from_unet`,
    zero-initialised output convolutions) reads the rendered mesh; its residuals are added to the UNet with weight
    W_c (2 at inference). It converges fast when it starts from pretrained SD 1.5, late when it learns from nothing;
  - `input`: a small image stem (the pose guider of Animate Anyone and its peers) reads the mesh and the reference
    frame, stacked as six channels at the model's resolution, and adds its features to the UNet's first layer
    (`conv_in`), so the mesh steers from the first step and static detail (background, clothes) is there to copy. No
    branch;
  - `both`: the two together.
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
from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D
from safetensors.torch import load_file, save_file
from torch import nn

TEMPORAL_KEY = "motion_modules"  # diffusers names every temporal (motion-module) parameter with this
PROJ_FILE = "image_proj.safetensors"
CONFIG_FILE = "sgdm_config.json"
GUIDER_FILE = "input_guider.safetensors"
CONDITIONING = ("branch", "input", "both")  # where the mesh enters: the paper's branch, the UNet's input, or both
GUIDER_INPUTS = 6  # the input stem reads the mesh condition and the reference frame, RGB each


class SGDM(nn.Module):
    def __init__(self, unet: UNetMotionModel, controlnet: ControlNetModel | None, token_dim: int,
                 inpaint: bool = False, guider_stem: tuple[int, ...] = ()) -> None:
        super().__init__()
        if controlnet is None and not guider_stem:
            raise ValueError("an SGDM needs the mesh somewhere: a branch, an input stem, or both")
        self.unet = unet
        self.controlnet = controlnet
        self.inpaint = inpaint
        self.token_dim = token_dim
        width = unet.config.cross_attention_dim
        self.image_proj = nn.Identity() if token_dim == width else nn.Linear(token_dim, width)
        self.guider_stem = tuple(guider_stem)
        self.guider = None
        self._guidance: torch.Tensor | None = None  # the stem's features for the forward pass under way
        if guider_stem:
            self.guider = ControlNetConditioningEmbedding(unet.config.block_out_channels[0], GUIDER_INPUTS,
                                                          self.guider_stem)
            # added to conv_in's output inside UNetMotionModel.forward, which has no argument for it
            unet.conv_in.register_forward_hook(self._add_guidance)

    @property
    def conditioning(self) -> str:
        """Where the mesh enters: `branch`, `input` or `both` (CONDITIONING)."""
        if self.guider is None:
            return "branch"
        return "both" if self.controlnet is not None else "input"

    def _add_guidance(self, _module: nn.Module, _args: object, output: torch.Tensor) -> torch.Tensor:
        return output if self._guidance is None else output + self._guidance.to(output.dtype)

    # -- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_parts(cls, unet2d: UNet2DConditionModel, adapter: MotionAdapter, token_dim: int,
                   stem: tuple[int, ...] = (16, 32, 96, 256), conditioning: str = "branch") -> SGDM:
        """A new model: the base UNet with the motion modules inserted, the mesh branch copied from its encoder
        and/or an input stem (`conditioning`). `stem`: channels of the image stems (branch and input alike), one
        stride-2 step between entries (SD: 512 px → 64 latents)."""
        if conditioning not in CONDITIONING:
            raise ValueError(f"conditioning {conditioning!r}: choose {', '.join(CONDITIONING)}")
        controlnet = (ControlNetModel.from_unet(unet2d, conditioning_channels=3,
                                                conditioning_embedding_out_channels=stem)
                      if conditioning != "input" else None)
        unet = UNetMotionModel.from_unet2d(unet2d, adapter)
        return cls(unet, controlnet, token_dim, inpaint=unet2d.config.in_channels == 2 * unet2d.config.out_channels + 1,
                   guider_stem=stem if conditioning != "branch" else ())

    def save_pretrained(self, path: Path) -> None:
        path = Path(path)
        self.unet.save_pretrained(path / "unet")
        _drop_origin(path / "unet" / "config.json")
        if self.controlnet is not None:
            self.controlnet.save_pretrained(path / "controlnet")
            _drop_origin(path / "controlnet" / "config.json")
        save_file({k: v.contiguous() for k, v in self.image_proj.state_dict().items()}, str(path / PROJ_FILE))
        if self.guider is not None:
            save_file({k: v.contiguous() for k, v in self.guider.state_dict().items()}, str(path / GUIDER_FILE))
        config = {"token_dim": self.token_dim, "inpaint": self.inpaint}
        if self.guider is not None:  # a branch-only model writes the config it always wrote
            config |= {"conditioning": self.conditioning, "guider_stem": list(self.guider_stem)}
        (path / CONFIG_FILE).write_text(json.dumps(config) + "\n")

    @classmethod
    def from_pretrained(cls, path: Path, torch_dtype: torch.dtype = torch.float32) -> SGDM:
        path = Path(path)
        config = json.loads((path / CONFIG_FILE).read_text()) if (path / CONFIG_FILE).is_file() else {}
        conditioning = config.get("conditioning", "branch")  # checkpoints from before the input stem: the branch
        needed = ("unet", PROJ_FILE, CONFIG_FILE, *(("controlnet",) if conditioning != "input" else ()),
                  *((GUIDER_FILE,) if conditioning != "branch" else ()))
        missing = [p for p in needed if not (path / p).exists()]
        if missing:
            raise FileNotFoundError(f"{path}: not an SGDM checkpoint (missing {', '.join(missing)})")
        controlnet = (ControlNetModel.from_pretrained(path / "controlnet", torch_dtype=torch_dtype)
                      if conditioning != "input" else None)
        model = cls(UNetMotionModel.from_pretrained(path / "unet", torch_dtype=torch_dtype), controlnet,
                    config["token_dim"], config["inpaint"], tuple(config.get("guider_stem", ())))
        model.image_proj.load_state_dict(load_file(str(path / PROJ_FILE)))
        if model.guider is not None:
            model.guider.load_state_dict(load_file(str(path / GUIDER_FILE)))
        for part in (model.image_proj, model.guider):
            if part is not None:
                part.to(torch_dtype)
        return model

    # -- training set-up ------------------------------------------------------------------------------------
    def freeze_temporal(self) -> None:
        """Temporal (motion-module) weights frozen, every spatial weight of UNet, branch and input stem trainable."""
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
        if self.controlnet is not None:
            self.controlnet.enable_gradient_checkpointing()

    # -- forward --------------------------------------------------------------------------------------------
    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, ref_tokens: torch.Tensor, cond: torch.Tensor,
                control_scale: float = 1.0, reference: torch.Tensor | None = None) -> torch.Tensor:
        """sample (B, C, F, h, w) latents (C = 9 for the inpainting face model: latent, mask, masked latent);
        ref_tokens (B, N, token_dim); cond (B, 3, F, H, W) mesh images in [0, 1]; reference (B, 3, H, W) the
        reference frame in [0, 1] at the mesh's side (zeros: dropped, like zero tokens), which a model with an input
        stem needs. Returns the noise prediction (B, 4, F, h, w)."""
        b, c, f, h, w = sample.shape
        tokens = self.image_proj(ref_tokens).repeat_interleave(f, dim=0)
        timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(b)
        flat = sample.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        cond_flat = cond.permute(0, 2, 1, 3, 4).reshape(b * f, *cond.shape[1:2], *cond.shape[3:]).to(flat.dtype)
        down = mid = None
        if self.controlnet is not None:
            down, mid = self.controlnet(flat, timestep.repeat_interleave(f), encoder_hidden_states=tokens,
                                        controlnet_cond=cond_flat, conditioning_scale=control_scale,
                                        return_dict=False)
        if self.guider is not None:
            wanted = (b, 3, *cond.shape[3:])
            if reference is None or reference.shape != wanted:
                got = None if reference is None else tuple(reference.shape)
                raise ValueError(f"this SGDM reads the reference frame at its input: pass reference {wanted}, "
                                 f"got {got}")
            ref_flat = reference.to(cond_flat).repeat_interleave(f, dim=0)
            self._guidance = self.guider(torch.cat([cond_flat, ref_flat], dim=1))
        try:
            return self.unet(sample, timestep, encoder_hidden_states=tokens, down_block_additional_residuals=down,
                             mid_block_additional_residual=mid).sample
        finally:
            self._guidance = None


def _drop_origin(config: Path) -> None:
    """diffusers records where a model was loaded from (`_name_or_path`); a checkpoint's bytes must not depend on
    the folder its parent sat in, or the same training in two workspaces would give two model versions."""
    data = json.loads(config.read_text())
    if data.pop("_name_or_path", None) is not None:
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _pass_through(hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    return hidden_states
