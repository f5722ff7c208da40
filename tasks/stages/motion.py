"""motion: the SMPL-X parameters (and driving audio) a render follows, already fitted to the identity.

Sources: speech (an audio file through the identity's speech model, tasks/stages/speech.py), the identity's own
held-out clips (its fit, as is), another identity's held-out clips or a driving video's
fit (through ingest → keypoints → smplx_fit, flows.motion), or a motion file read by models.motion_io (AMASS/BEAT2
.npz, TalkSHOW .npy, SHOW .pkl through a restricted unpickler, the project's own fit). Foreign motion is resampled
to 30 fps and retargeted (models.retarget) onto the identity's shape, camera and framing.

The flow stages a motion in a directory (params.parquet, motion.json, optional audio.wav) whose content hash names
the render; this stage copies it into the render's artifacts, so a render is traceable to the exact motion. How the
motion was retargeted and its framing check sit beside it in framing.json, outside the key and the artifact (they
hold thresholds and float measurements that must not make a new render): this stage's summary carries them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from core.errors import InputError
from core.hashing import NOT_CONTENT, hash_tree
from core.progress import Progress
from core.section import Section
from core.stage import Stage
from models.motion_io import FIT_FPS, HandBasis, Motion, read_motion, resample, resampled_frames
from models.retarget import Framing, JointsFn, framing_check, framing_of, retarget
from tasks import smplx_table
from tasks.frames import read_meta

INFO = "motion.json"
FRAMING = "framing.json"  # what retargeting did and the framing check: beside the staged motion, not in its key
# a speech motion's audio file and its hash: the staged audio's samples are in the key, not where they came from
DESCRIBED = ("retarget", "framing", "audio_source", "audio_sha256")
JOINT_CHUNK = 2048  # frames per body-model pass
AUDIO = "audio.wav"
SPEECH_KEYS = ("speech_model", "seed", "speech")  # a speech motion's model (its version) and seed, in its key


def describe(s: dict[str, Any]) -> str:
    text = f"{s['kind']}: {s['frames']} frames at {s['fps']} fps{', with audio' if s.get('audio') else ''}"
    if s.get("speech_model"):
        text += (f", from speech model {s['speech_model'][:12]} (seed {s['seed']}, {s['speech']['seams']} seams "
                 f"in {s['speech']['segments']} segments)")
    retargeted = s.get("retarget") or {}
    if retargeted.get("mode") == "framing":
        turned = max(retargeted["torso_clamped_frames"], retargeted["head_clamped_frames"])
        text += f", torso/head turned into the identity's range in {turned} frames"
    if s.get("framing"):
        text += (f", head/shoulders outside its framing in {100 * s['framing']['head_or_shoulders_outside_share']:.0f}%"
                 f" of frames, hands in {100 * s['framing']['hands']['outside_share']:.0f}%")
    return text


class MotionParams(Section):
    """How a motion becomes a render's: what it may be (the rest is in the motion itself)."""

    max_frames: int = Field(108_000, ge=1, le=10_000_000, description="longest motion a render takes, in frames at "
                            "30 fps (default one hour); a longer one is refused before anything is made")
    retarget: Literal["framing", "pelvis"] = Field("framing", description="framing: a foreign motion's head and "
                                                   "shoulders land where the identity's are and its torso and head "
                                                   "turn within the identity's range; pelvis: only its mean pelvis "
                                                   "and orientation are moved (the earlier behaviour)")
    orientation_margin_deg: float = Field(10.0, ge=0, le=90, description="how far past the identity's own range "
                                          "(2nd-98th percentile) a torso or head may turn, in degrees")
    position_margin_m: float = Field(0.01, ge=0, le=1, description="how far past the identity's own range the "
                                     "head-shoulder point may sway, in metres")
    sway_limit: float = Field(1.0, gt=0, le=10, description="a motion's sway is scaled down to at most this many "
                              "times the identity's own spread")
    framing_tolerance_pct: float = Field(2.0, ge=0, le=50, description="a head, shoulder or hand further than this "
                                         "(percent of the frame side) outside the identity's training framing "
                                         "counts as outside")
    framing_warn_share: float = Field(0.5, ge=0, le=1, description="warn before denoising when head or shoulders "
                                      "are outside in more than this share of frames")


STAGE = Stage(
    "motion", flow="render", scope="render", external="motion", params=MotionParams, in_dvc=False, describe=describe,
    outputs=(smplx_table.TABLE, INFO, f"{AUDIO}?"),
    description="the motion a render follows (SMPL-X per frame, fitted to the identity) and its audio")

VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mts", ".mpg", ".mpeg", ".wmv", ".flv"}


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES


def _time_order(fit_dir: Path, ingest_dir: Path, split: str | None) -> tuple[list[int], list[dict[str, Any]]]:
    """Rows of the fit in time order (the ingest meta's clip order, not alphabetical), optionally one split only."""
    keys, _ = smplx_table.read(fit_dir / smplx_table.TABLE)
    clips = [c for c in read_meta(ingest_dir)["clips"] if split is None or c["split"] == split]
    rows: list[int] = []
    for clip in sorted(clips, key=lambda c: c.get("start", 0)):
        idx = np.flatnonzero(keys["clip"] == clip["name"])
        rows += idx[np.argsort(keys["frame"][idx], kind="stable")].tolist()
    return rows, clips


def fit_as_motion(fit_dir: Path, ingest_dir: Path, split: str | None = None) -> Motion:
    """A video's fit (or one split of it) as one motion, its clips in time order."""
    rows, _ = _time_order(fit_dir, ingest_dir, split)
    _, blocks = smplx_table.read(fit_dir / smplx_table.TABLE)
    betas = np.asarray(smplx_table.read_identity(fit_dir / smplx_table.IDENTITY)["betas"], np.float32)
    return Motion(fps=FIT_FPS, betas=betas, source="video", **{k: v[rows] for k, v in blocks.items()})


@dataclass
class Reference:
    """The identity's framing (from its own fitted training frames) and its body as a joints function."""

    framing: Framing
    joints: JointsFn


def reference(fit_dir: Path, body_model: Path) -> Reference:
    import torch

    from models import body

    keys, blocks = smplx_table.read(fit_dir / smplx_table.TABLE)
    ident = smplx_table.read_identity(fit_dir / smplx_table.IDENTITY)
    betas = torch.tensor(ident["betas"], dtype=torch.float32)[None]
    sparse = body.SparseBody(body.load(body_model))

    def joints(b: dict[str, np.ndarray]) -> np.ndarray:
        out = []
        with torch.no_grad():
            for start in range(0, len(b["transl"]), JOINT_CHUNK):  # bounded memory for any length
                part = {k: torch.from_numpy(np.ascontiguousarray(v[start:start + JOINT_CHUNK], np.float32))
                        for k, v in b.items()}
                out.append(sparse(betas, part["expression"], body.full_pose(part), part["transl"]).joints.numpy())
        return np.concatenate(out) if out else np.zeros((0, body.N_JOINTS, 3), np.float32)

    rest = joints({k: np.zeros((1, w), np.float32) for k, w in smplx_table.BLOCKS.items()})[0, body.PELVIS]
    train = keys["split"] == "train" if "split" in keys else np.ones(len(keys["frame"]), bool)
    if not train.any():
        train[:] = True
    own = {k: v[train] for k, v in blocks.items()}
    return Reference(framing_of(own, rest.astype(np.float64), joints, ident["camera"]), joints)


def check_length(frames: int, fps: float, max_frames: int, what: str) -> None:
    """Refuse, before resampling allocates it, a motion longer than a render may be."""
    out = resampled_frames(frames, fps, FIT_FPS)
    if out > max_frames:
        raise InputError(f"{what}: {frames} frames at {fps:g} fps make {out} frames at 30 fps "
                         f"({out / FIT_FPS / 3600:.1f} h), more than motion.max_frames = {max_frames}")


def prepare(motion: Motion, ref: Reference, params: MotionParams | None = None
            ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Resample to 30 fps and retarget; returns parameter blocks and a description (what retargeting did and the
    framing check included)."""
    params = params or MotionParams()
    src_fps, src_frames = motion.fps, motion.frames
    check_length(src_frames, src_fps, params.max_frames, f"motion ({motion.source})")
    motion = resample(motion, FIT_FPS)
    blocks, said = retarget(motion, ref.framing, ref.joints, mode=params.retarget,
                            orientation_margin_deg=params.orientation_margin_deg,
                            position_margin_m=params.position_margin_m, sway_limit=params.sway_limit)
    info = {"source_format": motion.source, "source_fps": src_fps, "source_frames": src_frames,
            "frames": motion.frames, "fps": FIT_FPS, "seconds": round(motion.frames / FIT_FPS, 3),
            "retarget": said, "framing": check_framing(blocks, ref, params)}
    if motion.notes:
        info["notes"] = list(motion.notes)
    return blocks, info


def check_framing(blocks: dict[str, np.ndarray], ref: Reference, params: MotionParams | None = None
                  ) -> dict[str, Any]:
    """How far the motion's head, shoulders and hands go outside the identity's training framing; `mostly_outside`
    when head or shoulders are out in more than `framing_warn_share` of the frames."""
    params = params or MotionParams()
    check = framing_check(blocks, ref.framing, ref.joints, params.framing_tolerance_pct)
    check["mostly_outside"] = check["head_or_shoulders_outside_share"] > params.framing_warn_share
    return check


def framing_warning(framing: dict[str, Any]) -> str | None:
    """The line a render prints before denoising when its motion leaves the identity's framing."""
    if not framing.get("mostly_outside"):
        return None
    return (f"the motion's head or shoulders are outside the identity's training framing in "
            f"{100 * framing['head_or_shoulders_outside_share']:.0f}% of its frames (worst "
            f"{max(framing['head']['worst_pct'], framing['shoulders']['worst_pct']):.0f}% of the frame away): expect "
            "a broken picture there; motion.retarget = framing keeps a motion in the identity's framing")


def load_file(path: Path, clip: str | None = None, hands: HandBasis | None = None) -> Motion:
    return read_motion(path, clip=clip, hands=hands)


def write(path: Path, blocks: dict[str, np.ndarray]) -> None:
    t = len(blocks["transl"])
    smplx_table.write(path, {"clip": np.array(["motion"] * t), "split": np.array(["motion"] * t),
                             "frame": np.arange(t)}, blocks)


def held_out(fit_dir: Path, ingest_dir: Path) -> tuple[dict[str, np.ndarray], float]:
    """An identity's test clips as one motion in time order (its own fit, as is), and the second of the source
    where it starts (for the audio)."""
    rows, clips = _time_order(fit_dir, ingest_dir, "test")
    if not rows:
        raise InputError(f"{ingest_dir.parent.name} has no held-out (test) clips")
    _, blocks = smplx_table.read(fit_dir / smplx_table.TABLE)
    return {k: v[rows] for k, v in blocks.items()}, float(min(c["start_s"] for c in clips))


def cut_audio(wav: Path, out: Path, start_s: float, frames: int, fps: int = FIT_FPS) -> bool:
    """The part of `wav` under `frames` video frames from `start_s`, padded with silence; False if no wav."""
    if not wav.is_file():
        return False
    with wave.open(str(wav), "rb") as src:
        rate, channels, width = src.getframerate(), src.getnchannels(), src.getsampwidth()
        begin = round(start_s * rate)
        total = round(frames / fps * rate)
        src.setpos(min(begin, src.getnframes()))
        data = src.readframes(total)
    data += b"\0" * (total * channels * width - len(data))
    with wave.open(str(out), "wb") as dst:
        dst.setnchannels(channels)
        dst.setsampwidth(width)
        dst.setframerate(rate)
        dst.writeframes(data)
    return True


def stage(staging: Path, blocks: dict[str, np.ndarray], info: dict[str, Any], audio: Path | None,
          audio_start_s: float = 0.0, frames: int | None = None,
          framing: tuple[Reference, MotionParams] | None = None) -> tuple[str, Path]:
    """Write a motion (cut to `frames` if given) to staging/<content key>; returns (key, directory). With
    `framing`, the framing check of the frames that will be rendered goes beside it (FRAMING)."""
    total = len(blocks["transl"])
    if frames is not None:
        if frames < 1:
            raise InputError(f"--frames must be at least 1, got {frames}")
        if frames > total:
            raise InputError(f"--frames {frames}: the motion has only {total} frames")
        blocks = {k: v[:frames] for k, v in blocks.items()}
        total = frames
    described = {k: info[k] for k in DESCRIBED if k in info}
    info = {k: v for k, v in info.items() if k not in DESCRIBED}
    if framing is not None:
        described["framing"] = check_framing(blocks, *framing)
    staging.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=staging))
    write(tmp / smplx_table.TABLE, blocks)
    has_audio = audio is not None and cut_audio(audio, tmp / AUDIO, audio_start_s, total)
    (tmp / INFO).write_text(json.dumps({**info, "frames": total, "fps": FIT_FPS, "audio": has_audio},
                                       indent=2, sort_keys=True) + "\n")
    key = hash_tree(tmp)[:12]
    final = staging / key
    if final.exists():
        shutil.rmtree(tmp)
    else:
        tmp.rename(final)
    described_file = final / FRAMING
    if described:
        part = final / f".{FRAMING}.{os.getpid()}.tmp"
        part.write_text(json.dumps(described, indent=2, sort_keys=True) + "\n")
        part.replace(described_file)  # this render's thresholds, whatever an earlier staging wrote
    else:
        described_file.unlink(missing_ok=True)
    return key, final


def read_framing(motion_dir: Path) -> dict[str, Any]:
    """A staged motion's retargeting description and framing check ({} when it has none)."""
    path = motion_dir / FRAMING
    return json.loads(path.read_text()) if path.is_file() else {}


def restage(artifact: Path, staging: Path) -> Path:
    """A motion artifact back in staging/<its key>, to drive the same render again (same content, same key)."""
    key = hash_tree(artifact)[:12]
    final = staging / key
    if not final.exists():
        staging.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=staging))
        shutil.copytree(artifact, tmp, dirs_exist_ok=True,
                        ignore=lambda d, names: [n for n in names if Path(d) == artifact and n in NOT_CONTENT])
        tmp.rename(final)
    return final


def read_info(motion_dir: Path) -> dict[str, Any]:
    return json.loads((motion_dir / INFO).read_text())


def run(inputs: dict[str, Path], out: Path, params: MotionParams, progress: Progress, *, motion: Path
        ) -> dict[str, Any]:
    """Copy the staged motion into the render's artifacts; its framing description goes to the summary."""
    for name in (smplx_table.TABLE, INFO, AUDIO):
        if (motion / name).is_file():
            shutil.copy2(motion / name, out / name)
    if not (out / smplx_table.TABLE).is_file():
        raise InputError(f"{motion}: not a staged motion (no {smplx_table.TABLE})")
    info = read_info(out)
    return ({k: info.get(k) for k in ("kind", "source", "frames", "fps", "audio", "source_format")}
            | {k: info[k] for k in SPEECH_KEYS + ("notes",) if k in info} | read_framing(motion))
