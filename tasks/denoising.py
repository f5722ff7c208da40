"""What the two denoising stages (render_body, face) share: Algorithm 1's window layout, the sampler, the compute
dtype and the guidance scales."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from core.section import PROFILES, Section, check_profiles

DTYPES = ("float32", "float16", "bfloat16")


def torch_dtype(name: str) -> object:
    import torch

    return getattr(torch, name)


class WindowParams(Section):
    """Algorithm 1's window layout and sampler, shared by the body and face denoising."""

    window: int = Field(16, ge=1, le=128, description="frames per denoising window")
    overlap: int = Field(4, ge=0, le=127, description="frames shared by neighbouring windows")
    scheduler: dict[str, Literal["ddim", "dpmpp", "unipc"]] = Field(
        {"tiny": "ddim", "cpu": "dpmpp", "sd15": "ddim"}, description="sampler over the trained noise schedule, per "
        "profile: ddim (the paper's), or a multistep solver (DPM-Solver++, UniPC) that reaches DDIM's frames in about "
        "half the steps")
    steps: dict[str, int] = Field({"tiny": 20, "cpu": 4, "sd15": 20}, description="denoising steps, per profile "
                                  "(paper: 20 DDIM steps; cpu: 4 DPM-Solver++ steps, which its x0 model renders as "
                                  "well as 10: SSIM in the person 0.672/0.695 against 0.671/0.695 on two stretches of "
                                  "the seated test clip)")
    dtype: dict[str, Literal["float32", "float16", "bfloat16"]] = Field(
        {"tiny": "float32", "cpu": "float32", "sd15": "float16"}, description="weights and activations on a GPU, "
        "per profile (always float32 on a CPU)")

    @model_validator(mode="before")
    @classmethod
    def _one_for_all(cls, data: Any) -> Any:
        """A single value for a per-profile knob holds for every profile (params.yaml files before the tables)."""
        if isinstance(data, dict):
            for name in ("scheduler", "steps"):
                if name in data and not isinstance(data[name], dict):
                    data = {**data, name: dict.fromkeys(PROFILES, data[name])}
        return data

    @model_validator(mode="after")
    def _overlap(self) -> WindowParams:
        if self.overlap >= self.window:
            raise ValueError(f"overlap ({self.overlap}) must be smaller than window ({self.window})")
        check_profiles("dtype", self.dtype, lambda v: v in DTYPES, f"one of {', '.join(DTYPES)}")
        check_profiles("scheduler", self.scheduler, lambda v: True, "")
        check_profiles("steps", self.steps, lambda v: 1 <= v <= 1000, "steps must be between 1 and 1000")
        for name, low, high in (("guidance", 1, 20), ("control_scale", 0, 10), ("strength", 0, 1)):
            if hasattr(self, name):
                check_profiles(name, getattr(self, name), lambda v, lo=low, hi=high: lo <= v <= hi,
                               f"scales must be between {low} and {high}")
        return self
