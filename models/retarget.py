"""Retarget a motion onto an identity: its shape, its camera, and its usual place in the frame.

A motion comes in its own world (AMASS is z-up, TalkSHOW has no translation, another person's fit has another
camera). One constant rotation takes the motion's mean root orientation onto the identity's mean orientation, and
the pelvis path is moved so that its mean sits where the identity's pelvis usually is, in the identity's camera. The
motion keeps its own turning, swaying and gestures; cross-person motion lands in the identity's scene.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation

from models.motion_io import Motion

EXPRESSION = 10


def retarget(motion: Motion, *, pelvis_rest: np.ndarray, ref_orient: np.ndarray, ref_pelvis: np.ndarray
             ) -> dict[str, np.ndarray]:
    """SMPL-X parameter blocks for the identity.

    pelvis_rest: the identity's rest pelvis joint (shape applied, no pose) — smplx rotates the root about it;
    ref_orient (N,3) and ref_pelvis (N,3): the identity's fitted root orientations and pelvis positions in camera
    coordinates, whose means are the target framing.
    """
    rot = Rotation.from_rotvec(motion.global_orient.astype(np.float64))
    align = Rotation.from_rotvec(ref_orient.astype(np.float64)).mean() * rot.mean().inv()
    pelvis = motion.transl.astype(np.float64) + pelvis_rest  # the motion's pelvis, in its own world
    moved = align.apply(pelvis - pelvis.mean(0)) + ref_pelvis.mean(0)
    expr = np.zeros((motion.frames, EXPRESSION), np.float32)
    width = min(EXPRESSION, motion.expression.shape[1])
    expr[:, :width] = motion.expression[:, :width]
    return {
        "global_orient": (align * rot).as_rotvec().astype(np.float32),
        "transl": (moved - pelvis_rest).astype(np.float32),
        "body_pose": motion.body_pose.astype(np.float32),
        "left_hand_pose": motion.left_hand_pose.astype(np.float32),
        "right_hand_pose": motion.right_hand_pose.astype(np.float32),
        "jaw_pose": motion.jaw_pose.astype(np.float32),
        "leye_pose": motion.leye_pose.astype(np.float32),
        "reye_pose": motion.reye_pose.astype(np.float32),
        "expression": expr,
    }
