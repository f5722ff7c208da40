"""What the two denoising stages (render_body, face) share: Algorithm 1's window layout and the guidance scales."""

from __future__ import annotations

from pydantic import Field, model_validator

from core.section import Section, check_profiles


class WindowParams(Section):
    """Algorithm 1's window layout, shared by the body and face denoising."""

    window: int = Field(16, ge=1, le=128, description="frames per denoising window")
    overlap: int = Field(4, ge=0, le=127, description="frames shared by neighbouring windows")

    @model_validator(mode="after")
    def _overlap(self) -> WindowParams:
        if self.overlap >= self.window:
            raise ValueError(f"overlap ({self.overlap}) must be smaller than window ({self.window})")
        for name, low, high in (("guidance", 1, 20), ("control_scale", 0, 10)):
            if hasattr(self, name):
                check_profiles(name, getattr(self, name), lambda v, lo=low, hi=high: lo <= v <= hi,
                               f"scales must be between {low} and {high}")
        return self
