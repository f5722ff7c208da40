"""Sampling one window of frames from an SGDM: DDIM steps with classifier-free guidance on the reference image.

The step is split so the batch-overlapped temporal denoising of Algorithm 1 can reuse it: `predict_noise` is one
guided noise prediction for any stretch of frames; `sample` runs it over a single window. Latents are the VAE's
means times its scaling factor (what the SD UNets were trained on); frames are (B, 3, F, H, W) in [0, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler
from transformers import CLIPVisionModel

from models.codec import device_dtype
from models.sgdm import SGDM

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VAE_CHUNK = 4  # frames through the VAE at once: its activations at full size dwarf the latents


def vae_factor(vae: AutoencoderKL) -> int:
    """Image side / latent side: the codec's own factor, or one halving per VAE block after the first."""
    return int(getattr(vae.config, "factor", None) or 2 ** (len(vae.config.block_out_channels) - 1))


@torch.no_grad()
def encode_reference(encoder: CLIPVisionModel, image: torch.Tensor) -> torch.Tensor:
    """CLIP tokens of reference images (B, 3, H, W) in [0, 1]: all tokens before pooling, since the SGDM's
    cross-attention reads the spatial detail that pooling would throw away. Returns (B, 1 + patches, hidden)."""
    device, dtype = device_dtype(encoder)
    size = encoder.config.image_size
    x = F.interpolate(image.to(device, torch.float32), size=(size, size), mode="bilinear", antialias=True,
                      align_corners=False)
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return encoder(pixel_values=((x - mean) / std).to(dtype)).last_hidden_state


def _per_frame(x: torch.Tensor) -> torch.Tensor:
    """(B, C, F, H, W) → (B·F, C, H, W), frame-major within each batch item."""
    b, c, f, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


def _per_video(x: torch.Tensor, b: int) -> torch.Tensor:
    bf, c, h, w = x.shape
    return x.reshape(b, bf // b, c, h, w).permute(0, 2, 1, 3, 4)


@torch.no_grad()
def encode_frames(vae: AutoencoderKL, frames: torch.Tensor, chunk: int = VAE_CHUNK) -> torch.Tensor:
    """Frames (B, 3, F, H, W) in [0, 1] → latents (B, 4, F, H/f, W/f), the distribution's mean (deterministic, so
    training data and sampling see the same latents) times the scaling factor."""
    device, dtype = device_dtype(vae)
    flat = _per_frame(frames).to(device, dtype) * 2 - 1
    means = [vae.encode(flat[i:i + chunk]).latent_dist.mean for i in range(0, flat.shape[0], chunk)]
    return _per_video(torch.cat(means) * vae.config.scaling_factor, frames.shape[0])


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor, chunk: int = VAE_CHUNK) -> torch.Tensor:
    """Latents (B, 4, F, h, w) → frames (B, 3, F, h·f, w·f) in [0, 1], a few frames at a time."""
    device, dtype = device_dtype(vae)
    flat = _per_frame(latents).to(device, dtype) / vae.config.scaling_factor
    images = [vae.decode(flat[i:i + chunk]).sample for i in range(0, flat.shape[0], chunk)]
    return _per_video(((torch.cat(images).float() + 1) / 2).clamp(0, 1), latents.shape[0])


def inpaint_inputs(vae: AutoencoderKL, mask: torch.Tensor, masked_image: torch.Tensor) -> torch.Tensor:
    """The face model's extra input channels (B, 5, F, h, w): the mask (1 = to be generated) shrunk to latent size
    with nearest sampling as SD inpainting was trained, then the latent of the masked image. `masked_image`
    (B, 3, F, H, W) in [0, 1] is passed as given; SD inpainting expects the masked region at 0.5 (grey)."""
    latent = encode_frames(vae, masked_image)
    b, _, f, h, w = latent.shape
    small = F.interpolate(_per_frame(mask.to(latent)), size=(h, w), mode="nearest")
    return torch.cat([_per_video(small, b), latent], dim=1)


def initial_latents(shape: tuple[int, ...], generator: torch.Generator, shared: bool = False) -> torch.Tensor:
    """Gaussian noise (B, C, F, h, w). `shared`: one draw repeated over the frames (the official code's choice)."""
    if shared:
        b, c, _, h, w = shape
        one = torch.randn((b, c, 1, h, w), generator=generator, device=generator.device)
        return one.expand(shape).contiguous()
    return torch.randn(shape, generator=generator, device=generator.device)


def predict_noise(model: SGDM, latents: torch.Tensor, t: torch.Tensor | int, tokens: torch.Tensor,
                  cond: torch.Tensor, guidance: float, control_scale: float,
                  inpaint_extra: torch.Tensor | None = None, reference: torch.Tensor | None = None) -> torch.Tensor:
    """One guided noise prediction for latents (B, 4, F, h, w). Zero tokens (and a zero reference frame, for a model
    that reads one at its input) are the dropped reference that training taught as the unconditional branch; both
    branches go through one batched forward (guidance 1: only the conditional one). `inpaint_extra` (B, 5, F, h, w)
    is appended for the face model; `reference` (1 or B, 3, H, W) in [0, 1]."""
    x = latents if inpaint_extra is None else torch.cat([latents, inpaint_extra.to(latents)], dim=1)
    b = x.shape[0]
    ref = None if reference is None else reference.to(cond).expand(b, -1, -1, -1)
    if guidance == 1.0:
        return model(x, t, tokens, cond, control_scale=control_scale, reference=ref)
    both = model(torch.cat([x, x]), t, torch.cat([torch.zeros_like(tokens), tokens]), torch.cat([cond, cond]),
                 control_scale=control_scale,
                 reference=None if ref is None else torch.cat([torch.zeros_like(ref), ref]))
    uncond, cond_eps = both.chunk(2)
    return uncond + guidance * (cond_eps - uncond)


@torch.no_grad()
def sample(model: SGDM, vae: AutoencoderKL, scheduler: DDIMScheduler, tokens: torch.Tensor, cond: torch.Tensor, *,
           steps: int = 20, guidance: float = 3.5, control_scale: float = 2.0, generator: torch.Generator,
           mask: torch.Tensor | None = None, masked_image: torch.Tensor | None = None,
           reference: torch.Tensor | None = None) -> torch.Tensor:
    """Frames (B, 3, F, H, W) in [0, 1] for mesh images `cond` (B, 3, F, H, W) and reference `tokens` (B, N, D)
    (and the reference frame (B, 3, H, W) for a model with an input stem).
    The face (inpainting) model also needs `mask` (B, 1, F, H, W) and `masked_image` (B, 3, F, H, W). The only
    randomness is the initial noise, drawn from `generator` (DDIM with eta 0), so a seed fixes the result."""
    if model.inpaint != (mask is not None and masked_image is not None):
        raise ValueError("the face (inpainting) model needs mask and masked_image; the body model takes neither"
                         if model.inpaint else "mask/masked_image given to a model that is not an inpainting one")
    p = next(model.parameters())
    b, _, f, height, width = cond.shape
    factor = vae_factor(vae)
    if height % factor or width % factor:
        raise ValueError(f"frame size {height}x{width} is not a multiple of the VAE factor {factor}")
    extra = None if mask is None else inpaint_inputs(vae, mask, masked_image).to(p.device, p.dtype)
    tokens, cond = tokens.to(p.device, p.dtype), cond.to(p.device, p.dtype)
    sched = type(scheduler).from_config(scheduler.config)  # the caller's scheduler keeps its own timesteps
    sched.set_timesteps(steps, device=p.device)
    shape = (b, vae.config.latent_channels, f, height // factor, width // factor)
    latents = initial_latents(shape, generator).to(p.device, p.dtype) * sched.init_noise_sigma
    for t in sched.timesteps:
        eps = predict_noise(model, sched.scale_model_input(latents, t), t, tokens, cond, guidance, control_scale,
                            extra, reference)
        latents = sched.step(eps, t, latents).prev_sample
    return decode_latents(vae, latents)
