"""SMPL-X's layout by name: joint indices, pose blocks and the point layout of the sparse body, without loading
smplx or torch (code that only needs to name a joint stays cheap to import)."""

from __future__ import annotations

NUM_BETAS = 10
NUM_EXPRESSION = 10
N_JOINTS = 55
# SMPL-X joint indices used by name elsewhere
PELVIS, NECK, HEAD, JAW, L_EYE, R_EYE = 0, 12, 15, 22, 23, 24
L_SHOULDER, R_SHOULDER, L_WRIST, R_WRIST = 16, 17, 20, 21
EXTRA = ("nose", "reye", "leye", "rear", "lear", "LBigToe", "LSmallToe", "LHeel", "RBigToe", "RSmallToe", "RHeel",
         "lthumb", "lindex", "lmiddle", "lring", "lpinky", "rthumb", "rindex", "rmiddle", "rring", "rpinky")
# output point layout of SparseBody: 55 joints, 21 vertex joints (smplx order), 51 face landmarks
EXTRA_START, LMK_START, N_POINTS = 55, 76, 127
# each hand's 15 finger joints: three per finger (base to tip), the fingers in this order
FINGERS = ("index", "middle", "pinky", "ring", "thumb")
HAND_JOINTS = {"left": tuple(range(25, 40)), "right": tuple(range(40, 55))}
WRISTS = {"left": L_WRIST, "right": R_WRIST}
# each hand's points in that layout: the wrist, the 15 finger joints, the 5 fingertips
HAND_POINTS = {"left": (L_WRIST, *HAND_JOINTS["left"], *range(EXTRA_START + 11, EXTRA_START + 16)),
               "right": (R_WRIST, *HAND_JOINTS["right"], *range(EXTRA_START + 16, EXTRA_START + 21))}
POSE_BLOCKS = {"global_orient": 3, "body_pose": 63, "jaw_pose": 3, "leye_pose": 3, "reye_pose": 3,
               "left_hand_pose": 45, "right_hand_pose": 45}
