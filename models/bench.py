"""GPU benchmarks of the full-size models, runnable on a bare GPU box: `python -m models.bench {train,render} …`.

They import only this layer and its libraries (torch, diffusers, transformers, numpy), never the orchestration
stack, so a machine lent for an hour needs nothing but PyTorch and these packages. The weights are random
(`models.shapes`): speed and memory depend on the shapes, not on the values. `anchor bench train|render --profile
sd15-shapes` calls the same functions.

    python -m models.bench train --device cuda          # one training step, 512², batch 1 × 4 frames
    python -m models.bench render --device cuda --frames 300   # 20 DDIM steps with CFG, window 16 / overlap 4
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from models import shapes
from models.overlap import evaluations_per_step
from models.precision import AMP, grad_scaler, training_precision

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def pick_device(name: str) -> torch.device:
    """`auto` is CUDA when present; asking for CUDA on a machine without it is an error, never a silent CPU run."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r}: this machine has no CUDA device (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device


class _Peak:
    """Peak device memory (CUDA) and the process's peak RSS over a block, in GB."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.vram_gb = device, None

    def __enter__(self) -> _Peak:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.vram_gb = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
        self.rss_gb = round(shapes.peak_rss_mb() / 1024, 2)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(device: str = "auto", resolution: int = 512, frames: int = 4, batch: int = 1, steps: int = 3,
          mixed_precision: str = "auto", optimizer: str = "adamw", channels_last: bool = False,
          compile: bool = False, seed: int = 0, factor: int = 8) -> dict[str, Any]:
    """Seconds per training step of the full-size body SGDM as `pretrain`/`finetune` train it: temporal modules
    frozen, gradient checkpointing, SDPA attention, autocast (bf16 where the GPU has it), AdamW. The first step
    (allocation, kernel selection, compilation) is a warm-up and not timed; `step_s` is the mean of the rest.
    Latents are `factor` times smaller than the images (SD's VAE: 8)."""
    dev = pick_device(device)
    mixed_precision = training_precision(mixed_precision, dev)  # as training resolves it, for this very device
    amp = AMP[mixed_precision]
    g = torch.Generator().manual_seed(seed)
    model = shapes.sd15_shapes_models(gradient_checkpointing=True)
    model.freeze_temporal()
    model.train().to(dev)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    forward = torch.compile(model) if compile else model
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-5) if optimizer == "adamw" else None
    scaler = grad_scaler(mixed_precision, dev)
    schedule = shapes.sd15_scheduler()
    latent = resolution // factor

    def step() -> float:
        x0 = torch.randn(batch, 4, frames, latent, latent, generator=g).to(dev)
        noise = torch.randn(x0.shape, generator=g).to(dev)
        t = torch.randint(0, schedule.config.num_train_timesteps, (batch,), generator=g)
        cond = torch.rand(batch, 3, frames, resolution, resolution, generator=g).to(dev)
        tokens = torch.randn(batch, shapes.CLIP_VIT_L14_TOKENS, model.token_dim, generator=g).to(dev)
        with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
            pred = forward(schedule.add_noise(x0, noise, t).to(dev), t.to(dev), tokens, cond)
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        scaler.scale(loss).backward()
        if opt is not None:
            scaler.step(opt)
            scaler.update()
        model.zero_grad(set_to_none=True)
        return float(loss.detach())

    step()  # warm-up
    with _Peak(dev) as peak:
        _sync(dev)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(dev)
        seconds = (time.perf_counter() - start) / steps
    return {"device": str(dev), "resolution": resolution, "frames": frames, "batch": batch,
            "step_s": round(seconds, 3), "peak_vram_gb": peak.vram_gb, "peak_rss_gb": peak.rss_gb,
            "mixed_precision": mixed_precision, "optimizer": optimizer, "gradient_checkpointing": True,
            "trainable_m": round(sum(p.numel() for p in trainable) / 1e6, 1),
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1)}


class _MovingShapes(Sequence):
    """Mesh-like condition images, a blob moving through `cycle` positions: all made up front (uint8, before any
    clock starts), then handed out by index, so the timed region does no image maths and a long benchmark holds
    `cycle` images, not a video."""

    def __init__(self, n: int, side: int, cycle: int = 64) -> None:
        self.n, self.side = n, side
        yy, xx = np.mgrid[:side, :side] / side
        self.pool = []
        for i in range(min(n, cycle)):
            cx, cy = 0.5 + 0.2 * np.sin(i / 9), 0.4 + 0.1 * np.cos(i / 7)
            blob = ((xx - cx) ** 2 + (yy - cy) ** 2 < 0.04).astype(np.uint8)
            self.pool.append(np.stack([blob * 200, blob * 120 + 30, 255 - blob * 200], axis=-1).astype(np.uint8))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        return self.pool[i % len(self.pool)]


def render(device: str = "auto", frames: int = 300, steps: int = 20, resolution: int = 512, window: int = 16,
           overlap: int = 4, guidance: float = 3.5, scheduler: str = "ddim", dtype: str = "auto",
           channels_last: bool = False, seed: int = 0, max_latent_mb: int = 2048,
           progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Seconds to render `frames` frames with the full-size pipeline: reference encoding, Algorithm 1 (both CFG
    branches in one batched call), decoding a window at a time. Frames are discarded as they come out. The inputs
    are made and one window is rendered for one step (allocation, kernel selection) before the clock starts."""
    dev = pick_device(device)
    if dtype == "auto":
        dtype = "fp16" if dev.type == "cuda" else "fp32"
    pipe = shapes.sd15_shapes_pipeline(resolution).to(dev, DTYPES[dtype])
    pipe.use_scheduler(scheduler)
    if channels_last:
        pipe.sgdm.to(memory_format=torch.channels_last)
    conditions = _MovingShapes(frames, resolution)
    reference = conditions[0]
    pipe([conditions[i] for i in range(min(window, frames))], reference, steps=1, guidance=guidance, window=window,
         overlap_frames=overlap, output=lambda first, done: None)  # the warm-up, untimed
    _sync(dev)
    with _Peak(dev) as peak:
        start = time.perf_counter()
        pipe(conditions, reference, steps=steps, guidance=guidance, window=window, overlap_frames=overlap,
             generator=torch.Generator().manual_seed(seed), output=lambda first, done: None, callback=progress,
             max_latent_bytes=max_latent_mb << 20)
        _sync(dev)
        seconds = time.perf_counter() - start
    return {"device": str(dev), "resolution": resolution, "frames": frames, "steps": steps, "scheduler": scheduler,
            "dtype": dtype, "seconds": round(seconds, 2), "frames_per_s": round(frames / seconds, 3),
            "frame_evals_per_step": evaluations_per_step(frames, window, overlap), "cfg_batched": guidance != 1.0,
            "peak_vram_gb": peak.vram_gb, "peak_rss_gb": peak.rss_gb}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    t = sub.add_parser("train", help="seconds per training step of the full-size body SGDM")
    r = sub.add_parser("render", help="seconds to render a motion with the full-size pipeline")
    for p in (t, r):
        p.add_argument("--profile", default="sd15-shapes", choices=["sd15-shapes"],
                       help="the full-size architecture with random weights")
        p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
        p.add_argument("--resolution", type=int, default=512)
        p.add_argument("--channels-last", action="store_true", help="channels-last memory format for the convs")
        p.add_argument("--json", action="store_true", help="(the output is always one JSON object)")
    t.add_argument("--frames", type=int, default=4)
    t.add_argument("--batch", type=int, default=1)
    t.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    t.add_argument("--mixed-precision", default="auto", choices=["auto", "bf16", "fp16", "no"])
    t.add_argument("--optimizer", default="adamw", choices=["adamw", "none"],
                   help="none: forward and backward only (a CPU without room for AdamW's state)")
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    r.add_argument("--frames", type=int, default=300)
    r.add_argument("--steps", type=int, default=20)
    r.add_argument("--scheduler", default="ddim", choices=["ddim", "dpmpp", "unipc"])
    r.add_argument("--dtype", default="auto", choices=["auto", "fp16", "bf16", "fp32"])
    r.add_argument("--max-latent-mb", type=int, default=2048,
                   help="latents and sampler history beyond this go to a scratch file")
    args = parser.parse_args(argv)
    try:
        if args.what == "train":
            result = train(args.device, args.resolution, args.frames, args.batch, args.steps, args.mixed_precision,
                           args.optimizer, args.channels_last, args.compile)
        else:
            result = render(args.device, args.frames, args.steps, args.resolution, scheduler=args.scheduler,
                            dtype=args.dtype, channels_last=args.channels_last, max_latent_mb=args.max_latent_mb)
    except RuntimeError as e:
        parser.exit(2, f"error: {e}\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
