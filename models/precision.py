"""Which reduced precision a device computes natively: one answer for training, its bench and rendering.

bf16 autocast on a GPU that only emulates it (compute capability below 8.0: V100, T4) runs several times slower
than fp16 with a gradient scaler, so a profile's `bf16` falls back to `fp16` there; a CPU trains in float32.
"""

from __future__ import annotations

import torch

AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": None}


def native_bf16(device: torch.device) -> bool:
    """bf16 in hardware on this device (NVIDIA: Ampere, compute capability 8.0, and later; ROCm: what torch says)."""
    if device.type != "cuda":
        return False
    if torch.version.hip:
        with torch.cuda.device(device):
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    return torch.cuda.get_device_capability(device)[0] >= 8


def training_precision(requested: str, device: torch.device) -> str:
    """The autocast a training run on `device` uses for a requested `no`/`fp16`/`bf16`/`auto`: `no` on a CPU,
    `bf16` only where it is native (else `fp16`, with a gradient scaler), `auto` the fastest of the two."""
    if requested not in (*AMP, "auto"):
        raise ValueError(f"mixed precision {requested!r}: expected one of no, fp16, bf16, auto")
    if device.type != "cuda" or requested == "no":
        return "no"
    if requested in ("bf16", "auto"):
        return "bf16" if native_bf16(device) else "fp16"
    return requested


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """fp16's gradients underflow without loss scaling; bf16's and float32's do not."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16" and device.type == "cuda")
