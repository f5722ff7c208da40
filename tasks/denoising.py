"""What the two denoising stages (render_body, face) share: Algorithm 1's window layout, the sampler, the compute
dtype and the guidance scales."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from core.section import Section, check_profiles

DTYPES = ("float32", "float16", "bfloat16")


def torch_dtype(name: str) -> object:
    import torch

    return getattr(torch, name)


class WindowParams(Section):
    """Algorithm 1's window layout and sampler, shared by the body and face denoising."""

    window: int = Field(16, ge=1, le=128, description="frames per denoising window")
    overlap: int = Field(4, ge=0, le=127, description="frames shared by neighbouring windows")
    scheduler: Literal["ddim", "dpmpp", "unipc"] = Field(
        "ddim", description="sampler over the trained noise schedule: ddim, or a multistep solver (DPM-Solver++, "
        "UniPC) that reaches DDIM's frames in about half the steps")
    dtype: dict[str, Literal["float32", "float16", "bfloat16"]] = Field(
        {"tiny": "float32", "cpu": "float32", "sd15": "float16"}, description="weights and activations on a GPU, "
        "per profile (always float32 on a CPU)")

    @model_validator(mode="after")
    def _overlap(self) -> WindowParams:
        if self.overlap >= self.window:
            raise ValueError(f"overlap ({self.overlap}) must be smaller than window ({self.window})")
        check_profiles("dtype", self.dtype, lambda v: v in DTYPES, f"one of {', '.join(DTYPES)}")
        for name, low, high in (("guidance", 1, 20), ("control_scale", 0, 10)):
            if hasattr(self, name):
                check_profiles(name, getattr(self, name), lambda v, lo=low, hi=high: lo <= v <= hi,
                               f"scales must be between {low} and {high}")
        return self
