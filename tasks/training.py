"""The SGDM training loop shared by pretrain and finetune: plain functions, no orchestrator.

Denoising loss on VAE latents of `video_length`-frame clips, against what the scheduler's prediction_type names
(noise, x0 or v); the reference image dropped at `ref_drop` so classifier-free guidance has a trained unconditional
branch; AdamW with linear warm-up, gradient accumulation, optional mixed precision and gradient checkpointing (GPU),
optionally an EMA of the weights kept as the result. Temporal (motion-module) weights stay frozen.

Resumable and reproducible: every step's batch choice, dropout and noise come from generators seeded with
(seed, step), never from a running random state, and a resume loads the saved weights into a model built the same
way as the first run's. So a run killed mid-way and started again ends with the same weights as one that never
stopped (on a CPU, bit for bit).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from core.errors import StageError
from models import parts
from models.precision import AMP, grad_scaler, training_precision
from models.predictor import Predictor
from models.refiner import Refiner, degrade
from models.sgdm import SGDM
from models.sgdm_pipeline import SGDMPipeline
from tasks.base_weights import quiet
from tasks.frames import FACE_DETAIL, HAND
from tasks.train_params import TRAIN_LOG, sgdm_side
from tasks.training_data import ClipBatches, Identity, face_crops, hand_crops, hand_weights, load_identity

STATE = "train_state"


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    lr: float = 1e-5
    warmup: int = 0
    grad_accum: int = 1
    batch_size: int = 1
    ref_drop: float = 0.1
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    save_every: int = 100
    seed: int = 0
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16" | "auto", as models.precision resolves it for the device
    gradient_checkpointing: bool = False
    control_scale: float = 1.0
    loss_every: int = 50  # steps between reads of the loss (each read waits for the device)
    ema: float = 0.0  # decay of an exponential moving average of the weights, saved as the result (0 = none)


class Batches(Protocol):
    """Training samples as model inputs, drawn with the given generator. Latents come from
    `models.pipeline.encode_frames` (scaled like sampling expects), tokens from `encode_reference`."""

    def batch(self, gen: torch.Generator, size: int) -> dict[str, torch.Tensor]: ...


def _step_gen(seed: int, step: int, micro: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 64 + micro) * 8 + salt)


def loss_on(model: SGDM, batch: dict[str, torch.Tensor], noise_scheduler: Any, gen: torch.Generator,
            ref_drop: float, control_scale: float) -> torch.Tensor:
    """One denoising loss, against what the scheduler says the model predicts (noise, x0 or v).
    batch: latents (B,C,F,h,w), tokens (B,N,D), cond (B,3,F,H,W); for a model with an input stem reference
    (B,3,H,W) (the frame the tokens encode; ClipBatches(reference_frames=True)); optionally mask (B,1,F,h,w) and
    masked (B,4,F,h,w) for the inpainting face model, and weight (B,1,F,h,w) per latent cell (the hands')."""
    latents = batch["latents"]
    b = latents.shape[0]
    noise = torch.randn(latents.shape, generator=gen).to(latents)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), generator=gen)
    noisy = noise_scheduler.add_noise(latents, noise, t)
    if model.inpaint:
        noisy = torch.cat([noisy, batch["mask"], batch["masked"]], dim=1)
    keep = (torch.rand(b, generator=gen) >= ref_drop).to(batch["tokens"])
    tokens = batch["tokens"] * keep[:, None, None]
    reference = batch["reference"] * keep[:, None, None, None] if model.guider is not None else None
    pred = model(noisy, t, tokens, batch["cond"], control_scale=control_scale, reference=reference)
    kind = noise_scheduler.config.prediction_type
    target = {"epsilon": lambda: noise, "sample": lambda: latents,
              "v_prediction": lambda: noise_scheduler.get_velocity(latents, noise, t)}[kind]()
    return weighted_mean((pred.float() - target.float()).square(), batch.get("weight"))


def weighted_mean(err: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """The mean of `err` with `weight` broadcast over it (the hands' cells count more), normalised by the weights'
    mean so a weighted loss keeps the scale, and the learning rate, of an even one."""
    if weight is None:
        return err.mean()
    weight = weight.to(err)
    return (err * weight).mean() / weight.expand_as(err).mean()


def _trainable(model: SGDM) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _save_state(model: SGDM, opt: torch.optim.Optimizer, step: int, out: Path,
                ema: dict[str, torch.Tensor] | None = None) -> tuple[float, int]:
    """Weights, optimiser state and weight average at `step`, written beside and renamed into place (a kill leaves
    the old one). Returns its cost, (seconds, bytes): on sd15 a state is ~15 GB, so how often to save is a budget."""
    began = time.perf_counter()
    tmp = out / f".{STATE}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({n: p.detach().contiguous() for n, p in _trainable(model)}, str(tmp / "weights.safetensors"))
    if ema is not None:
        save_file({n: v.contiguous() for n, v in ema.items()}, str(tmp / "ema.safetensors"))
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    (tmp / "step.json").write_text(json.dumps({"step": step}) + "\n")
    size = sum(f.stat().st_size for f in tmp.iterdir())
    final = out / STATE
    old = out / f".{STATE}.old"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return time.perf_counter() - began, size


def _load_state(model: SGDM, opt: torch.optim.Optimizer, out: Path, ema: dict[str, torch.Tensor] | None = None
                ) -> int:
    state = out / STATE
    if not (state / "step.json").is_file():
        return 0
    weights = load_file(str(state / "weights.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, v in weights.items():
            params[n].copy_(v)
        if ema is not None:
            saved = state / "ema.safetensors"
            if not saved.is_file():
                raise FileNotFoundError(f"{state}: no ema.safetensors to resume the weight average from (was the "
                                        "run started with train.ema 0?)")
            for n, v in load_file(str(saved)).items():
                ema[n].copy_(v)
    # to the host first: a state saved on another GPU index (or machine) never lands on that GPU, and the optimiser
    # moves each tensor to its parameter's device as it loads
    opt.load_state_dict(torch.load(state / "optimizer.pt", weights_only=True, map_location="cpu"))
    return int(json.loads((state / "step.json").read_text())["step"])


def train(model: SGDM, data: Batches, noise_scheduler: Any, cfg: TrainConfig, out: Path,
          progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train `model` in place for cfg.steps optimiser steps, resuming from `out`'s saved state if there is one.
    Returns the loss history of this call and where it started. Losses stay on the device and are read every
    `cfg.loss_every` steps: reading one is a host-device synchronisation, which every step would pay for."""
    model.freeze_temporal()
    model.skip_identity_temporal()
    model.train()
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    params = [p for _, p in _trainable(model)]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # the average, not the last weights, is the result: a few thousand noisy CPU steps end anywhere in a valley
    ema = {n: p.detach().clone() for n, p in _trainable(model)} if cfg.ema else None
    start = _load_state(model, opt, out, ema)
    for group in opt.param_groups:
        group.setdefault("initial_lr", cfg.lr)

    def lr_at(step: int) -> float:
        return cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else cfg.lr

    device = next(model.parameters()).device
    precision = training_precision(cfg.mixed_precision, device)
    amp = AMP[precision]
    scaler = grad_scaler(precision, device)
    losses: list[float] = []
    saves: list[tuple[float, int]] = []
    pending: list[torch.Tensor] = []  # this run's losses not yet read
    with _Prefetched(data, cfg, start, device) as batch_for:
        for step in range(start, cfg.steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            opt.zero_grad(set_to_none=True)
            total = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum):
                batch = {k: v.to(device, non_blocking=True) for k, v in batch_for(step, micro).items()}
                with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                    loss = loss_on(model, batch, noise_scheduler, _step_gen(cfg.seed, step, micro, 1), cfg.ref_drop,
                                   cfg.control_scale) / cfg.grad_accum
                scaler.scale(loss).backward()
                total += loss.detach()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            scaler.step(opt)
            scaler.update()
            if ema is not None:
                with torch.no_grad():
                    for n, p in _trainable(model):
                        ema[n].lerp_(p.detach(), 1 - cfg.ema)
            pending.append(total)
            if len(pending) >= cfg.loss_every:
                losses += torch.stack(pending).float().tolist()
                pending.clear()
            done = step + 1
            if done % cfg.save_every == 0 or done == cfg.steps:
                saves.append(_save_state(model, opt, done, out, ema))
            if progress:
                progress(done)
        waited = batch_for.waited
    if pending:
        losses += torch.stack(pending).float().tolist()
    if ema is not None:
        with torch.no_grad():
            for n, p in _trainable(model):
                p.copy_(ema[n])
    return {"started_at_step": start, "steps": cfg.steps, "losses": losses, "config": asdict(cfg),
            "precision": precision, "data_wait_s": round(waited, 3), **_save_cost(saves)}


class _Prefetched:
    """The batches of the steps to come, each made one ahead in a thread while the device computes the current
    one (decoding frames and running the frozen encoders is the data side's work), from its own step's
    generator, so they are the batches made in line; pinned on CUDA for an asynchronous copy."""

    def __init__(self, data: Batches, cfg: TrainConfig, start: int, device: torch.device) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.data, self.cfg, self.pin = data, cfg, device.type == "cuda"
        self.keys = ((s, m) for s in range(start, cfg.steps) for m in range(cfg.grad_accum))
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch")
        self.ahead = self._submit()
        self.waited = 0.0  # seconds the loop waited for a batch: the data side falling behind the device

    def _submit(self) -> Any:
        key = next(self.keys, None)
        return (key, self.pool.submit(self._make, key)) if key is not None else None

    def _make(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            batch = self.data.batch(_step_gen(self.cfg.seed, *key, 0), self.cfg.batch_size)
        return {k: v.pin_memory() for k, v in batch.items()} if self.pin else batch

    def __call__(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        key, made = self.ahead
        assert key == (step, micro), (key, step, micro)
        self.ahead = self._submit()
        began = time.perf_counter()
        batch = made.result()
        self.waited += time.perf_counter() - began
        return batch

    def __enter__(self) -> _Prefetched:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _save_cost(saves: list[tuple[float, int]]) -> dict[str, Any]:
    """What the resumable states of one run cost: how many, seconds in all, the size of one."""
    return {"saves": len(saves), "save_s": round(sum(s for s, _ in saves), 2),
            "state_mb": round(saves[-1][1] / 2**20, 1) if saves else None}


def train_models(sources: list[tuple[str, Path, Path, Path]], settings: Any, section: Any, base_paths: Any,
                 out: Path, scratch: Path, encoded: Path, progress: Any, compute: Any, start: Path | None = None
                 ) -> dict[str, Any]:
    """Train the body SGDM and the Face SGDM on `sources` [(identity, ingest dir, render_mesh dir, frames dir)],
    from the base weights or from the checkpoints under `start`, on `compute.device`; write each to out/body and
    out/face as a pipeline checkpoint (the SGDM with the codec, encoder and scheduler it samples with). The frozen
    encoders' outputs go to (and come from) the store `encoded` (tasks.encoded)."""
    quiet()
    device = compute.device
    prof = section.for_profile(settings.profile)
    vae = parts.load_vae(base_paths).eval().to(device)
    encoder = parts.load_image_encoder(base_paths).eval().to(device)
    noise_scheduler = parts.load_scheduler(base_paths)
    frozen = {"vae": base_paths.sd15 / "vae", "image_encoder": base_paths.image_encoder,
              "scheduler": base_paths.sd15 / "scheduler"}
    summary: dict[str, Any] = {"profile": settings.profile}
    refiner_steps = int(prof.get("refiner_steps", 0))  # finetune's knobs: the refiner and the predictor
    predictor_steps = int(prof.get("predictor_steps", 0))  # learn the identity
    # with a refiner (the cpu cascade) the SGDM learns the frames at half the output side
    body_res = sgdm_side(prof)
    for which, face in (("body", False), ("face", True)):
        ids = [load_identity(name, ingest, render, frames, res=body_res,
                             video_length=section.video_length, face=face, face_res=int(prof["face_resolution"]))
               for name, ingest, render, frames in sources]
        model = SGDM.from_pretrained(start / which) if start else parts.new_sgdm(
            base_paths, face=face, seed=section.seed, conditioning=str(prof.get("conditioning", "branch")))
        model.to(device)
        data = ClipBatches([i for i in ids if i is not None], vae, encoder, section.video_length,
                           float(prof["perturbed_share"]), encoded, face, hand_weight=float(prof["hand_weight"]),
                           reference_frames=model.guider is not None)
        steps = int(prof["face_steps" if face else "steps"])
        made = 0
        if steps:  # a run with no steps reads no image
            progress.start(f"encoding the {which} frames", data.encodings())
            made = data.encode(progress.advance)
        cfg = TrainConfig(steps=steps, lr=float(prof["lr"]), warmup=section.warmup, grad_accum=section.grad_accum,
                          batch_size=section.batch_size, ref_drop=section.ref_drop, save_every=int(prof["save_every"]),
                          seed=section.seed,
                          mixed_precision=str(prof["mixed_precision"]),
                          gradient_checkpointing=bool(prof["gradient_checkpointing"]), ema=float(prof["ema"]))
        progress.start(f"training {which} SGDM", steps)
        result = train(model, data, noise_scheduler, cfg, scratch / which, lambda _done: progress.advance(1))
        res = int(prof["face_resolution"]) if face else body_res
        refiner, refined, predictor, predicted = None, None, None, None
        if refiner_steps and not face:
            progress.start("training the 2× refiner", refiner_steps)
            refiner = _fresh(Refiner, section.seed).to(device)
            refined = train_refiner(refiner, _frames(sources, int(prof["resolution"])), refiner_steps,
                                    section.refiner_lr, section.seed, scratch / "refiner",
                                    lambda: progress.advance(1), save_every=int(prof["save_every"]))
            refiner.to("cpu")
        if predictor_steps and not face:
            progress.start("training the predictor", predictor_steps)
            predictor = _fresh(Predictor, section.seed, side=body_res).to(device)
            predicted = train_predictor(predictor, _frames(sources, body_res), predictor_steps, section.predictor_lr,
                                        section.predictor_ssim, section.seed, scratch / "predictor",
                                        lambda: progress.advance(1), save_every=int(prof["save_every"]),
                                        reference_frame=section.predictor_reference,
                                        hand_weight=float(prof["hand_weight"]))
            predictor.to("cpu")
        SGDMPipeline(model.to("cpu"), vae, encoder, noise_scheduler, res, refiner, predictor).save_pretrained(
            out / which, parts_from=frozen)
        losses = result["losses"]
        (out / which / TRAIN_LOG).write_text(json.dumps({"profile": settings.profile, "resolution": res,
                                                         "output_resolution": res * (2 if refiner else 1),
                                                         "video_length": section.video_length,
                                                         "started_at_step": result["started_at_step"],
                                                         "losses": losses}) + "\n")
        summary[which] = {"steps": steps, "resumed_at": result["started_at_step"], "conditioning": model.conditioning,
                          **({"hand_weight": data.hand_weight, "hand_frames": data.hand_frames()}
                             if data.hand_weight != 1.0 else {}),
                          **{k: result[k] for k in ("precision", "saves", "save_s", "state_mb", "data_wait_s")},
                          "identities": sum(i is not None for i in ids), "encoded": made,
                          "samples": sum(len(i.starts) for i in ids if i is not None), **_loss_ends(losses)}
        if refined is not None:
            summary[which]["refiner"] = refined
        if predicted is not None:
            summary[which]["predictor"] = predicted
    return summary


def _fresh(cls: type[torch.nn.Module], seed: int, **config: Any) -> Any:
    """A new deterministic part, initialised the same whatever ran before (a resume included)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(**config)


def _frames(sources: list[tuple[str, Path, Path, Path]], side: int) -> list[Identity]:
    """The identities' training frames one by one at `side` (the deterministic parts learn from single frames)."""
    loaded = [load_identity(name, ingest, render, frames, res=side, video_length=1)
              for name, ingest, render, frames in sources]
    return [i for i in loaded if i is not None]


REFINER_CROP = 128  # the refiner trains on crops of this side of the output frames (it is fully convolutional)
REFINER_BATCH = 4
PREDICTOR_BATCH = 4  # whole frames at the SGDM's side (128 px on cpu)

# a regressor's inputs and its target, in [-1, 1], and the target's per-pixel loss weights (B, 1, H, W) or None
Batch = tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor | None]


def train_refiner(refiner: Refiner, identities: list[Identity], steps: int, lr: float, seed: int, out: Path,
                  advance: Callable[[], None] | None = None, save_every: int = 100) -> dict[str, Any]:
    """Learn `refiner` in place: each step, crops of the identities' own training frames, their mesh conditions and
    another frame of theirs as reference; the input is the crop halved and degraded like a generated frame, the
    target the crop itself (L1)."""
    def batch(gen: torch.Generator) -> Batch:
        real, cond, ref = [], [], []
        for _ in range(REFINER_BATCH):
            ident = identities[int(torch.randint(len(identities), (1,), generator=gen))]
            i, r = (int(torch.randint(len(ident), (1,), generator=gen)) for _ in range(2))
            crop = min(REFINER_CROP, ident.res)
            y, x = (int(torch.randint((ident.res - crop) // 2 + 1, (1,), generator=gen)) * 2 for _ in range(2))
            for images, image in ((real, ident.frame(i)), (cond, ident.cond(i)), (ref, ident.frame(r))):
                images.append(torch.from_numpy(image[y:y + crop, x:x + crop].copy()).permute(2, 0, 1))
        real_t, cond_t, ref_t = (_signed(v) for v in (real, cond, ref))
        return (degrade(real_t, gen), cond_t, ref_t), real_t, None

    return _train_regressor(refiner, "refiner", identities, batch, lambda y, t, _w: torch.nn.functional.l1_loss(y, t),
                            steps, lr, seed, out, advance, save_every)


def train_predictor(predictor: Predictor, identities: list[Identity], steps: int, lr: float, ssim_weight: float,
                    seed: int, out: Path, advance: Callable[[], None] | None = None, save_every: int = 100,
                    reference_frame: int = 0, hand_weight: float = 1.0) -> dict[str, Any]:
    """Learn `predictor` in place: each step, whole training frames of the identities from their mesh conditions;
    L1 (`hand_weight` inside the hands' squares) plus `ssim_weight` × (1 − SSIM). A predictor that keeps its own
    reference learns against the first identity's training frame `reference_frame` (finetune has one identity);
    one that does not, against another frame of the same identity each time."""
    if predictor.own_reference and identities:
        if not 0 <= reference_frame < len(identities[0]):
            raise StageError(f"finetune.predictor_reference = {reference_frame}, but the identity has "
                             f"{len(identities[0])} training frames")
        predictor.remember(_signed([torch.from_numpy(identities[0].frame(reference_frame)).permute(2, 0, 1)])[0]
                           .to(predictor.reference.device))

    def batch(gen: torch.Generator) -> Batch:
        real, cond, ref, weights = [], [], [], []
        for _ in range(PREDICTOR_BATCH):
            ident = identities[int(torch.randint(len(identities), (1,), generator=gen))]
            i, r = (int(torch.randint(len(ident), (1,), generator=gen)) for _ in range(2))
            for images, image in ((real, ident.frame(i)), (cond, ident.cond(i)), (ref, ident.frame(r))):
                images.append(torch.from_numpy(image).permute(2, 0, 1))
            if hand_weight != 1.0:
                weights.append(hand_weights([ident.hands[i] if ident.hands else []], ident.res, ident.res,
                                            hand_weight)[0])  # (1, H, W): one frame's
        real_t, cond_t, ref_t = (_signed(v) for v in (real, cond, ref))
        return (((cond_t,) if predictor.own_reference else (cond_t, ref_t)), real_t,
                torch.stack(weights) if weights else None)

    return _train_regressor(predictor, "predictor", identities, batch, _l1_ssim(ssim_weight), steps, lr, seed, out,
                            advance, save_every)


def _l1_ssim(ssim_weight: float) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """L1 (weighted) plus `ssim_weight` × (1 − SSIM): SSIM rewards the edges L1 alone lets blur."""
    from pytorch_msssim import ssim

    def loss(y: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        l1 = weighted_mean((y - target).abs(), weight)
        return l1 + ssim_weight * (1 - ssim((y + 1) / 2, (target + 1) / 2, data_range=1.0)) if ssim_weight else l1

    return loss


CROP_BATCH = 8  # crops per step of a crop model (hands, face detail)
HAND_SOFTNESS = (2, 8)  # the body's hand has the detail of a crop this many times smaller (measured by eye: a blob)
HAND_SHIFT = 0.1  # and sits up to this share of the crop side away from where the mesh puts it


def soften(real: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Real crops (B, 3, S, S) in [-1, 1] made like the body model draws them: the detail of a crop 2-8 times
    smaller (blurred, drifted and noised by `degrade`), shifted by up to HAND_SHIFT of the side. A body model learnt
    in minutes draws a hand as a blob, often beside the mesh's: the hand model must learn to take the fingers from
    the mesh and only the colours and the surroundings from the body's frame. The face detail model learns from the
    same (measured against softer faces, 4-16 times smaller: lower SSIM, docs/cpu-profile.md)."""
    import torch.nn.functional as F

    size = real.shape[-1]
    out = []
    for k in range(len(real)):
        low = degrade(real[k:k + 1], gen)
        factor = float(torch.empty(1).uniform_(*HAND_SOFTNESS, generator=gen))
        low = F.interpolate(low, size=max(2, round(size / factor)), mode="area")
        soft = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
        reach = max(1, round(size * HAND_SHIFT))
        dx, dy = (int(torch.randint(-reach, reach + 1, (1,), generator=gen)) for _ in range(2))
        padded = F.pad(soft, (reach, reach, reach, reach), mode="replicate")
        out.append(padded[..., reach + dy:reach + dy + size, reach + dx:reach + dx + size])
    return torch.cat(out)


def train_hands(ingest: Path, render: Path, steps: int, section: Any, device: torch.device, scratch: Path,
                out: Path, advance: Callable[[], None] | None = None, save_every: int = 100) -> dict[str, Any]:
    """The identity's hand model (a `Predictor` reading the hand's mesh crop and the soft hand the body drew),
    written to out/hand with `save_pretrained`; nothing written when the training frames show no hand."""
    conds, reals = hand_crops(ingest, render)
    if not len(conds):
        return {"steps": 0, "crops": 0, "skipped": "no hand in view in the training frames"}
    return _train_crops("hand model", conds, reals, steps, section, device, scratch, out / HAND, advance, save_every)


FACE_BANK_GAP = 12  # training pairs a face with a bank face at least this many frames away (0.4-0.5 s)


def train_face_detail(ingest: Path, render: Path, size: int, steps: int, section: Any, device: torch.device,
                      scratch: Path, out: Path, advance: Callable[[], None] | None = None, save_every: int = 100
                      ) -> dict[str, Any]:
    """The identity's face detail model, written to out/face_detail with its bank of training faces: a `Predictor`
    reading the jaw-coloured mesh crop, the bank face most like it (`models.face_bank`; in training, the nearest
    from another moment) and the soft face the body drew, at the face model's side `size`. Nothing written for a
    render_mesh without jaw-coloured crops and landmarks, or without a visible training face."""
    data = face_crops(ingest, render, size)
    if data is None:
        return {"steps": 0, "crops": 0, "skipped": "no visible training face, or a render_mesh from before "
                                                   "jaw-coloured crops and face landmarks (run render_mesh again)"}
    conds, bank = data
    references = bank.nearest_elsewhere(FACE_BANK_GAP)
    folder = out / FACE_DETAIL
    result = _train_crops("face detail model", conds, bank.crops, steps, section, device, scratch, folder, advance,
                          save_every, references)
    bank.save(folder)
    return {**result, "bank": len(bank)}


def _train_crops(name: str, conds: np.ndarray, reals: np.ndarray, steps: int, section: Any, device: torch.device,
                 scratch: Path, folder: Path, advance: Callable[[], None] | None, save_every: int,
                 references: np.ndarray | None = None) -> dict[str, Any]:
    model = _fresh(Predictor, section.seed, inputs=2 if references is None else 3).to(device)
    result = train_crop_model(model, name, conds, reals, steps, section.predictor_lr, section.predictor_ssim,
                              section.seed, scratch, advance, save_every, references)
    model.to("cpu").save_pretrained(folder)
    return {"crops": len(conds), "resolution": int(conds.shape[1]), **result}


def train_crop_model(model: Predictor, name: str, conds: np.ndarray, reals: np.ndarray, steps: int, lr: float,
                     ssim_weight: float, seed: int, out: Path, advance: Callable[[], None] | None = None,
                     save_every: int = 100, references: np.ndarray | None = None) -> dict[str, Any]:
    """Learn a crop model (hands, face detail) in place from the identity's crops: each step, real crops made to
    look like what the body model draws there (`soften`) beside their mesh crops; the target is the real crop. So
    it learns to draw the part its mesh shows over what the body drew around it. With `references` (per crop, the
    index of another real crop), the model changes that crop instead and reads the soft one beside it."""
    def batch(gen: torch.Generator) -> Batch:
        pick = torch.randint(len(conds), (CROP_BATCH,), generator=gen).tolist()
        cond = _signed([torch.from_numpy(conds[k]).permute(2, 0, 1) for k in pick])
        real = _signed([torch.from_numpy(reals[k]).permute(2, 0, 1) for k in pick])
        if references is None:
            return (cond, soften(real, gen)), real, None
        other = _signed([torch.from_numpy(reals[references[k]]).permute(2, 0, 1) for k in pick])
        return (cond, other, soften(real, gen)), real, None

    return _train_regressor(model, name, list(range(len(conds))), batch, _l1_ssim(ssim_weight), steps, lr,
                            seed, out, advance, save_every)


def _signed(images: list[torch.Tensor]) -> torch.Tensor:
    """uint8 (3, H, W) images → one (B, 3, H, W) float batch in [-1, 1]."""
    return torch.stack(images).float().div(127.5).sub(1)


def _train_regressor(model: torch.nn.Module, name: str, identities: Sequence[Any],
                     batch: Callable[[torch.Generator], Batch],
                     loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor], steps: int,
                     lr: float, seed: int,
                     out: Path, advance: Callable[[], None] | None, save_every: int) -> dict[str, Any]:
    """The loop of the deterministic parts (refiner, predictor, hand model): AdamW with cosine decay to a tenth (the
    last steps settle instead of jitter), batches drawn on the CPU from per-step generators, resumable and
    reproducible like `train` (saved states under `out`)."""
    if not identities:
        raise StageError(f"no training frames for the {name}")
    device = next(model.parameters()).device
    model.train()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    start = _load_state(model, opt, out)
    losses: list[float] = []
    saves: list[tuple[float, int]] = []
    for step in range(start, steps):
        for group in opt.param_groups:
            group["lr"] = lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / max(steps, 1))))
        inputs, target, weight = batch(_step_gen(seed, step, 0, 2))
        loss = loss_fn(model(*(x.to(device) for x in inputs)), target.to(device),
                       None if weight is None else weight.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if (step + 1) % save_every == 0 or step + 1 == steps:
            saves.append(_save_state(model, opt, step + 1, out))
        if advance:
            advance()
    model.eval()
    return {"steps": steps, "resumed_at": start, **_save_cost(saves), **_loss_ends(losses)}


def _loss_ends(losses: list[float]) -> dict[str, float | None]:
    """Mean loss of the first and of the last tenth of the steps run: the summary's "from → to"."""
    k = max(1, len(losses) // 10)
    return {"loss_first": round(sum(losses[:k]) / k, 5) if losses else None,
            "loss_last": round(sum(losses[-k:]) / k, 5) if losses else None}
