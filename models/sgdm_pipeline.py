"""SGDMPipeline: everything a trained SGDM checkpoint needs to render, loaded from its folder, on any device.

A checkpoint folder holds the SGDM (unet/, the mesh branch controlnet/ and/or input_guider, image_proj,
sgdm_config.json) and the parts it samples with:
its codec (vae/: SD's VAE or the cpu profile's space-to-depth), its reference encoder (image_encoder/: CLIP vision
or pixel patches), its scheduler (scheduler/), optionally a 2× refiner (refiner/: the cpu profile's cascade, which
denoises at half the output size), optionally a predictor (predictor/: the mean frame from mesh and reference, which
the SGDM then refines from moderate noise — "predict and refine") and model_index.json with the resolution it was
trained at. So

    pipe = SGDMPipeline.from_pretrained("data/checkpoints/identities/demo/finetune/body").to("cuda", torch.float16)
    frames = pipe(conditions, reference, generator=torch.Generator().manual_seed(0))

renders with nothing else. The face checkpoint loads the same class, which then runs in inpainting mode (it also
takes the frames to redo and their masks). `__call__` is the paper's Algorithm 1 over a sequence of any length:
conditions are read per window and the latent video lives in a `LatentStore` (RAM while small, a scratch file when
not), so memory does not grow with length beyond the store's bound.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler
from transformers import CLIPVisionModel

from models import overlap, pipeline
from models.codec import PatchTokens, SpaceToDepth, device_dtype, load_codec, load_encoder, saved_class
from models.latents import LatentStore
from models.predictor import Predictor
from models.refiner import Refiner
from models.sgdm import SGDM

INDEX = "model_index.json"
PARTS = ("vae", "image_encoder", "scheduler")
REFINER = "refiner"  # optional parts
PREDICTOR = "predictor"
SCHEDULERS = {"ddim": DDIMScheduler, "dpmpp": DPMSolverMultistepScheduler, "unipc": UniPCMultistepScheduler}
Frames = Sequence[np.ndarray]  # H×W×3 uint8 images (masks: H×W uint8), read one window at a time


class SGDMPipeline:
    def __init__(self, sgdm: SGDM, vae: AutoencoderKL | SpaceToDepth, image_encoder: CLIPVisionModel | PatchTokens,
                 scheduler: Any, resolution: int, refiner: Refiner | None = None,
                 predictor: Predictor | None = None) -> None:
        self.sgdm, self.vae, self.image_encoder, self.scheduler = sgdm, vae, image_encoder, scheduler
        self.refiner, self.predictor = refiner, predictor
        self.resolution = int(resolution)  # the SGDM's frames; the output's is `output_resolution`
        factor = pipeline.vae_factor(vae)
        if self.resolution % factor:
            raise ValueError(f"resolution {self.resolution} is not a multiple of the codec's factor {factor}")

    # ------------------------------------------------------------------------------------------------ files
    @classmethod
    def from_pretrained(cls, path: str | Path, torch_dtype: torch.dtype | None = None) -> SGDMPipeline:
        path = Path(path)
        index = path / INDEX
        if not index.is_file():
            raise FileNotFoundError(f"{path}: not a pipeline checkpoint (no {INDEX}; a checkpoint made before the "
                                    f"pipeline kept its parts: train it again)")
        config = json.loads(index.read_text())
        missing = [p for p in PARTS if not (path / p).is_dir()]
        if missing:
            raise FileNotFoundError(f"{path}: checkpoint lacks {', '.join(missing)}")
        dtype = torch_dtype or torch.float32
        refiner = Refiner.from_pretrained(path / REFINER, torch_dtype=dtype) if (path / REFINER).is_dir() else None
        predictor = (Predictor.from_pretrained(path / PREDICTOR, torch_dtype=dtype) if (path / PREDICTOR).is_dir()
                     else None)
        return cls(SGDM.from_pretrained(path, torch_dtype=dtype), load_codec(path / "vae", dtype),
                   load_encoder(path / "image_encoder", dtype), load_scheduler(path / "scheduler"),
                   config["resolution"], refiner, predictor)

    def save_pretrained(self, path: str | Path, parts_from: dict[str, Path] | None = None) -> None:
        """Write the checkpoint folder. `parts_from` names folders to take the codec, encoder and scheduler from
        as they are (hard-linked where the filesystem allows): frozen parts keep their exact bytes."""
        path = Path(path)
        self.sgdm.save_pretrained(path)
        for name in PARTS:
            if parts_from and name in parts_from:
                shutil.copytree(parts_from[name], path / name, copy_function=_link_or_copy)
            else:
                getattr(self, name).save_pretrained(path / name)
        if self.refiner is not None:
            self.refiner.save_pretrained(path / REFINER)
        if self.predictor is not None:
            self.predictor.save_pretrained(path / PREDICTOR)
        (path / INDEX).write_text(json.dumps({
            "_class_name": type(self).__name__, "resolution": self.resolution, "inpaint": self.inpaint,
            "output_resolution": self.output_resolution, "sgdm": ["models.sgdm", "SGDM"], "vae": _origin(self.vae),
            "image_encoder": _origin(self.image_encoder), "scheduler": _origin(self.scheduler),
            REFINER: ["models.refiner", "Refiner"] if self.refiner is not None else None,
            PREDICTOR: ["models.predictor", "Predictor"] if self.predictor is not None else None},
            indent=2, sort_keys=True) + "\n")

    # ----------------------------------------------------------------------------------------------- device
    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> SGDMPipeline:
        for module in (self.sgdm, self.vae, self.image_encoder, *self._optional()):
            wanted = dtype
            if module is self.vae and dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False):
                wanted = torch.float32  # the VAE's own config says float16 overflows in it (diffusers' default)
            if wanted is None or wanted == device_dtype(module)[1]:  # a same-dtype cast only makes diffusers warn
                module.to(device=device)
            else:
                module.to(device=device, dtype=wanted)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.sgdm.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.sgdm.parameters()).dtype

    @property
    def output_resolution(self) -> int:
        """Side of the frames `__call__` returns: the SGDM's, or twice it through the refiner."""
        return self.resolution * (2 if self.refiner is not None else 1)

    def _optional(self) -> list[torch.nn.Module]:
        return [m for m in (self.refiner, self.predictor) if m is not None]

    def denoising_steps(self, steps: int, strength: float = 1.0) -> int:
        """Sampler steps `__call__` runs: all of them from noise, the last `strength` share of them (rounded down,
        as diffusers' image-to-image pipelines do) from a prediction; none at strength 0 (the prediction is the
        frame), all from pure noise at 1 (the predictor unused)."""
        if not 0 <= strength <= 1:
            raise ValueError(f"strength {strength}: it is the share of the sampler's steps run, in [0, 1]")
        return steps if self.predictor is None else int(steps * strength)

    @property
    def inpaint(self) -> bool:
        return self.sgdm.inpaint

    def use_scheduler(self, kind: str) -> None:
        """Swap the sampler, keeping the trained noise schedule: ddim, dpmpp (DPM-Solver++ multistep) or unipc."""
        if kind not in SCHEDULERS:
            raise ValueError(f"scheduler {kind!r}: choose {', '.join(SCHEDULERS)}")
        if not isinstance(self.scheduler, SCHEDULERS[kind]):
            extra = {"algorithm_type": "dpmsolver++"} if kind == "dpmpp" else {}
            self.scheduler = SCHEDULERS[kind].from_config(self.scheduler.config, **extra)

    # ----------------------------------------------------------------------------------------------- render
    @torch.no_grad()
    def __call__(self, conditions: Frames, reference: np.ndarray, *, images: Frames | None = None,
                 masks: Frames | None = None, steps: int = 20, guidance: float = 3.5, control_scale: float = 2.0,
                 window: int = 16, overlap_frames: int = 4, generator: torch.Generator | None = None,
                 noise: str = "independent", strength: float = 1.0,
                 callback: Callable[[int, int], None] | None = None,
                 output: Callable[[int, np.ndarray], None] | None = None, max_latent_bytes: int = 1 << 31,
                 spill_dir: Path | None = None) -> np.ndarray | None:
        """Frames (F, H, W, 3) uint8 at `output_resolution` for the mesh `conditions` (F images) and the identity's
        `reference` image.

        Inpainting (face) checkpoints also take `images` (the frames whose masked part is redone) and `masks`
        (uint8, 255 = redo): outside the mask, their frames are the images themselves. `output(first, frames)`
        receives the frames a window at a time (then nothing is returned); `callback(step, steps)` follows the
        denoising. The only randomness is the initial noise, drawn from `generator` (DDIM with eta 0 and the
        multistep solvers are deterministic), so a seed fixes the frames.

        With a predictor, sampling starts from its frames noised to the level `strength` of the way from clean (0)
        to pure noise (1), and runs the last `denoising_steps(steps, strength)` of the sampler's steps, as
        diffusers' image-to-image pipelines do; at 0 the prediction is the frame.
        """
        n, res, device = len(conditions), self.resolution, self.device
        if n < 1:
            raise ValueError("nothing to render: no conditions")
        if self.inpaint != (images is not None and masks is not None):
            raise ValueError("the face (inpainting) checkpoint needs images and masks; a body checkpoint takes neither"
                             if self.inpaint else "images/masks given to a checkpoint that is not an inpainting one")
        generator = generator or torch.Generator().manual_seed(0)

        # 1. encode the reference: every token before pooling (zero tokens are the unconditional branch), and the
        #    frame itself for a model that reads it at its input
        ref_image = _video([_sized(reference, res)])[:, :, 0]  # (1, 3, H, W) in [0, 1]
        tokens = pipeline.encode_reference(self.image_encoder, ref_image).to(device, self.dtype)
        ref_image = ref_image.to(device, self.dtype) if self.sgdm.guider is not None else None  # its input stem's

        # 2. prepare the latent video: the initial noise, scaled for the scheduler; with a predictor, its frames
        #    noised to the first timestep that runs (predict and refine)
        scheduler = copy.deepcopy(self.scheduler)
        scheduler.set_timesteps(steps, device=device)
        run = self.denoising_steps(steps, strength)
        begin = (steps - run) * scheduler.order
        if begin and hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(begin)
        f = pipeline.vae_factor(self.vae)
        channels = self.vae.config.latent_channels
        # the latents and the sampler's history (overlap.SamplerHistory) fit the memory bound together, or spill
        latents = LatentStore(channels, n, res // f, res // f, device=device, dtype=self.dtype,
                              max_bytes=max_latent_bytes, spill_dir=spill_dir,
                              copies=1 + overlap.history_videos(scheduler))
        extras = None
        try:
            latents.fill_noise(generator, shared=noise == "shared")
            cond_frames = _Conditions(conditions, res, device, max(0, max_latent_bytes - latents.memory_bytes))
            if self.predictor is None or run == steps:  # from pure noise, the predictor unused
                latents.scale(float(scheduler.init_noise_sigma))
            else:
                # (a predictor that keeps its own reference starts from the frame it learnt against)
                ref = _video([_sized(reference, res)])[0].permute(1, 0, 2, 3).to(device, self.dtype) * 2 - 1
                for w in overlap.chunks(n, window):
                    cond = cond_frames.window(w, self.dtype)[0].permute(1, 0, 2, 3) * 2 - 1
                    given = None if self.predictor.own_reference else ref.expand(len(cond), -1, -1, -1)
                    predicted = (self.predictor(cond, given) + 1) / 2
                    x0 = pipeline.encode_frames(self.vae, predicted.permute(1, 0, 2, 3)[None]).float()
                    if run:
                        x0 = scheduler.add_noise(x0, latents.read(w, torch.float32), scheduler.timesteps[begin:][:1])
                    latents.write(w, x0)

            # 3. inpainting inputs (face): the mask and the latent of the masked frames, once per frame
            if self.inpaint:
                extras = LatentStore(channels + 1, n, res // f, res // f, device=device, dtype=self.dtype,
                                     max_bytes=max_latent_bytes, spill_dir=spill_dir)
                for w in overlap.chunks(n, window):
                    mask = torch.from_numpy(np.stack([_sized(masks[i], res) for i in range(w.start, w.stop)])
                                            > 127).float()[None, None]
                    image = _video([_sized(images[i], res) for i in range(w.start, w.stop)])
                    extras.write(w, pipeline.inpaint_inputs(self.vae, mask, image * (1 - mask) + 0.5 * mask))

            # 4. Algorithm 1: guided noise per window, averaged per frame, one scheduler step for the sequence
            def predict(x: torch.Tensor, t: torch.Tensor, w: slice) -> torch.Tensor:
                cond = cond_frames.window(w, self.dtype)
                extra = extras.read(w) if extras is not None else None
                return pipeline.predict_noise(self.sgdm, x, t, tokens, cond, guidance, control_scale, extra,
                                              ref_image).float()

            if run:
                overlap.denoise_store(predict, latents, scheduler, window, overlap_frames,
                                      on_step=(lambda i: callback(i, run)) if callback else None, begin=begin)

            # 5. decode a window at a time, 6. through the refiner when the checkpoint has one
            collected: list[np.ndarray] = []
            for w in overlap.chunks(n, window):
                frames = pipeline.decode_latents(self.vae, latents.read(w))[0]  # (3, F, H, W) in [0, 1]
                if self.refiner is not None:
                    frames = self._refine(frames, [conditions[i] for i in range(w.start, w.stop)], reference)
                done = (frames.permute(1, 2, 3, 0).float() * 255).round().to(torch.uint8).cpu().numpy()
                if self.inpaint:  # 7. inpainting redoes the masked part only: the rest is the image as given
                    done = _overlay(done, images, masks, w)
                if output is not None:
                    output(w.start, done)
                else:
                    collected.append(done)
        finally:
            latents.close()
            if extras is not None:
                extras.close()
        return np.concatenate(collected) if output is None else None


    def _refine(self, frames: torch.Tensor, conditions: list[np.ndarray], reference: np.ndarray) -> torch.Tensor:
        """(3, F, h, w) SGDM frames in [0, 1] → (3, F, 2h, 2w) with the refiner's detail added."""
        side, dtype = self.output_resolution, self.dtype
        cond = _video([_sized(c, side) for c in conditions])[0].permute(1, 0, 2, 3)
        ref = _video([_sized(reference, side)])[0].permute(1, 0, 2, 3).expand(len(conditions), -1, -1, -1)
        low = frames.permute(1, 0, 2, 3)
        out = self.refiner(*(x.to(self.device, dtype) * 2 - 1 for x in (low, cond, ref)))
        return ((out.float() + 1) / 2).permute(1, 0, 2, 3)


# ---------------------------------------------------------------------------------------------------- parts
def load_scheduler(folder: Path) -> Any:
    name = saved_class(folder, "scheduler_config.json")
    kind = next((k for k, cls in SCHEDULERS.items() if cls.__name__ == name), "ddim")
    return SCHEDULERS[kind].from_pretrained(folder)


def _origin(part: Any) -> list[str]:
    return [type(part).__module__.split(".")[0], type(part).__name__]


def _link_or_copy(src: str, dst: str) -> str:
    try:
        Path(dst).hardlink_to(src)
    except OSError:
        shutil.copy2(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------------- images
def _sized(image: np.ndarray, side: int) -> np.ndarray:
    """An image at side × side, resized with INTER_AREA as the training data was."""
    if image.shape[:2] != (side, side):
        return cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA)
    return image


def _overlay(generated: np.ndarray, images: Frames, masks: Frames, w: slice) -> np.ndarray:
    """The generated frames of window `w` where the mask says redo, the given images elsewhere (at the output's
    size), as diffusers' inpainting pipelines paste the result back over the original."""
    side = generated.shape[1]
    keep = np.stack([_sized(masks[i], side) <= 127 for i in range(w.start, w.stop)])[..., None]
    return np.where(keep, np.stack([_sized(images[i], side) for i in range(w.start, w.stop)]), generated)


class _Conditions:
    """The mesh conditions at the model's side for Algorithm 1, which reads each one at every step and in every
    window covering it (about 27 times per frame over 20 steps). Decoded and resized once per render into uint8
    (a quarter of float32's bytes; pinned host memory on CUDA, so copies to the device do not wait) while they fit
    `budget` bytes, what the memory bound leaves beside the latents; beyond it, read per window as needed."""

    def __init__(self, conditions: Frames, side: int, device: torch.device, budget: int) -> None:
        self.source, self.side, self.device = conditions, side, device
        self.frames: torch.Tensor | None = None
        if len(conditions) * side * side * 3 <= budget:
            self.frames = torch.empty((len(conditions), side, side, 3), dtype=torch.uint8,
                                      pin_memory=device.type == "cuda")
            for i in range(len(conditions)):
                self.frames[i] = torch.from_numpy(np.ascontiguousarray(_sized(conditions[i], side)))

    def window(self, w: slice, dtype: torch.dtype) -> torch.Tensor:
        """Frames w as (1, 3, F, H, W) in [0, 1] on the device: converted there, the same numbers as `_video`."""
        if self.frames is None:
            return _video([_sized(self.source[i], self.side) for i in range(w.start, w.stop)]).to(self.device, dtype)
        images = self.frames[w].to(self.device, non_blocking=True)
        return (images.permute(3, 0, 1, 2)[None].float() / 255).to(dtype)


def _video(images: list[np.ndarray]) -> torch.Tensor:
    """H×W×3 uint8 images → (1, 3, F, H, W) in [0, 1]."""
    return torch.from_numpy(np.stack(images)).permute(3, 0, 1, 2)[None].float() / 255
