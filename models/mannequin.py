"""A license-free SMPL-X "mannequin": an artist's jointed figure built from capsules and ball joints.

The real SMPL-X files are licensed and cannot ship, so the pipeline generates this body model instead. It has
SMPL-X's exact layout — 10475 vertices, 20908 faces, the 55-joint kinematic tree in SMPL-X order, skinning
weights, J_regressor, shape and expression directions (300 + 100), pose correctives, hand PCA, 51 face landmarks
and the 79×17 dynamic contour table — so `smplx.create` loads it like the real thing, and every vertex id smplx
uses for extra joints (nose, eyes, ears, fingertips, toes, heels) sits where its name says.

Geometry is built from Winter's segment proportions (Biomechanics and Motor Control of Human Movement) for a 1.70 m
neutral adult in a T-pose, SMPL-X coordinates (y up, x to the person's left, z forward). Every joint owns a small
sphere whose vertex mean *is* the joint, so J_regressor stays exact under any shape. Shape and expression directions
are the generator's own derivatives with respect to named dimensions (height, girth, limb lengths…; mouth, brows…),
so they are linear blend shapes by construction. Pose correctives are zero: rigid parts meeting at ball joints need
none.

Deterministic: the same code gives the same bytes (no randomness but a fixed-seed completion of the hand PCA).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models.npz import write_npz
from models.smplx_layout import FINGERS  # SMPL-X order within each hand

N_VERTS = 10475
N_FACES = 20908
N_JOINTS = 55
SHAPE_SPACE, EXPR_SPACE = 300, 100
HEIGHT = 1.70

PARENTS = np.array([-1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 15, 15, 15,
                    20, 25, 26, 20, 28, 29, 20, 31, 32, 20, 34, 35, 20, 37, 38,
                    21, 40, 41, 21, 43, 44, 21, 46, 47, 21, 49, 50, 21, 52, 53], dtype=np.int64)
J = {name: i for i, name in enumerate((
    "pelvis", "left_hip", "right_hip", "spine1", "left_knee", "right_knee", "spine2", "left_ankle", "right_ankle",
    "spine3", "left_foot", "right_foot", "neck", "left_collar", "right_collar", "head", "left_shoulder",
    "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist", "jaw", "left_eye", "right_eye"))}
for _side, _base in (("left", 25), ("right", 40)):
    for _f, _finger in enumerate(FINGERS):
        for _k in range(3):
            J[f"{_side}_{_finger}{_k + 1}"] = _base + 3 * _f + _k

# smplx's VERTEX_IDS['smplx'], the vertices it appends as extra joints: these must sit at the named spots.
SPECIAL_VERTICES = {
    "nose": 9120, "reye": 9929, "leye": 9448, "rear": 616, "lear": 6,
    "rthumb": 8079, "rindex": 7669, "rmiddle": 7794, "rring": 7905, "rpinky": 8022,
    "lthumb": 5361, "lindex": 4933, "lmiddle": 5058, "lring": 5169, "lpinky": 5286,
    "LBigToe": 5770, "LSmallToe": 5780, "LHeel": 8846, "RBigToe": 8463, "RSmallToe": 8474, "RHeel": 8635,
}

# Shape directions: beta k changes one body dimension by this relative amount per unit (a ±2 range is plausible).
SHAPE_DIMS = ("height", "girth", "arm_length", "leg_length", "shoulder_width", "hip_width", "torso_length",
              "head_size", "neck_length", "hand_size")
SHAPE_STEP = {"height": 0.04, "girth": 0.10, "arm_length": 0.05, "leg_length": 0.05, "shoulder_width": 0.07,
              "hip_width": 0.07, "torso_length": 0.05, "head_size": 0.05, "neck_length": 0.15, "hand_size": 0.06}
# Expression directions: displacement fields on the face, metres per unit coefficient.
EXPR_DIMS = ("mouth_open", "smile", "mouth_wide", "pucker", "brows_up", "brow_furrow", "upper_lip_up",
             "lower_lip_down", "smirk", "cheeks_puff")


@dataclass
class _Mesh:
    """Vertices with skinning weights and names of vertices of interest, accumulated part by part."""

    verts: list[np.ndarray] = field(default_factory=list)
    faces: list[np.ndarray] = field(default_factory=list)
    weights: list[np.ndarray] = field(default_factory=list)
    parts: list[str] = field(default_factory=list)
    count: int = 0
    marks: dict[str, int] = field(default_factory=dict)
    ranges: dict[str, tuple[int, int]] = field(default_factory=dict)

    def add(self, name: str, verts: np.ndarray, faces: np.ndarray, weights: np.ndarray | int) -> int:
        start = self.count
        n = len(verts)
        if isinstance(weights, int | np.integer):
            w = np.zeros((n, N_JOINTS))
            w[:, int(weights)] = 1.0
        else:
            w = weights
        self.verts.append(np.asarray(verts, float))
        self.faces.append(np.asarray(faces, np.int64) + start)
        self.weights.append(w)
        self.parts += [name] * n
        self.ranges[name] = (start, start + n)
        self.count += n
        return start


def _sphere(n_lat: int, n_lon: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit UV sphere, poles on ±z (the local axis); rings of n_lon between them."""
    theta = np.linspace(0, np.pi, n_lat + 1)[1:-1]
    phi = np.linspace(0, 2 * np.pi, n_lon, endpoint=False)
    t, p = np.meshgrid(theta, phi, indexing="ij")
    ring = np.stack([np.sin(t) * np.cos(p), np.sin(t) * np.sin(p), np.cos(t)], -1).reshape(-1, 3)
    verts = np.concatenate([[[0, 0, 1.0]], ring, [[0, 0, -1.0]]])
    return verts, _ring_faces(n_lat - 1, n_lon, top=0, first=1, bottom=len(verts) - 1)


def _ring_faces(rings: int, n: int, top: int, first: int, bottom: int) -> np.ndarray:
    """Triangles of a closed band of `rings` rings of n vertices, capped by fans to a top and a bottom vertex."""
    faces = [(top, first + (j + 1) % n, first + j) for j in range(n)]
    for r in range(rings - 1):
        a, b = first + r * n, first + (r + 1) * n
        for j in range(n):
            j1 = (j + 1) % n
            faces += [(a + j, a + j1, b + j), (a + j1, b + j1, b + j)]
    last = first + (rings - 1) * n
    faces += [(bottom, last + j, last + (j + 1) % n) for j in range(n)]
    return np.array(faces, np.int64)


def _frame(axis: np.ndarray, up_hint: np.ndarray) -> np.ndarray:
    """Orthonormal (u, v, axis) with u as close to up_hint as the axis allows."""
    a = axis / np.linalg.norm(axis)
    u = up_hint - a * np.dot(up_hint, a)
    if np.linalg.norm(u) < 1e-6:
        u = np.cross(a, [1.0, 0, 0]) if abs(a[0]) < 0.9 else np.cross(a, [0, 1.0, 0])
    u /= np.linalg.norm(u)
    return np.stack([u, np.cross(a, u), a])


def _capsule(p0: np.ndarray, p1: np.ndarray, r0: tuple[float, float], r1: tuple[float, float], n_rings: int,
             n_seg: int, up: np.ndarray, cap: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """A tube from p0 to p1 with elliptical sections (r along `up`, r across), closed by rounded caps."""
    axis = p1 - p0
    u, v, a = _frame(axis, up)
    t = np.linspace(0, 1, n_rings)
    phi = np.linspace(0, 2 * np.pi, n_seg, endpoint=False)
    ru = np.interp(t, [0, 1], [r0[0], r1[0]])[:, None]
    rv = np.interp(t, [0, 1], [r0[1], r1[1]])[:, None]
    ring = p0[None, None] + t[:, None, None] * axis
    pts = ring + ru[..., None] * np.cos(phi)[None, :, None] * u + rv[..., None] * np.sin(phi)[None, :, None] * v
    start_cap = p0 - a * cap * min(r0) * 0.8
    end_cap = p1 + a * cap * min(r1) * 0.8
    verts = np.concatenate([[start_cap], pts.reshape(-1, 3), [end_cap]])
    return verts, _ring_faces(n_rings, n_seg, top=0, first=1, bottom=len(verts) - 1)


def _ellipsoid(centre: np.ndarray, radii: tuple[float, float, float], n_lat: int, n_lon: int,
               axis: str = "z") -> tuple[np.ndarray, np.ndarray]:
    unit, faces = _sphere(n_lat, n_lon)
    if axis == "x":
        unit = unit[:, [2, 0, 1]]
    elif axis == "y":
        unit = unit[:, [1, 2, 0]]
    # a cyclic permutation of the axes keeps the faces' orientation
    return centre + unit * np.asarray(radii), faces


def _smoothstep(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3 - 2 * t)


class _Body:
    """The figure for one setting of the shape and expression dimensions."""

    def __init__(self, shape: dict[str, float] | None = None, expr: dict[str, float] | None = None) -> None:
        s = {k: 1.0 + SHAPE_STEP[k] * (shape or {}).get(k, 0.0) for k in SHAPE_DIMS}
        self.s = s
        self.e = {k: (expr or {}).get(k, 0.0) for k in EXPR_DIMS}
        self.H = HEIGHT * s["height"]
        self.mesh = _Mesh()
        self.joints = np.zeros((N_JOINTS, 3))
        self._skeleton()
        self._build()

    # -- skeleton -----------------------------------------------------------------------------------------
    def _skeleton(self) -> None:
        H, s, j = self.H, self.s, self.joints
        hip_y = 0.0  # the pelvis sits near the origin, as in SMPL-X
        torso = s["torso_length"]
        leg = s["leg_length"]
        j[J["pelvis"]] = (0, hip_y, -0.005 * H)
        hx = 0.052 * H * s["hip_width"]
        j[J["left_hip"]] = (hx, hip_y - 0.035 * H, 0.0)
        for k, y in (("spine1", 0.055), ("spine2", 0.115), ("spine3", 0.175)):
            j[J[k]] = (0, hip_y + y * H * torso, -0.012 * H)
        shoulder_y = hip_y + 0.273 * H * torso
        j[J["neck"]] = (0, shoulder_y + 0.022 * H, -0.012 * H)
        j[J["head"]] = (0, j[J["neck"], 1] + 0.05 * H * s["neck_length"], -0.004 * H)
        sx = 0.105 * H * s["shoulder_width"]
        j[J["left_collar"]] = (0.022 * H * s["shoulder_width"], shoulder_y - 0.012 * H, -0.006 * H)
        j[J["left_shoulder"]] = (sx, shoulder_y - 0.004 * H, -0.008 * H)
        arm = s["arm_length"]
        j[J["left_elbow"]] = j[J["left_shoulder"]] + (0.186 * H * arm, -0.005 * H, -0.004 * H)
        j[J["left_wrist"]] = j[J["left_elbow"]] + (0.146 * H * arm, 0.0, 0.004 * H)
        j[J["left_knee"]] = j[J["left_hip"]] + (0.0, -0.245 * H * leg, 0.004 * H)
        j[J["left_ankle"]] = j[J["left_knee"]] + (0.0, -0.246 * H * leg, -0.012 * H)
        j[J["left_foot"]] = j[J["left_ankle"]] + (0.004 * H, -0.03 * H, 0.072 * H)
        # head: the head joint is the top of the neck; face features hang off the skull centre
        hs = s["head_size"]
        self.skull = j[J["head"]] + np.array([0, 0.045 * H * hs, 0.006 * H * hs])
        self.head_r = np.array([0.045, 0.068, 0.055]) * H * hs
        j[J["jaw"]] = self.skull + np.array([0, -0.022, 0.005]) * H * hs
        j[J["left_eye"]] = self.skull + np.array([0.0185, 0.0, 0.046]) * H * hs
        # hand: left hand along +x, palm down (-y), thumb forward (+z)
        hand = s["hand_size"] * H / HEIGHT
        w = j[J["left_wrist"]]
        lengths = {"index": (0.040, 0.025, 0.021), "middle": (0.045, 0.029, 0.023), "ring": (0.042, 0.027, 0.022),
                   "pinky": (0.032, 0.020, 0.019)}
        offsets = {"index": (0.088, 0.024), "middle": (0.090, 0.004), "ring": (0.085, -0.015), "pinky": (0.078, -0.032)}
        self.tips: dict[str, np.ndarray] = {}
        for finger, (dx, dz) in offsets.items():
            p = w + np.array([dx, -0.002, dz]) * hand
            spread = np.array([1.0, 0.0, dz * 1.2])
            spread /= np.linalg.norm(spread)
            for k in range(3):
                j[J[f"left_{finger}{k + 1}"]] = p
                p = p + spread * lengths[finger][k] * hand
            self.tips[finger] = p
        thumb_dir = np.array([0.55, -0.12, 0.83])
        thumb_dir /= np.linalg.norm(thumb_dir)
        p = w + np.array([0.022, -0.008, 0.020]) * hand
        for k, length in enumerate((0.040, 0.032, 0.027)):
            j[J[f"left_thumb{k + 1}"]] = p
            p = p + thumb_dir * length * hand
            if k == 0:
                thumb_dir = np.array([0.8, -0.05, 0.6]) / np.linalg.norm([0.8, -0.05, 0.6])
        self.tips["thumb"] = p
        # the right side mirrors the left
        for name, idx in list(J.items()):
            if name.startswith("left_"):
                j[J["right_" + name[5:]]] = j[idx] * (-1, 1, 1)

    # -- surface ------------------------------------------------------------------------------------------
    def _ball(self, joint: str, r: float, n_lat: int = 6, n_lon: int = 8) -> None:
        verts, faces = _ellipsoid(self.joints[J[joint]], (r, r, r), n_lat, n_lon)
        self.mesh.add(f"ball:{joint}", verts, faces, J[joint])

    def _limb(self, name: str, a: str, b: str, r0: float, r1: float, joint: str | None = None, rings: int = 8,
              seg: int = 16) -> None:
        verts, faces = _capsule(self.joints[J[a]], self.joints[J[b]], (r0, r0), (r1, r1), rings, seg,
                                np.array([0, 1.0, 0]), cap=0.3)
        self.mesh.add(name, verts, faces, J[joint or a])

    def _build(self) -> None:
        H, g = self.H, self.s["girth"]
        # every joint gets a ball; those inside the body are small and hidden, the visible ones are the mannequin's
        # hinges. Their vertex means are the joints (J_regressor).
        radius = {"pelvis": 0.03, "spine1": 0.03, "spine2": 0.03, "spine3": 0.03, "neck": 0.02, "head": 0.02,
                  "jaw": 0.01, "left_collar": 0.02, "left_hip": 0.05 * g, "left_knee": 0.034 * g,
                  "left_ankle": 0.026 * g, "left_foot": 0.018, "left_shoulder": 0.036 * g, "left_elbow": 0.026 * g,
                  "left_wrist": 0.02 * g}
        for name in J:
            if name in ("left_eye", "right_eye") or "thumb" in name or any(f in name for f in FINGERS):
                continue
            key = name if name in radius else "left_" + name[6:] if name.startswith("right_") else name
            r = radius.get(key, 0.02) * H / HEIGHT
            self._ball(name, r)
        for side, sx in (("left", 1), ("right", -1)):
            self._arm(side)
            self._leg(side)
            self._hand(side, sx)
        self._torso()
        self._neck()
        self._head()

    def _arm(self, side: str) -> None:
        g, H = self.s["girth"], self.H / HEIGHT
        self._limb(f"{side}_clavicle", f"{side}_collar", f"{side}_shoulder", 0.03 * g * H, 0.035 * g * H, rings=4)
        self._limb(f"{side}_upper_arm", f"{side}_shoulder", f"{side}_elbow", 0.05 * g * H, 0.037 * g * H, rings=10)
        self._limb(f"{side}_forearm", f"{side}_elbow", f"{side}_wrist", 0.036 * g * H, 0.027 * g * H, rings=10)

    def _leg(self, side: str) -> None:
        g, H = self.s["girth"], self.H / HEIGHT
        self._limb(f"{side}_thigh", f"{side}_hip", f"{side}_knee", 0.078 * g * H, 0.054 * g * H, rings=12, seg=18)
        self._limb(f"{side}_shank", f"{side}_knee", f"{side}_ankle", 0.052 * g * H, 0.034 * g * H, rings=12, seg=18)
        ankle = self.joints[J[f"{side}_ankle"]]
        sign = 1 if side == "left" else -1
        heel = ankle + np.array([0, -0.035, -0.06]) * H
        toe = ankle + np.array([0.01 * sign, -0.05, 0.205]) * H
        verts, faces = _capsule(heel, toe, (0.03 * H, 0.045 * H), (0.015 * H, 0.05 * H), 10, 16,
                                np.array([0, 1.0, 0]), cap=0.6)
        foot_joint = self.joints[J[f"{side}_foot"]]
        wf = _smoothstep(verts[:, 2], foot_joint[2] - 0.02 * H, foot_joint[2] + 0.02 * H)
        weights = np.zeros((len(verts), N_JOINTS))
        weights[:, J[f"{side}_ankle"]] = 1 - wf
        weights[:, J[f"{side}_foot"]] = wf
        start = self.mesh.add(f"{side}_foot_shell", verts, faces, weights)
        up = "L" if side == "left" else "R"
        # heel: the lowest-backmost point; big toe: front, towards the body's midline; small toe: front, outside
        self._mark(f"{up}Heel", start, verts, np.array([0, -1.0, -1.0]))
        self._mark(f"{up}BigToe", start, verts, np.array([-0.5 * sign, -0.2, 1.0]))
        self._mark(f"{up}SmallToe", start, verts, np.array([0.8 * sign, -0.2, 1.0]))

    def _mark(self, name: str, start: int, verts: np.ndarray, direction: np.ndarray) -> None:
        self.mesh.marks[name] = start + int(np.argmax(verts @ direction))

    def _hand(self, side: str, sx: int) -> None:
        hand = self.s["hand_size"] * self.H / HEIGHT
        j = self.joints
        w = j[J[f"{side}_wrist"]]
        # palm: a flat tube from the wrist to the knuckles
        knuckles = np.mean([j[J[f"{side}_{f}1"]] for f in ("index", "middle", "ring", "pinky")], axis=0)
        verts, faces = _capsule(w, knuckles, (0.013 * hand, 0.040 * hand), (0.012 * hand, 0.046 * hand), 6, 14,
                                np.array([0, 1.0, 0]), cap=0.4)
        self.mesh.add(f"{side}_palm", verts, faces, J[f"{side}_wrist"])
        radii = {"index": 0.0095, "middle": 0.0098, "ring": 0.0092, "pinky": 0.0082, "thumb": 0.011}
        tips = {f: t * (sx, 1, 1) for f, t in self.tips.items()}
        for finger in FINGERS:
            r = radii[finger] * hand
            chain = [f"{side}_{finger}{k}" for k in (1, 2, 3)]
            for k, joint in enumerate(chain):
                p0 = j[J[joint]]
                p1 = j[J[chain[k + 1]]] if k < 2 else tips[finger]
                rr = r * (1 - 0.08 * k)
                verts, faces = _capsule(p0, p1, (rr, rr), (rr * 0.92, rr * 0.92), 5, 10, np.array([0, 1.0, 0]),
                                        cap=1.0 if k == 2 else 0.3)
                start = self.mesh.add(f"{joint}_seg", verts, faces, J[joint])
                if k == 2:  # the end cap's pole is the fingertip smplx reads
                    self.mesh.marks[f"{side[0]}{finger}"] = start + len(verts) - 1
                self._ball(joint, rr * 1.05, 4, 6)

    def _torso(self) -> None:
        H, g, j = self.H, self.s["girth"], self.joints
        hw, sw = self.s["hip_width"], self.s["shoulder_width"]
        pelvis, neck = j[J["pelvis"]], j[J["neck"]]
        # sections from below the hips to the base of the neck: (height fraction of pelvis→neck, half-width,
        # half-depth, forward offset), all in units of H
        bottom = pelvis[1] - 0.07 * H
        top = neck[1] + 0.004 * H
        table = np.array([
            (0.00, 0.070 * hw, 0.045, 0.004), (0.08, 0.100 * hw, 0.062, 0.006), (0.22, 0.106 * hw, 0.066, 0.006),
            (0.38, 0.094, 0.060, 0.008), (0.50, 0.088, 0.058, 0.010), (0.64, 0.098, 0.066, 0.014),
            (0.76, 0.104 * sw, 0.068, 0.014), (0.88, 0.108 * sw, 0.058, 0.006), (0.95, 0.085 * sw, 0.048, 0.0),
            (1.00, 0.038, 0.036, -0.004)])
        n_rings, n_seg = 34, 32
        t = np.linspace(0, 1, n_rings)
        half_w = np.interp(t, table[:, 0], table[:, 1]) * H * g
        half_d = np.interp(t, table[:, 0], table[:, 2]) * H * g
        fwd = np.interp(t, table[:, 0], table[:, 3]) * H
        y = bottom + t * (top - bottom)
        phi = np.linspace(0, 2 * np.pi, n_seg, endpoint=False)
        ring = np.stack([half_w[:, None] * np.cos(phi), np.broadcast_to(y[:, None], (n_rings, n_seg)),
                         fwd[:, None] + half_d[:, None] * np.sin(phi) + j[J["spine2"], 2]], -1)
        verts = np.concatenate([[(0, bottom - 0.02 * H, fwd[0] + j[J["spine2"], 2])], ring.reshape(-1, 3),
                                [(0, top + 0.005 * H, fwd[-1] + j[J["spine2"], 2])]])
        faces = _ring_faces(n_rings, n_seg, top=0, first=1, bottom=len(verts) - 1)
        faces = faces[:, [0, 2, 1]]  # the rings run upwards: flip so normals face out
        # skinning: blend along the spine by height; upper corners follow the collars
        chain = ["pelvis", "spine1", "spine2", "spine3", "neck"]
        ys = np.array([j[J[c], 1] for c in chain])
        weights = np.zeros((len(verts), N_JOINTS))
        pos = np.interp(verts[:, 1], ys, np.arange(len(chain)))
        lo = np.floor(pos).astype(int).clip(0, len(chain) - 2)
        frac = pos - lo
        for k, c in enumerate(chain):
            weights[:, J[c]] = np.where(lo == k, 1 - frac, 0) + np.where(lo + 1 == k, frac, 0)
        lateral = _smoothstep(np.abs(verts[:, 0]), 0.06 * H, 0.1 * H) * _smoothstep(verts[:, 1], ys[3], ys[4])
        for side, sign in (("left", 1), ("right", -1)):
            share = lateral * (np.sign(verts[:, 0]) == sign)
            weights *= (1 - share)[:, None]
            weights[:, J[f"{side}_collar"]] += share
        self.mesh.add("torso", verts, faces, weights)

    def _neck(self) -> None:
        H, g, j = self.H / HEIGHT, self.s["girth"], self.joints
        a, b = j[J["neck"]] - (0, 0.01, 0), j[J["head"]] + (0, 0.03 * H, 0)
        verts, faces = _capsule(a, b, (0.045 * g * H, 0.05 * g * H), (0.04 * g * H, 0.046 * g * H), 8, 20,
                                np.array([0, 0, 1.0]), cap=0.2)
        t = _smoothstep(verts[:, 1], j[J["neck"], 1], j[J["head"], 1] + 0.01)
        weights = np.zeros((len(verts), N_JOINTS))
        weights[:, J["neck"]] = 1 - t
        weights[:, J["head"]] = t
        self.mesh.add("neck_tube", verts, faces, weights)

    # -- head and face ------------------------------------------------------------------------------------
    def _head(self) -> None:
        H, hs, m = self.H, self.s["head_size"], self.mesh
        unit = H * hs  # face features in units of the (scaled) height
        c, r = self.skull, self.head_r
        n_lat, n_lon = 40, 56
        base, faces = _sphere(n_lat, n_lon)
        # poles on y: local z → y, local x → z, local y → x keeps orientation (cyclic)
        u = base[:, [1, 2, 0]]
        # a narrower, longer jaw and a flatter back of the head
        low = _smoothstep(-u[:, 1], 0.2, 1.0)
        scale = np.stack([1 - 0.28 * low, np.ones(len(u)), 1 - 0.12 * low - 0.08 * (u[:, 2] < 0)], -1)
        verts = c + u * r * scale
        verts[:, 2] += 0.01 * unit * low * (u[:, 2] > 0)
        # the mouth: a slit along one latitude ring across the front; the lower edge gets its own vertices so the
        # jaw can open it
        self.mouth_y = c[1] - 0.042 * unit
        ring_y = c[1] + r[1] * np.cos(np.linspace(0, np.pi, n_lat + 1)[1:-1])
        k = int(np.argmin(np.abs(ring_y - self.mouth_y)))
        first = 1 + k * n_lon
        half_w = 0.024 * unit
        ring_idx = np.arange(first, first + n_lon)
        inside = (np.abs(verts[ring_idx, 0]) < half_w) & (verts[ring_idx, 2] > c[2])
        # the slit corners stay shared; only strictly interior ring vertices split
        slit = ring_idx[inside]
        ends = slit[np.argsort(verts[slit, 0])][[0, -1]]
        slit = np.setdiff1d(slit, ends)
        dup = {int(v): len(verts) + i for i, v in enumerate(slit)}
        verts = np.concatenate([verts, verts[slit]])
        below = np.arange(first + n_lon, first + 2 * n_lon)
        below_set = set(below.tolist()) | {len(base) - 1}
        faces = faces.copy()
        for f in range(len(faces)):
            tri = faces[f]
            if any(int(v) in below_set for v in tri):
                faces[f] = [dup.get(int(v), int(v)) for v in tri]
        lower_lip = np.array(sorted(dup.values()))
        upper_lip = slit
        # lips close a little over the slit so the closed mouth reads as a line, not a gap
        verts[upper_lip, 1] -= 0.0015 * unit
        verts[lower_lip, 1] += 0.0015 * unit
        # jaw weights: the front-lower face follows the jaw, fading out towards the ears
        jaw_w = _smoothstep(self.mouth_y - verts[:, 1], -0.002 * unit, 0.012 * unit)
        jaw_w *= _smoothstep(verts[:, 2] - c[2], -0.01 * unit, 0.03 * unit)
        jaw_w[upper_lip] = 0.0
        jaw_w[lower_lip] = 1.0
        self.upper_lip, self.lower_lip = upper_lip, lower_lip
        verts = verts + self._expression(verts, lower_lip, upper_lip)
        weights = np.zeros((len(verts), N_JOINTS))
        weights[:, J["jaw"]] = jaw_w
        weights[:, J["head"]] = 1 - jaw_w
        start = m.add("head", verts, faces, weights)
        m.marks["lear"] = start + int(np.argmax(verts[:, 0] - np.abs(verts[:, 1] - c[1]) * 2))
        m.marks["rear"] = start + int(np.argmax(-verts[:, 0] - np.abs(verts[:, 1] - c[1]) * 2))
        self.head_verts, self.head_start, self.head_faces = verts, start, faces
        self._nose(unit)
        self._eyes(unit)
        self._brows(unit)
        self._ears(unit)

    def _surface_z(self, x: float, y: float) -> float:
        """Forward-most head surface point at (x, y)."""
        v = self.head_verts
        near = np.abs(v[:, 0] - x) + np.abs(v[:, 1] - y)
        idx = np.argsort(near)[:4]
        return float(np.max(v[idx, 2]))

    def _expression(self, verts: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
        """Displacements of the head surface for the expression dimensions (linear in them)."""
        e, unit, c = self.e, self.H * self.s["head_size"], self.skull
        x, y = verts[:, 0], verts[:, 1]
        front = _smoothstep(verts[:, 2] - c[2], 0.0, 0.04 * unit)
        d = np.zeros_like(verts)

        def bump(cx: float, cy: float, radius: float) -> np.ndarray:
            return np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * (radius * unit) ** 2)) * front

        my = self.mouth_y
        lip_lo = np.zeros(len(verts))
        lip_lo[lower] = 1.0
        lip_up = np.zeros(len(verts))
        lip_up[upper] = 1.0
        # each lip's field stops at the slit: the other lip's vertices sit within a few millimetres of it
        below = bump(0, my - 0.012 * unit, 0.018) * (y < my + 0.001 * unit) * (1 - lip_up)
        above = bump(0, my + 0.008 * unit, 0.014) * (y > my - 0.001 * unit) * (1 - lip_lo)
        corners = bump(0.024 * unit, my, 0.01) + bump(-0.024 * unit, my, 0.01)
        side = np.sign(x)
        s = 0.004 * unit  # metres per unit, about 7 mm on a 1.7 m figure
        d[:, 1] += -s * 1.5 * e["mouth_open"] * np.maximum(below, lip_lo)
        d[:, 1] += s * e["smile"] * corners
        d[:, 0] += s * 0.6 * e["smile"] * corners * side
        d[:, 0] += s * e["mouth_wide"] * corners * side
        d[:, 0] -= s * 0.8 * e["pucker"] * corners * side
        d[:, 2] += s * 0.8 * e["pucker"] * (bump(0, my, 0.016))
        brow_y = c[1] + 0.018 * unit
        brows = bump(0.02 * unit, brow_y, 0.014) + bump(-0.02 * unit, brow_y, 0.014)
        inner = bump(0.009 * unit, brow_y, 0.008) + bump(-0.009 * unit, brow_y, 0.008)
        d[:, 1] += s * e["brows_up"] * brows
        d[:, 1] -= s * 0.7 * e["brow_furrow"] * inner
        d[:, 0] -= s * 0.5 * e["brow_furrow"] * inner * side
        d[:, 1] += s * 0.8 * e["upper_lip_up"] * np.maximum(above, lip_up)
        d[:, 1] -= s * 0.8 * e["lower_lip_down"] * np.maximum(below, lip_lo)
        d[:, 1] += s * e["smirk"] * bump(0.024 * unit, my, 0.01)
        cheeks = bump(0.035 * unit, my + 0.01 * unit, 0.015) + bump(-0.035 * unit, my + 0.01 * unit, 0.015)
        d[:, 0] += s * 0.8 * e["cheeks_puff"] * cheeks * side
        return d

    def _nose(self, unit: float) -> None:
        c = self.skull
        root_y, tip_y = c[1] + 0.004 * unit, c[1] - 0.022 * unit
        root = np.array([0, root_y, self._surface_z(0, root_y) - 0.004 * unit])
        tip = np.array([0, tip_y, self._surface_z(0, tip_y) + 0.017 * unit])
        verts, faces = _capsule(root, tip, (0.005 * unit, 0.006 * unit), (0.008 * unit, 0.012 * unit), 6, 12,
                                np.array([0, 0, 1.0]), cap=0.9)
        start = self.mesh.add("nose", verts, faces, J["head"])
        # the tip smplx reads as "nose": the most forward point
        self.mesh.marks["nose"] = start + int(np.argmax(verts[:, 2]))
        self.nose_range = (start, start + len(verts))

    def _eyes(self, unit: float) -> None:
        for side in ("left", "right"):
            centre = self.joints[J[f"{side}_eye"]]
            verts, faces = _ellipsoid(centre, (0.0072 * unit,) * 3, 10, 14)
            start = self.mesh.add(f"{side}_eyeball", verts, faces, J[f"{side}_eye"])
            self.mesh.marks[f"{side[0]}eye"] = start  # local +z pole = the pupil, facing forward

    def _brows(self, unit: float) -> None:
        c = self.skull
        for side, sign in (("left", 1), ("right", -1)):
            x = sign * 0.02 * unit
            y = c[1] + 0.017 * unit + 0.004 * unit * self.e["brows_up"]
            y -= 0.003 * unit * self.e["brow_furrow"]
            z = self._surface_z(x, y) - 0.002 * unit
            verts, faces = _ellipsoid(np.array([x, y, z]), (0.013 * unit, 0.0025 * unit, 0.004 * unit), 6, 10)
            self.mesh.add(f"{side}_brow", verts, faces, J["head"])

    def _ears(self, unit: float) -> None:
        c, r = self.skull, self.head_r
        for side, sign in (("left", 1), ("right", -1)):
            centre = c + np.array([sign * r[0] * 0.97, -0.006 * unit, -0.004 * unit])
            verts, faces = _ellipsoid(centre, (0.006 * unit, 0.018 * unit, 0.011 * unit), 6, 10)
            start = self.mesh.add(f"{side}_ear", verts, faces, J["head"])
            self.mesh.marks[f"{side[0]}ear"] = start + int(np.argmax(sign * verts[:, 0]))

    # -- assembled arrays ---------------------------------------------------------------------------------
    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        m = self.mesh
        return np.concatenate(m.verts), np.concatenate(m.faces), np.concatenate(m.weights)


def _face_targets(body: _Body) -> tuple[np.ndarray, np.ndarray]:
    """Template positions of the 51 iBUG landmarks (points 17–67) on the face, and which lip they ride on
    (+1 upper, -1 lower, 0 neither)."""
    unit, c = body.H * body.s["head_size"], body.skull
    my = body.mouth_y
    pts, lip = [], []

    def add(x: float, y: float, which: int = 0, dz: float = 0.0) -> None:
        pts.append((x * unit, c[1] + y * unit if which == 0 else y, dz))
        lip.append(which)

    for k in range(5):  # right brow outer → inner, then left brow inner → outer
        add(-0.030 + 0.0055 * k, 0.016 + 0.003 * np.sin(np.pi * (k + 0.5) / 5))
    for k in range(5):
        add(0.008 + 0.0055 * k, 0.016 + 0.003 * np.sin(np.pi * (4.5 - k) / 5))
    for k in range(4):  # nose bridge down to the tip
        add(0.0, 0.004 - 0.0075 * k)
    for k in range(5):  # nostrils
        add(-0.009 + 0.0045 * k, -0.025 + 0.0015 * (k in (0, 4)))
    for sign, order in ((-1, (0.029, 0.023, 0.014, 0.008, 0.014, 0.023)), (1, (0.008, 0.014, 0.023, 0.029, 0.023,
                                                                              0.014))):
        ys = (0.0, 0.004, 0.004, 0.0, -0.003, -0.003)
        for x, y in zip(order, ys, strict=True):
            add(sign * x, y)
    mouth_w = 0.024
    outer = [(-1.0, 0), (-0.6, 0.005), (-0.25, 0.008), (0.0, 0.007), (0.25, 0.008), (0.6, 0.005), (1.0, 0),
             (0.6, -0.007), (0.25, -0.010), (0.0, -0.011), (-0.25, -0.010), (-0.6, -0.007)]
    for k, (fx, dy) in enumerate(outer):
        which = 0 if k in (0, 6) else (1 if dy > 0 else -1)
        add(fx * mouth_w, (my + (dy + (0.0015 if which == 1 else -0.0015 if which == -1 else 0)) * unit)
            if which else (my - c[1]) / unit + dy, which)
    inner = [(-0.85, 0), (-0.4, 0.0), (0.0, 0.0), (0.4, 0.0), (0.85, 0), (0.4, 0.0), (0.0, 0.0), (-0.4, 0.0)]
    for k, (fx, _dy) in enumerate(inner):
        which = 0 if k in (0, 4) else (1 if k < 4 else -1)
        add(fx * mouth_w, my if which else (my - c[1]) / unit, which)
    return np.array(pts), np.array(lip)


def _closest_on_triangles(p: np.ndarray, tri: np.ndarray) -> tuple[int, np.ndarray, float]:
    """Closest point to p over triangles tri (N,3,3): index, barycentric coordinates, distance."""
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    # project onto each triangle's plane, clamp barycentrics, renormalise: adequate for small, dense faces
    v0, v1, v2 = b - a, c - a, p - a
    d00, d01, d11 = (v0 * v0).sum(1), (v0 * v1).sum(1), (v1 * v1).sum(1)
    d20, d21 = (v2 * v0).sum(1), (v2 * v1).sum(1)
    den = np.where(np.abs(d00 * d11 - d01 ** 2) < 1e-18, 1e-18, d00 * d11 - d01 ** 2)
    v = (d11 * d20 - d01 * d21) / den
    w = (d00 * d21 - d01 * d20) / den
    bary = np.clip(np.stack([1 - v - w, v, w], 1), 0, None)
    bary /= bary.sum(1, keepdims=True)
    q = (bary[:, :, None] * tri).sum(1)
    dist = np.linalg.norm(q - p, axis=1)
    i = int(np.argmin(dist))
    return i, bary[i], float(dist[i])


def _landmarks(body: _Body, verts: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Faces and barycentric coordinates of the 51 static landmarks, placed on the head and nose surfaces."""
    targets, lips = _face_targets(body)
    hs, he = body.mesh.ranges["head"]
    ns, ne = body.nose_range
    on_head = np.all((faces >= hs) & (faces < he), axis=1)
    on_nose = np.all((faces >= ns) & (faces < ne), axis=1)
    upper, lower = set((body.upper_lip + hs).tolist()), set((body.lower_lip + hs).tolist())
    touches_upper = np.array([any(int(v) in upper for v in f) for f in faces])
    touches_lower = np.array([any(int(v) in lower for v in f) for f in faces])
    idx, bary = [], []
    for k, ((x, y, _), lip) in enumerate(zip(targets, lips, strict=True)):
        candidates = on_head | on_nose if 27 <= k + 17 <= 35 else on_head
        if lip == 1:
            candidates = on_head & touches_upper & ~touches_lower
        elif lip == -1:
            candidates = on_head & touches_lower & ~touches_upper
        cand = np.flatnonzero(candidates)
        z = body._surface_z(x, y) + (0.02 if 27 <= k + 17 <= 30 else 0.0)
        if 27 <= k + 17 <= 35:  # nose points: the forward-most surface along a ray, nose included
            zs = verts[np.unique(faces[cand])]
            near = zs[np.abs(zs[:, 0] - x) + np.abs(zs[:, 1] - y) < 0.01]
            z = float(near[:, 2].max()) if len(near) else z
        i, b, _ = _closest_on_triangles(np.array([x, y, z]), verts[faces[cand]])
        idx.append(int(cand[i]))
        bary.append(b)
    return np.array(idx, np.int64), np.array(bary, np.float32)


def _contour(body: _Body, verts: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """79 yaw bins × 17 jaw-line points: for each head yaw the points sit on the silhouette side of the jaw."""
    hs, he = body.mesh.ranges["head"]
    on_head = np.flatnonzero(np.all((faces >= hs) & (faces < he), axis=1))
    c, r = body.skull, body.head_r
    tri = verts[faces[on_head]]
    idx = np.zeros((79, 17), np.int64)
    bary = np.zeros((79, 17, 3), np.float32)
    base = np.linspace(-90, 90, 17)  # angle around the vertical axis: -90 right ear, 0 chin, +90 left ear
    drop = np.cos(np.radians(base))  # the line runs from the ears down to the chin
    cache: dict[tuple[int, int], tuple[int, np.ndarray]] = {}
    for b in range(79):
        angle = b if b <= 39 else -(b - 39)  # smplx's bin → -(neck yaw) in degrees
        for k in range(17):
            phi = np.radians(np.clip(base[k] - angle * (1 - abs(base[k]) / 90) * 0.6, -90, 90))
            key = (k, int(round(np.degrees(phi))))
            if key not in cache:
                y = c[1] - r[1] * (0.35 + 0.6 * drop[k])
                p = c + np.array([np.sin(phi) * r[0] * 1.2, y - c[1], np.cos(phi) * r[2] * 1.2])
                i, w, _ = _closest_on_triangles(p, tri)
                cache[key] = (int(on_head[i]), w)
            idx[b, k], bary[b, k] = cache[key]
    return idx, bary


def _hand_pca(side: str) -> tuple[np.ndarray, np.ndarray]:
    """45×45 orthonormal hand pose basis (rows) led by interpretable synergies, and a relaxed mean pose."""
    sign = -1.0 if side == "left" else 1.0  # flexion axis: z, opposite senses for the mirrored hands
    curls = []
    for f, finger in enumerate(FINGERS):
        v = np.zeros((15, 3))
        axis = np.array([0, 0.3 * sign, 1.0]) if finger == "thumb" else np.array([0, 0, 1.0])
        for k in range(3):
            v[3 * f + k] = sign * axis * (1.0, 1.2, 0.8)[k]
        curls.append(v.ravel())
    spread = np.zeros((15, 3))
    for f, finger in enumerate(FINGERS):
        spread[3 * f, 1] = {"index": 1, "middle": 0.3, "ring": -0.5, "pinky": -1, "thumb": 1.5}[finger] * sign
    lead = [np.sum(curls, 0), *curls, spread.ravel()]
    rng = np.random.default_rng(20240)  # fixed seed: deterministic completion of the basis
    basis = np.concatenate([np.stack(lead), rng.standard_normal((45, 45))])
    q, _ = np.linalg.qr(basis.T)
    comps = q[:, :45].T
    for i, v in enumerate(lead):  # keep the leading synergies' sign
        if np.dot(comps[i], v) < 0:
            comps[i] = -comps[i]
    mean = 0.15 * np.sum(curls, 0) / 3
    return comps.astype(np.float32), mean.astype(np.float32)


def _place(body: _Body) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vertex order: geometry vertices permuted so the named ones land on smplx's ids; spare slots are filled with
    hidden vertices at the pelvis that no face uses."""
    verts, faces, weights = body.arrays()
    n = len(verts)
    if n > N_VERTS or len(faces) > N_FACES:
        raise AssertionError(f"mannequin too dense: {n} vertices, {len(faces)} faces")
    order = np.full(N_VERTS, -1, np.int64)
    for name, vid in SPECIAL_VERTICES.items():
        order[vid] = body.mesh.marks[name]
    placed = set(order[order >= 0].tolist())
    remaining = iter([i for i in range(N_VERTS) if i not in placed])  # old ids, geometry then spares
    for slot in range(N_VERTS):
        if order[slot] < 0:
            order[slot] = next(remaining)
    return order, faces, weights


def _assemble(body: _Body, order: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    verts, faces, weights = body.arrays()
    n = len(verts)
    spare = N_VERTS - n
    verts = np.concatenate([verts, np.repeat(body.joints[J["pelvis"]][None], spare, 0)])
    w_spare = np.zeros((spare, N_JOINTS))
    w_spare[:, J["pelvis"]] = 1
    weights = np.concatenate([weights, w_spare])
    inv = np.empty(N_VERTS, np.int64)
    inv[order] = np.arange(N_VERTS)
    faces = inv[faces]
    pad = N_FACES - len(faces)
    # degenerate triangles on a spare vertex keep SMPL-X's face count without drawing anything
    faces = np.concatenate([faces, np.full((pad, 3), inv[n] if spare else faces[0, 0])])
    return verts[order], faces, weights[order]


def build() -> dict[str, np.ndarray]:
    """The SMPLX_NEUTRAL.npz arrays of the mannequin."""
    body = _Body()
    order, _, _ = _place(body)
    verts, faces, weights = _assemble(body, order)
    # J_regressor: each joint is the mean of its ball's vertices (the eyes' balls are the eyeballs)
    jreg = np.zeros((N_JOINTS, N_VERTS))
    inv = np.empty(N_VERTS, np.int64)
    inv[order] = np.arange(N_VERTS)
    for name, idx in J.items():
        key = f"{name.split('_')[0]}_eyeball" if name in ("left_eye", "right_eye") else f"ball:{name}"
        s, e = body.mesh.ranges[key]
        jreg[idx, inv[np.arange(s, e)]] = 1.0 / (e - s)

    shapedirs = np.zeros((N_VERTS, 3, SHAPE_SPACE + EXPR_SPACE), np.float32)
    delta = 1e-3
    for k, dim in enumerate(SHAPE_DIMS):
        plus = _assemble(_Body(shape={dim: delta}), order)[0]
        minus = _assemble(_Body(shape={dim: -delta}), order)[0]
        shapedirs[:, :, k] = (plus - minus) / (2 * delta)
    for k, dim in enumerate(EXPR_DIMS):
        plus = _assemble(_Body(expr={dim: delta}), order)[0]
        minus = _assemble(_Body(expr={dim: -delta}), order)[0]
        shapedirs[:, :, SHAPE_SPACE + k] = (plus - minus) / (2 * delta)

    lmk_faces, lmk_bary = _landmarks(body, *body.arrays()[:2])
    dyn_faces, dyn_bary = _contour(body, *body.arrays()[:2])
    # the landmark tables index faces, whose order _assemble keeps
    comps_l, mean_l = _hand_pca("left")
    comps_r, mean_r = _hand_pca("right")
    # cylindrical texture coordinates: enough for tools that expect vt/ft
    centred = verts - verts.mean(0)
    vt = np.stack([(np.arctan2(centred[:, 0], centred[:, 2]) / (2 * np.pi)) + 0.5,
                   (verts[:, 1] - verts[:, 1].min()) / np.ptp(verts[:, 1])], 1)
    return {
        "v_template": verts.astype(np.float64),
        "f": faces.astype(np.uint32),
        "J_regressor": jreg,
        "kintree_table": np.stack([np.where(PARENTS < 0, 4294967295, PARENTS), np.arange(N_JOINTS)]).astype(
            np.int64),
        "weights": weights,
        "posedirs": np.zeros((N_VERTS, 3, (N_JOINTS - 1) * 9), np.float32),
        "shapedirs": shapedirs,
        "hands_componentsl": comps_l, "hands_meanl": mean_l,
        "hands_componentsr": comps_r, "hands_meanr": mean_r,
        "lmk_faces_idx": lmk_faces, "lmk_bary_coords": lmk_bary,
        "dynamic_lmk_faces_idx": dyn_faces, "dynamic_lmk_bary_coords": dyn_bary,
        "vt": vt.astype(np.float64), "ft": faces.astype(np.uint32),
    }


def write(path: Path) -> Path:
    """Write SMPLX_NEUTRAL.npz atomically and byte-reproducibly."""
    return write_npz(path, build())
