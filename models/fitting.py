"""Whole-sequence SMPL-X fitting to 2D keypoints: every frame of every clip in one batched optimisation.

One shape for the identity, pose, translation, hands, jaw and expression per frame, a pinhole camera of fixed
focal length at the origin (OpenCV axes). The objective is the visibility-weighted reprojection error of MediaPipe's
body, hand and face points mapped onto SMPL-X joints, vertex joints and face landmarks, plus pose priors and
temporal smoothness (second differences of the projected points and the translation), so the fit is steadier than
the detections it comes from. SHOW takes seconds per frame on a GPU; this takes a fraction of a second per clip
step on a CPU because `SparseBody` poses only the few hundred vertices the objective reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.spatial.transform import Rotation
from smplx.lbs import batch_rodrigues

from models.body import L_SHOULDER, LMK_START, POSE_BLOCKS, R_SHOULDER, Output, SparseBody, project

# MediaPipe pose index → SparseBody point index, and a weight for how well the two agree anatomically
BODY_MAP = [(0, 55, 1.0), (2, 57, 0.5), (5, 56, 0.5), (7, 59, 0.5), (8, 58, 0.5),
            (11, 16, 1.0), (12, 17, 1.0), (13, 18, 1.0), (14, 19, 1.0), (15, 20, 1.0), (16, 21, 1.0),
            (23, 1, 0.5), (24, 2, 0.5), (25, 4, 1.0), (26, 5, 1.0), (27, 7, 1.0), (28, 8, 1.0),
            (29, 62, 0.5), (30, 65, 0.5), (31, 60, 0.5), (32, 63, 0.5)]
# MediaPipe hand index → SMPL-X (wrist, then per finger knuckle, middle, end joint, tip vertex)
_HAND_CHAIN = {"thumb": (1, 2, 3, 4), "index": (5, 6, 7, 8), "middle": (9, 10, 11, 12), "ring": (13, 14, 15, 16),
               "pinky": (17, 18, 19, 20)}
_SMPLX_FINGER = {"index": 0, "middle": 1, "pinky": 2, "ring": 3, "thumb": 4}
_TIP = {"thumb": 0, "index": 1, "middle": 2, "ring": 3, "pinky": 4}


def _hand_map(side: str) -> list[tuple[int, int, float]]:
    wrist, base, tips = (20, 25, 66) if side == "left" else (21, 40, 71)
    out = [(0, wrist, 1.0)]
    for finger, mp in _HAND_CHAIN.items():
        for k in range(3):
            out.append((mp[k], base + 3 * _SMPLX_FINGER[finger] + k, 1.0))
        out.append((mp[3], tips + _TIP[finger], 1.0))
    return sorted(out)


HAND_MAP = {"left_hand": _hand_map("left"), "right_hand": _hand_map("right")}
# MediaPipe face-mesh indices of the 51 inner iBUG-68 landmarks (points 17–67), the order of SMPL-X's landmarks
FACE_MESH_51 = [70, 63, 105, 66, 107, 336, 296, 334, 293, 300,
                168, 197, 5, 4, 98, 97, 2, 326, 327,
                33, 160, 158, 133, 153, 144, 362, 385, 387, 263, 373, 380,
                61, 39, 37, 0, 267, 269, 291, 405, 314, 17, 84, 181,
                78, 82, 13, 312, 308, 317, 14, 87]
FACE_MAP = [(mp, LMK_START + k, 1.0) for k, mp in enumerate(FACE_MESH_51)]
PARTS = ("body", "hands", "face")


@dataclass
class Targets:
    """Per-frame 2D targets: slot s is keypoint `points[s]` of the body model, in part `part[s]`."""

    xy: np.ndarray  # (T, S, 2) crop pixels
    conf: np.ndarray  # (T, S) 0 where missing
    points: np.ndarray  # (S,) SparseBody point index
    part: np.ndarray  # (S,) index into PARTS
    weight: np.ndarray  # (S,) anatomical agreement weight


def targets_from_keypoints(body: np.ndarray, left: np.ndarray, right: np.ndarray, face: np.ndarray,
                           min_visibility: float = 0.3) -> Targets:
    """body (T,33,4) with visibility, hands (T,21,3), face (T,478,3); NaN where a part was not found."""
    blocks = [(body[..., :2], np.where(body[..., 3] >= min_visibility, body[..., 3], 0.0), BODY_MAP, 0),
              (left[..., :2], np.ones(left.shape[:2]), HAND_MAP["left_hand"], 1),
              (right[..., :2], np.ones(right.shape[:2]), HAND_MAP["right_hand"], 1),
              (face[..., :2], np.ones(face.shape[:2]), FACE_MAP, 2)]
    xy, conf, points, part, weight = [], [], [], [], []
    for src, c, mapping, p in blocks:
        idx = [m[0] for m in mapping]
        sel = src[:, idx]
        ok = np.isfinite(sel).all(-1)
        xy.append(np.where(ok[..., None], sel, 0.0))
        conf.append(np.where(ok, np.nan_to_num(c[:, idx]), 0.0))
        points += [m[1] for m in mapping]
        weight += [m[2] for m in mapping]
        part += [p] * len(mapping)
    return Targets(np.concatenate(xy, 1).astype(np.float32), np.concatenate(conf, 1).astype(np.float32),
                   np.array(points), np.array(part), np.array(weight, np.float32))


@dataclass
class FitConfig:
    focal: float  # pixels
    size: int  # crop side, pixels
    iterations: int = 400
    lr: float = 0.03
    w_smooth: float = 60.0
    w_pose: float = 2e-3
    w_hand: float = 2e-3
    w_shape: float = 1e-3
    w_expr: float = 1e-3
    w_jaw: float = 1e-2
    hand_smooth: float = 0.5  # share of w_smooth applied to hand points
    robust: float = 0.01  # pseudo-Huber scale, share of the crop
    seed: int = 0
    chunk: int = 300  # frames per forward/backward pass: the gradient is summed over chunks, memory stays flat


# a relaxed "arms down" start and prior centre: shoulders lowered, elbows a little bent
_REST = np.zeros(63, np.float32)
_REST[(L_SHOULDER - 1) * 3 + 2] = -1.2
_REST[(R_SHOULDER - 1) * 3 + 2] = 1.2
_REST[(18 - 1) * 3 + 1] = -0.3
_REST[(19 - 1) * 3 + 1] = 0.3
# the start: forearms forward, where a talking anchor's hands mostly are; from arms down the optimiser often bends
# a forearm backwards (the same 2D points) and the rendered torso hides the hand
_START = _REST.copy()
_START[(18 - 1) * 3 + 1] = -1.3
_START[(19 - 1) * 3 + 1] = 1.3
# prior weight per body joint (SMPL-X joints 1..21): the spine and neck barely bend in a talking anchor, legs are
# mostly unseen; arms move freely
_POSE_W = np.ones(21, np.float32)
for _j in (3, 6, 9, 12, 15):  # spine1-3, neck, head
    _POSE_W[_j - 1] = 20.0
for _j in (13, 14):  # collars
    _POSE_W[_j - 1] = 20.0
for _j in (1, 2, 4, 5, 7, 8, 10, 11):  # legs
    _POSE_W[_j - 1] = 5.0
_RIGID_POINTS = [1, 2, 16, 17, 55, 56, 57, 58, 59, *range(LMK_START, LMK_START + 51)]
_LR_SCALE = {"transl": 0.2, "expression": 2.0}
_FLIP = torch.tensor([[1.0, 0, 0], [0, -1.0, 0], [0, 0, -1.0]])  # SMPL-X (y up, z forward) → facing the camera


def _second_diff(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    d = x[2:] - 2 * x[1:-1] + x[:-2]
    return d * valid.reshape(-1, *([1] * (d.dim() - 1)))


def fit(model: SparseBody, targets: Targets, segments: list[tuple[int, int]], cfg: FitConfig,
        hands_mean: tuple[np.ndarray, np.ndarray], progress: Callable[[int, int], None] | None = None
        ) -> dict[str, np.ndarray]:
    """Fit all frames as one problem (one shape, smoothness along time); `segments` are the clips' [start, end) so
    smoothness never crosses a cut. The loss and its gradient are summed over chunks of `cfg.chunk` frames."""
    torch.manual_seed(cfg.seed)
    t = targets.xy.shape[0]
    size, focal = float(cfg.size), float(cfg.focal)
    centre = (size / 2, size / 2)
    xy = torch.from_numpy(targets.xy)
    conf = torch.from_numpy(targets.conf * targets.weight[None])
    pts = torch.from_numpy(targets.points)
    part = torch.from_numpy(targets.part)
    valid = torch.zeros(max(t - 2, 0))
    for a, b in segments:
        if b - a >= 3:
            valid[a:b - 2] = 1.0

    init = _initial_translation(model, targets, focal, centre)
    params = {
        "root": torch.zeros(t, 3),
        "transl": torch.from_numpy(init),
        "body_pose": torch.from_numpy(np.tile(_START, (t, 1))),
        "jaw_pose": torch.zeros(t, 3),
        "leye_pose": torch.zeros(t, 3),
        "reye_pose": torch.zeros(t, 3),
        "left_hand_pose": torch.from_numpy(np.tile(hands_mean[0], (t, 1))),
        "right_hand_pose": torch.from_numpy(np.tile(hands_mean[1], (t, 1))),
        "expression": torch.zeros(t, model.exprdirs.shape[-1]),
        "betas": torch.zeros(1, model.shapedirs.shape[-1]),
    }
    for p in params.values():
        p.requires_grad_(True)
    rest = torch.from_numpy(_REST)
    pose_w = torch.from_numpy(np.repeat(_POSE_W, 3))
    hmean = [torch.from_numpy(h) for h in hands_mean]
    # fingers really move fast: they are smoothed less than the body and the face
    slot_smooth = torch.where(part == 1, cfg.hand_smooth, 1.0)
    part_norm = torch.stack([(conf * (part == k)).sum() for k in range(len(PARTS))]).clamp(min=1.0)

    # stage 0 places the torso and head only: arms and hands would drag the body in depth before they can bend
    rigid = torch.from_numpy(np.isin(targets.points, _RIGID_POINTS)).float()

    pairs = max(t - 2, 1)  # second differences in the whole sequence: the smoothness terms are their means

    def chunk_loss(stage: int, a: int, b: int) -> torch.Tensor:
        """The loss terms of frames [a, b): their data and priors, and the second differences that end there (so
        the two frames before the chunk take part). Summed over chunks it is the whole sequence's loss."""
        lo = max(a - 2, 0)
        sub = {k: v if k == "betas" else v[lo:b] for k, v in params.items()}
        out = _posed(model, sub)
        uv = project(out.points[:, pts], focal, centre)
        r = (uv[a - lo:] - xy[a:b]) / size
        rho = torch.sqrt(r.square().sum(-1) + cfg.robust ** 2) - cfg.robust
        c = conf[a:b] if stage else conf[a:b] * rigid
        data = sum(((c * rho) * (part == k)).sum() / part_norm[k] for k in range(len(PARTS)))
        smooth = torch.zeros(())
        if b - lo >= 3:
            keep = valid[lo:b - 2]
            smooth = (_second_diff(uv / size, keep).square().sum(-1) * slot_smooth).sum() / (pairs * len(pts)) * t
            smooth = smooth + _second_diff(sub["transl"], keep).square().sum(-1).sum() / pairs * t
        prior = (cfg.w_pose * ((sub["body_pose"][a - lo:] - rest).square() * pose_w).sum(-1).sum()
                 + cfg.w_hand * ((sub["left_hand_pose"][a - lo:] - hmean[0]).square().sum(-1).sum()
                                 + (sub["right_hand_pose"][a - lo:] - hmean[1]).square().sum(-1).sum())
                 + cfg.w_jaw * sub["jaw_pose"][a - lo:].square().sum(-1).sum()
                 + cfg.w_expr * sub["expression"][a - lo:].square().sum(-1).sum()) / t
        if a == 0:
            prior = prior + cfg.w_shape * params["betas"].square().sum()
        eyes = sub["leye_pose"][a - lo:].square().sum() + sub["reye_pose"][a - lo:].square().sum()
        return data + cfg.w_smooth * smooth / max(t, 1) * (1.0 if stage else 0.1) + prior + eyes

    chunks = [(a, min(a + cfg.chunk, t)) for a in range(0, t, max(cfg.chunk, 1))]

    # stage 0 places and turns the body (torso only moves), stage 1 fits everything
    schedule = [(["root", "transl"], max(cfg.iterations // 4, 1), cfg.lr * 2),
                (list(params), cfg.iterations, cfg.lr)]
    done, total = 0, sum(n for _, n, _ in schedule)
    for stage, (names, steps, lr) in enumerate(schedule):
        # Adam steps are about lr in every coordinate: metres need smaller steps than radians
        opt = torch.optim.Adam([{"params": [params[n]], "lr": lr * _LR_SCALE.get(n, 1.0)} for n in names])
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=0.0)
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            for a, b in chunks:  # one chunk's graph at a time: memory holds a chunk, not the whole video
                chunk_loss(stage, a, b).backward()
            opt.step()
            sched.step()
            done += 1
            if progress and done % 10 == 0:
                progress(done, total)
    with torch.no_grad():
        uv = np.concatenate([project(_posed(model, {k: v if k == "betas" else v[a:b] for k, v in params.items()})
                                     .points[:, pts], focal, centre).numpy() for a, b in chunks])
        root = (_FLIP @ batch_rodrigues(params["root"])).numpy()
    result = {k: v.detach().numpy().astype(np.float32) for k, v in params.items() if k != "root"}
    result["global_orient"] = Rotation.from_matrix(root).as_rotvec().astype(np.float32)
    result["projected"] = uv.astype(np.float32)
    return result


def _posed(model: SparseBody, params: dict[str, torch.Tensor]) -> Output:
    t = params["root"].shape[0]
    root = _FLIP @ batch_rodrigues(params["root"])
    # the root rotation enters as a matrix (facing the camera times a small correction), never as axis-angle near pi
    pose = torch.cat([torch.zeros(t, 1, 3), *[params[k].reshape(t, -1, 3) for k in list(POSE_BLOCKS)[1:]]], 1)
    return model(params["betas"], params["expression"], pose, params["transl"], root_rot=root)


def _initial_translation(model: SparseBody, targets: Targets, focal: float, centre: tuple[float, float]
                         ) -> np.ndarray:
    """Depth from the shoulder span, position from the shoulder midpoint, per frame (median where unseen)."""
    t = targets.xy.shape[0]
    slots = {int(p): s for s, p in enumerate(targets.points) if targets.part[s] == 0}
    ls, rs = slots[L_SHOULDER], slots[R_SHOULDER]
    seen = (targets.conf[:, ls] > 0) & (targets.conf[:, rs] > 0)
    with torch.no_grad():
        j = model(torch.zeros(1, model.shapedirs.shape[-1]), torch.zeros(1, model.exprdirs.shape[-1]),
                  torch.zeros(1, 55, 3), torch.zeros(1, 3), root_rot=_FLIP[None]).joints[0].numpy()
    span_m = float(np.linalg.norm(j[L_SHOULDER] - j[R_SHOULDER]))
    mid_model = (j[L_SHOULDER] + j[R_SHOULDER]) / 2
    if not seen.any():
        return np.tile(np.array([0, 0, 3.0], np.float32) - mid_model.astype(np.float32), (t, 1))
    span_px = np.linalg.norm(targets.xy[:, ls] - targets.xy[:, rs], axis=-1)
    mid_px = (targets.xy[:, ls] + targets.xy[:, rs]) / 2
    span_px = np.where(seen, span_px, np.median(span_px[seen]))
    mid_px = np.where(seen[:, None], mid_px, np.median(mid_px[seen], axis=0))
    z = focal * span_m / np.maximum(span_px, 1.0)
    x = (mid_px[:, 0] - centre[0]) * z / focal
    y = (mid_px[:, 1] - centre[1]) * z / focal
    return (np.stack([x, y, z], 1) - mid_model).astype(np.float32)


def jitter(xy: np.ndarray, ok: np.ndarray, segments: list[tuple[int, int]]) -> float:
    """Mean |second difference| (pixels) over points seen in three consecutive frames of the same clip."""
    vals = []
    for a, b in segments:
        if b - a < 3:
            continue
        p, m = xy[a:b], ok[a:b]
        d = np.linalg.norm(p[2:] - 2 * p[1:-1] + p[:-2], axis=-1)
        keep = m[2:] & m[1:-1] & m[:-2]
        vals.append(d[keep])
    vals = np.concatenate(vals) if vals else np.zeros(0)
    return float(vals.mean()) if len(vals) else float("nan")
