"""The params of the two training stages (pretrain, finetune) and how their summaries read: cheap to import, so
declaring the stages loads no model code (tasks/training.py holds the loop)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from core.section import PROFILES, Section, check_profiles

TRAIN_LOG = "train_log.json"  # beside each checkpoint: the profile it was trained on, and its losses

class TrainParams(Section):
    """The sections of pretrain and finetune; numbers keyed by profile so one file serves every machine."""

    steps: dict[str, int] = Field({"tiny": 30, "cpu": 0, "sd15": 300000}, description="body model steps (cpu: "
                                  "nothing shared to learn before the identity, so its pretrain only initialises)")
    face_steps: dict[str, int] = Field({"tiny": 30, "cpu": 0, "sd15": 300000}, description="face model steps")
    lr: dict[str, float] = Field({"tiny": 1e-3, "cpu": 5e-4, "sd15": 1e-5})
    resolution: dict[str, int] = Field({"tiny": 64, "cpu": 256, "sd15": 512}, description="body frames, px (the "
                                       "output's, also with a refiner)")
    face_resolution: dict[str, int] = Field({"tiny": 64, "cpu": 96, "sd15": 256}, description="face crops, px "
                                            "(cpu: 96, about the face's own size in a 256 px frame)")
    ema: dict[str, float] = Field({"tiny": 0.0, "cpu": 0.995, "sd15": 0.0}, description="decay of the weight "
                                  "average kept as the result (0 = the last weights)")
    hand_weight: dict[str, float] = Field(
        {"tiny": 2.0, "cpu": 1.0, "sd15": 1.0}, description="the body model's loss weight inside each hand's square "
        "(render_mesh's hands.parquet), per profile: hands are about 20 px of a 256 px frame, and an even loss "
        "spends almost nothing on them (1 = even)")
    video_length: int = Field(4, ge=1, le=32, description="frames per training clip (paper: 4)")
    batch_size: int = Field(1, ge=1, le=256)
    grad_accum: int = Field(1, ge=1, le=1024)
    warmup: int = Field(0, ge=0, description="linear learning-rate warm-up steps")
    ref_drop: float = Field(0.1, ge=0, le=1, description="share of samples trained without the reference image, "
                            "so classifier-free guidance has a trained unconditional branch")
    perturbed_share: dict[str, float] = Field(
        {"tiny": 0.5, "cpu": 0.0, "sd15": 0.5}, description="share of samples conditioned on a perturbed mesh, per "
        "profile (cpu: none; its model learns one person from minutes of steps, and the exact mesh teaches it where "
        "the body is)")
    save_every: dict[str, int] = Field(
        {"tiny": 100, "cpu": 100, "sd15": 2000}, description="steps between resumable training states, per profile "
        "(an sd15 state is ~15 GB: weights and AdamW moments; the summary reports what the saves cost)")
    mixed_precision: dict[str, Literal["no", "fp16", "bf16"]] = Field(
        {"tiny": "no", "cpu": "no", "sd15": "bf16"}, description="autocast on a GPU, per profile (a CPU trains in "
        "float32 whatever this says; bf16 on a GPU without it in hardware trains in fp16 with a gradient scaler)")
    gradient_checkpointing: dict[str, bool] = Field(
        {"tiny": False, "cpu": False, "sd15": True}, description="recompute activations in the backward pass: less "
        "memory, more time, per profile")
    seed: int = Field(0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _one_for_all(cls, data: Any) -> Any:
        """A single value for a per-profile knob holds for every profile (params.yaml files before the tables)."""
        if isinstance(data, dict):
            for name in ("mixed_precision", "gradient_checkpointing", "perturbed_share", "save_every", "hand_weight",
                         "conditioning"):
                if name in data and not isinstance(data[name], dict):
                    data = {**data, name: dict.fromkeys(PROFILES, data[name])}
        return data

    def per_profile(self) -> list[str]:
        """The knobs keyed by profile: every table field, a subclass's own included."""
        return [n for n in type(self).model_fields if isinstance(getattr(self, n), dict)]

    @model_validator(mode="after")
    def _profiles(self) -> TrainParams:
        for name in self.per_profile():
            if name == "ema":
                check_profiles(name, self.ema, lambda v: 0 <= v < 1, "decays must be in [0, 1)")
            elif name == "perturbed_share":
                check_profiles(name, self.perturbed_share, lambda v: 0 <= v <= 1, "shares must be in [0, 1]")
            elif name == "hand_weight":
                check_profiles(name, self.hand_weight, lambda v: v > 0, "weights must be positive")
            elif name == "save_every":
                check_profiles(name, self.save_every, lambda v: v >= 1, "values must be at least 1")
            elif name in ("mixed_precision", "gradient_checkpointing", "conditioning"):
                check_profiles(name, getattr(self, name), lambda v: True, "")
            else:
                check_profiles(name, getattr(self, name), lambda v: v >= 0, "values must not be negative")
        return self

    def for_profile(self, profile: str) -> dict[str, float]:
        return {n: getattr(self, n)[profile] for n in self.per_profile()}


def sgdm_side(prof: dict[str, Any]) -> int:
    """The side a profile's body SGDM learns and renders at (`for_profile`'s values): the output's, or half of it
    when a refiner makes the rest."""
    return int(prof["resolution"]) // (2 if prof.get("refiner_steps") else 1)


PLACES = {"input": "mesh and reference at the input", "both": "mesh and reference at the input, mesh in the branch too"}


def describe(s: dict[str, Any]) -> str:
    """A training stage's summary: per model, steps and loss."""
    def one(which: str, m: dict[str, Any]) -> str:
        text = f"{which} {m['steps']} steps, loss {m['loss_first']} → {m['loss_last']}"
        if place := PLACES.get(m.get("conditioning", "branch")):
            text += f", {place}"
        if m.get("hand_weight"):
            text += f", hands weighted {m['hand_weight']}× in {m.get('hand_frames', 0)} frames"
        if m.get("saves"):
            text += f", {m['saves']} saved states ({m['save_s']} s, {m['state_mb']} MB each)"
        for part in ("predictor", "refiner"):
            if isinstance(r := m.get(part), dict):
                text += f" ({part} {r['steps']} steps, loss {r['loss_first']} → {r['loss_last']})"
        return text

    text = "; ".join(one(which, m) for which in ("body", "face") if isinstance(m := s.get(which), dict))
    for key, name in (("hand", "hand model"), ("face_detail", "face detail model")):
        if isinstance(h := s.get(key), dict):
            text += (f"; {name}: {h['skipped']}" if h.get("skipped") else
                     f"; {name} {h['steps']} steps on {h['crops']} crops, loss {h['loss_first']} → {h['loss_last']}")
    return text


