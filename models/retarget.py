"""Retarget a motion onto an identity: its shape, its camera, and its framing.

A motion comes in its own world (AMASS is z-up, TalkSHOW has no translation, another person's fit has another
camera and another posture). For a seated or standing presenter the pelvis is hidden: what must land where the
anchor's are is the head and shoulders, because a model learnt from one minute of one person cannot draw a head
where it never saw one. So, in `framing` mode:

1. one constant rotation takes the motion's mean root orientation onto the anchor's (the source world's axes go);
2. the torso's and then the head's orientation are held inside the range the anchor showed (per camera axis, its
   2nd–98th percentile plus a margin, saturating smoothly), by turning the root and the neck;
3. the head–shoulder point (mean of head and both shoulder joints, with the anchor's shape) is placed at the
   anchor's mean, its sway kept but no wider than the anchor's own (scaled to `sway_limit` of the anchor's spread
   and saturating at the anchor's range plus a margin) — depth included, so the scale is the anchor's too.

Gestures, hands, jaw and the relative sway stay the motion's own. `pelvis` mode is the earlier behaviour: the pelvis
path's mean at the anchor's mean pelvis, nothing clamped.

`framing_check` then projects the head, shoulders and wrists with the anchor's camera and says how far they go
outside the box the anchor's own training frames covered.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.spatial.transform import Rotation

from models.motion_io import Motion
from models.smplx_layout import HEAD, L_SHOULDER, L_WRIST, NECK, PELVIS, R_SHOULDER, R_WRIST

EXPRESSION = 10
SPINE = (3, 6, 9)  # spine1..3: the torso's orientation is that of spine3
TORSO_CHAIN = (PELVIS, *SPINE)
UPPER = (HEAD, L_SHOULDER, R_SHOULDER)
PARTS = {"head": (HEAD,), "shoulders": (L_SHOULDER, R_SHOULDER), "hands": (L_WRIST, R_WRIST)}
PERCENTILES = (2.0, 98.0)

#: joints(blocks) -> (T, 55, 3) posed joints in camera coordinates (transl applied), the anchor's shape
JointsFn = Callable[[dict[str, np.ndarray]], np.ndarray]


@dataclass
class Framing:
    """Where and how the anchor showed itself in its training frames (its own fit, its camera)."""

    pelvis_rest: np.ndarray  # (3,) rest pelvis joint with the anchor's shape (smplx rotates the root about it)
    orient_mean: Rotation  # mean root orientation
    pelvis_mean: np.ndarray  # (3,) mean pelvis position
    torso_mean: Rotation
    torso_range: np.ndarray  # (2, 3) rotation-vector deviations from torso_mean, low and high (radians)
    head_mean: Rotation
    head_range: np.ndarray  # (2, 3)
    upper_mean: np.ndarray  # (3,) mean head–shoulder point
    upper_std: np.ndarray  # (3,)
    upper_range: np.ndarray  # (2, 3) low and high of the head–shoulder point
    boxes_px: dict[str, np.ndarray]  # part -> (joints, 2, 2): per joint, the pixel box [[x0, y0], [x1, y1]]
    camera: dict[str, float]  # focal, cx, cy, size


def _local(blocks: dict[str, np.ndarray], joint: int) -> Rotation:
    if joint == PELVIS:
        return Rotation.from_rotvec(blocks["global_orient"].astype(np.float64))
    return Rotation.from_rotvec(blocks["body_pose"][:, 3 * (joint - 1): 3 * joint].astype(np.float64))


def torso_rotation(blocks: dict[str, np.ndarray]) -> Rotation:
    out = _local(blocks, PELVIS)
    for joint in SPINE:
        out = out * _local(blocks, joint)
    return out


def head_rotation(blocks: dict[str, np.ndarray]) -> Rotation:
    return torso_rotation(blocks) * _local(blocks, NECK) * _local(blocks, HEAD)


def _deviation(rot: Rotation, mean: Rotation) -> np.ndarray:
    """Per-frame deviation from `mean` as a rotation vector in camera axes (x: pitch, y: yaw, z: roll)."""
    return (rot * mean.inv()).as_rotvec()


def _spread(values: np.ndarray) -> np.ndarray:
    return np.percentile(values, PERCENTILES, axis=0)


def _saturate(x: np.ndarray, low: np.ndarray, high: np.ndarray, margin: float) -> np.ndarray:
    """Unchanged inside [low, high]; beyond, approaching the bound + `margin` smoothly (tanh, slope 1 at the
    bound), so a motion within the anchor's range is left alone and nothing jumps at the edge."""
    margin = max(margin, 1e-9)
    above = high + margin * np.tanh((x - high) / margin)
    below = low - margin * np.tanh((low - x) / margin)
    return np.where(x > high, above, np.where(x < low, below, x))


def project(points: np.ndarray, camera: dict[str, float]) -> np.ndarray:
    z = np.maximum(points[..., 2:3], 1e-3)
    return points[..., :2] / z * camera["focal"] + np.array([camera["cx"], camera["cy"]])


def framing_of(blocks: dict[str, np.ndarray], pelvis_rest: np.ndarray, joints: JointsFn,
               camera: dict[str, float]) -> Framing:
    """The anchor's framing from its own fitted training frames."""
    torso, head = torso_rotation(blocks), head_rotation(blocks)
    torso_mean, head_mean = torso.mean(), head.mean()
    posed = joints(blocks)
    upper = posed[:, UPPER].mean(1)
    px = project(posed, camera)
    low, high = (0, 100) if len(px) < 20 else (1, 99)  # a handful of frames: their whole range
    boxes = {part: np.stack([np.percentile(px[:, j], (low, high), axis=0) for j in idx]) for part, idx in PARTS.items()}
    return Framing(
        pelvis_rest=np.asarray(pelvis_rest, np.float64),
        orient_mean=Rotation.from_rotvec(blocks["global_orient"].astype(np.float64)).mean(),
        pelvis_mean=(blocks["transl"].astype(np.float64) + pelvis_rest).mean(0),
        torso_mean=torso_mean, torso_range=_spread(_deviation(torso, torso_mean)),
        head_mean=head_mean, head_range=_spread(_deviation(head, head_mean)),
        upper_mean=upper.mean(0), upper_std=upper.std(0), upper_range=_spread(upper),
        boxes_px=boxes, camera={k: float(camera[k]) for k in ("focal", "cx", "cy", "size")})


def _blocks(motion: Motion, global_orient: np.ndarray, transl: np.ndarray, body_pose: np.ndarray
            ) -> dict[str, np.ndarray]:
    expr = np.zeros((motion.frames, EXPRESSION), np.float32)
    width = min(EXPRESSION, motion.expression.shape[1])
    expr[:, :width] = motion.expression[:, :width]
    return {
        "global_orient": global_orient.astype(np.float32),
        "transl": transl.astype(np.float32),
        "body_pose": body_pose.astype(np.float32),
        "left_hand_pose": motion.left_hand_pose.astype(np.float32),
        "right_hand_pose": motion.right_hand_pose.astype(np.float32),
        "jaw_pose": motion.jaw_pose.astype(np.float32),
        "leye_pose": motion.leye_pose.astype(np.float32),
        "reye_pose": motion.reye_pose.astype(np.float32),
        "expression": expr,
    }


def _clamp(rot: Rotation, mean: Rotation, rng: np.ndarray, margin: float) -> tuple[Rotation, np.ndarray]:
    """The rotation that brings `rot` inside mean ± range (+ margin), premultiplied; and whether it was needed."""
    dev = _deviation(rot, mean)
    held = _saturate(dev, rng[0], rng[1], margin)
    moved = np.abs(held - dev).max(1) > np.deg2rad(0.5)
    return Rotation.from_rotvec(held) * mean * rot.inv(), moved


def retarget(motion: Motion, framing: Framing, joints: JointsFn, *, mode: str = "framing",
             orientation_margin_deg: float = 10.0, position_margin_m: float = 0.01, sway_limit: float = 1.0
             ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """SMPL-X parameter blocks for the identity, and what retargeting did (said in the render's summary)."""
    rot = Rotation.from_rotvec(motion.global_orient.astype(np.float64))
    align = framing.orient_mean * rot.mean().inv()
    root = align * rot
    pelvis = motion.transl.astype(np.float64) + framing.pelvis_rest  # the motion's pelvis, in its own world
    path = align.apply(pelvis - pelvis.mean(0))  # its sway, in the anchor's axes
    body_pose = motion.body_pose.astype(np.float64).copy()
    if mode == "pelvis":
        transl = path + framing.pelvis_mean - framing.pelvis_rest
        return _blocks(motion, root.as_rotvec(), transl, body_pose), {"mode": "pelvis"}

    margin = np.deg2rad(orientation_margin_deg)
    blocks = _blocks(motion, root.as_rotvec(), np.zeros_like(path), body_pose)
    fix, torso_moved = _clamp(torso_rotation(blocks), framing.torso_mean, framing.torso_range, margin)
    root = fix * root
    blocks["global_orient"] = root.as_rotvec().astype(np.float32)
    # the head: turn the neck so that the head's global orientation comes inside the anchor's range
    fix, head_moved = _clamp(head_rotation(blocks), framing.head_mean, framing.head_range, margin)
    parent = torso_rotation(blocks)
    neck = parent.inv() * fix * parent * _local(blocks, NECK)
    body_pose[:, 3 * (NECK - 1): 3 * NECK] = neck.as_rotvec()
    blocks["body_pose"] = body_pose.astype(np.float32)

    # where the head and shoulders are with the root at the origin of transl, and where the motion's sway takes them
    still = joints(blocks)[:, UPPER].mean(1).astype(np.float64)
    natural = still + path
    sway = natural - natural.mean(0)
    spread = np.maximum(sway.std(0), 1e-9)
    sway = sway * np.minimum(1.0, sway_limit * framing.upper_std / spread)
    sway = _saturate(sway, framing.upper_range[0] - framing.upper_mean, framing.upper_range[1] - framing.upper_mean,
                     position_margin_m)
    transl = framing.upper_mean + sway - still
    blocks["transl"] = transl.astype(np.float32)
    said = {"mode": "framing",
            "torso_clamped_frames": int(torso_moved.sum()), "head_clamped_frames": int(head_moved.sum()),
            "torso_range_deg": np.rad2deg(framing.torso_range).round(1).tolist(),
            "head_range_deg": np.rad2deg(framing.head_range).round(1).tolist()}
    return blocks, said


def framing_check(blocks: dict[str, np.ndarray], framing: Framing, joints: JointsFn, tolerance_pct: float = 2.0
                  ) -> dict[str, Any]:
    """How far the head, shoulders and wrists go outside the boxes each covered in the anchor's training frames, in
    percent of the frame side: per part, the share of frames beyond `tolerance_pct` and the worst distance."""
    px = project(joints(blocks), framing.camera)
    size = framing.camera["size"]
    out: dict[str, Any] = {}
    outside_any = np.zeros(len(px), bool)
    for part, idx in PARTS.items():
        lo, hi = framing.boxes_px[part][:, 0], framing.boxes_px[part][:, 1]  # per joint: a left wrist keeps to its own
        pts = px[:, idx]
        gap = np.maximum(np.maximum(lo - pts, pts - hi), 0.0)
        dist = 100.0 * np.linalg.norm(gap, axis=-1).max(1) / size
        beyond = dist > tolerance_pct
        if part != "hands":
            outside_any |= beyond
        out[part] = {"outside_share": round(float(beyond.mean()), 4), "worst_pct": round(float(dist.max()), 2)}
    out["head_or_shoulders_outside_share"] = round(float(outside_any.mean()), 4)
    out["tolerance_pct"] = tolerance_pct
    return out
