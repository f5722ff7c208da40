"""speech: the identity's speech-motion model, learned from its own training clips (their audio and fitted SMPL-X).

models.speech holds the model (a motion graph over the fitted frames searched against the new audio, and a mouth
regressor on log-mel windows); this stage aligns the onboarding audio with the fitted frames and learns it. An
identity whose video had no audio track gets no model (its summary says so) and `anchor speak` refuses it; the
rest of onboarding is unaffected. Only training clips are used, so the held-out part stays a fair test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, field_validator, model_validator

from core.errors import InputError
from core.progress import Progress
from core.section import Section
from core.stage import Stage
from models.speech import CONFIG, HOP, SAMPLE_RATE, WEIGHTS, Features, SpeechModel, features
from tasks import smplx_table
from tasks.frames import read_meta


class SpeechParams(Section):
    """The speech-motion model: learnt in onboarding; its search settings are part of it (a change re-learns it
    and makes its speech renders stale)."""

    segment: int = Field(12, ge=4, le=120, description="frames per motion-graph segment (12 = 0.4 s)")
    blend: int = Field(6, ge=1, le=60, description="frames a seam between two segments is blended over (slerp)")
    bins: int = Field(4, ge=1, le=30, description="sub-windows of a segment whose loudness and onsets are matched")
    mouth_contexts: list[int] = Field([0, 2, 4, 8], min_length=1, description="frames either side the mouth "
                                      "regressor may see (cross-validation chooses)")
    ridge_alphas: list[float] = Field([0.1, 1.0, 10.0], min_length=1, description="ridge strengths of the mouth "
                                      "regressor to choose from")
    cv_fold_s: float = Field(2.0, ge=2.0, le=60, description="shortest held-back block of the mouth's "
                             "cross-validation, seconds")
    cv_folds: int = Field(5, ge=2, le=20, description="held-back blocks of the training clips (fewer when they are "
                          "short; none under two blocks, and the mouth reads loudness)")
    mouth_smoothing: float = Field(1.0, ge=0, le=10, description="Gaussian smoothing of jaw and expression, frames")
    max_states: int = Field(1500, ge=16, le=20000, description="at most this many segment starts in the graph "
                            "(a longer video is subsampled; search time grows with its square)")
    seam_penalty: float = Field(1.0, ge=0, description="cost of any jump to another part of the video")
    velocity_weight: float = Field(4.0, ge=0, description="weight of velocity against pose at a jump")
    repeat_penalty: float = Field(5.0, ge=0, description="cost of a jump back into the segment just shown")
    min_reuse_s: float = Field(20.0, ge=0, le=600, description="frames shown within this many seconds cost "
                               "reuse_penalty more when the search would show them again (0 = off)")
    reuse_penalty: float = Field(0.5, ge=0, description="cost of showing again what was shown within min_reuse_s "
                                 "(small: it breaks near-ties towards frames not shown lately, rather than "
                                 "override the speech)")
    variety: float = Field(0.1, ge=0, description="seeded noise on the audio match: different seeds (`anchor speak "
                           "--seed`, else render_body.seed), different but equally fitting gestures")

    @field_validator("mouth_contexts")
    @classmethod
    def _contexts(cls, v: list[int]) -> list[int]:
        if any(c < 0 or c > 30 for c in v):
            raise ValueError("each mouth context must be 0 to 30 frames")
        return sorted(set(v))

    @field_validator("ridge_alphas")
    @classmethod
    def _alphas(cls, v: list[float]) -> list[float]:
        if any(not 0 < a <= 1000 for a in v):
            raise ValueError("each ridge alpha must be above 0 and at most 1000")
        return sorted(set(v))

    @model_validator(mode="after")
    def _blend_within_segment(self) -> SpeechParams:
        if self.blend > self.segment:
            raise ValueError(f"blend ({self.blend}) must not exceed segment ({self.segment}): a seam's blend would "
                             "run into the next seam")
        return self


def describe(s: dict[str, Any]) -> str:
    if not s.get("audio"):
        return "no model: the onboarding video has no audio"
    if s.get("note"):
        return f"no model: {s['note']}"
    mouth = ""
    if "mouth_inputs" in s:
        cv = s.get("jaw_corr_cv")
        mouth = f"; mouth from {s['mouth_inputs']} " + (f"(cross-validated jaw correlation {cv})" if cv is not None
                                                        else "(too short to cross-validate)")
    return f"learnt from {s['frames']} frames ({s['seconds']:.0f} s of speech, {s['voiced_share']:.0%} voiced){mouth}"


STAGE = Stage(
    "speech", flow="onboard", inputs=("ingest", "smplx_fit"), params=SpeechParams, describe=describe,
    outputs=(f"{CONFIG}?", f"{WEIGHTS}?"),
    description="speech-motion model: gestures, head and mouth from the identity's own audio and fit")


def training_frames(fit_dir: Path, ingest_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of the fit's training clips in time order, their run ids (clips that follow each other in the video
    share one) and their frame numbers in the ingested video (= positions in its audio)."""
    keys, _ = smplx_table.read(fit_dir / smplx_table.TABLE)
    clips = sorted((c for c in read_meta(ingest_dir)["clips"] if c["split"] == "train"), key=lambda c: c["start"])
    rows: list[np.ndarray] = []
    runs: list[np.ndarray] = []
    frames: list[np.ndarray] = []
    run, end = -1, None
    for clip in clips:
        idx = np.flatnonzero(keys["clip"] == clip["name"])
        idx = idx[np.argsort(keys["frame"][idx], kind="stable")]
        if clip["start"] != end:
            run += 1
        rows.append(idx)
        runs.append(np.full(len(idx), run, np.int32))
        frames.append(clip["start"] + keys["frame"][idx].astype(np.int64))
        end = clip["start"] + clip["frames"]
    if not rows:
        raise InputError(f"{ingest_dir.parent.name} has no training clips")
    return np.concatenate(rows), np.concatenate(runs), np.concatenate(frames)


def select(f: Features, frames: np.ndarray) -> Features:
    """The features of these video frames (frames past the audio's end read as its last frame)."""
    idx = np.minimum(frames, f.frames - 1)
    return Features(f.mel[idx], f.rms[idx], f.onset[idx], f.pitch[idx], f.voiced[idx])


def training_features(audio: np.ndarray, runs: np.ndarray, frames: np.ndarray) -> Features:
    """Features of the training frames from the training clips' audio alone (each run's span, one after another),
    so nothing of the held-out part, not even its loudness, shapes the model."""
    pieces: list[np.ndarray] = []
    index: list[np.ndarray] = []
    offset = 0
    for run in np.unique(runs):
        own = frames[runs == run]
        a, b = int(own.min()), int(own.max()) + 1
        piece = audio[a * HOP: b * HOP]
        pieces.append(np.pad(piece, (0, (b - a) * HOP - len(piece))))
        index.append(offset + own - a)
        offset += b - a
    return select(features(np.concatenate(pieces)), np.concatenate(index))


def run(inputs: dict[str, Path], out: Path, params: SpeechParams, progress: Progress) -> dict[str, Any]:
    from tasks.audio import decode

    wav = inputs["ingest"] / "audio.wav"
    if not wav.is_file():
        return {"audio": False}
    progress.start("learning the speech-motion model", 3)
    _, blocks = smplx_table.read(inputs["smplx_fit"] / smplx_table.TABLE)
    rows, runs, frames = training_frames(inputs["smplx_fit"], inputs["ingest"])
    feats = training_features(decode(wav), runs, frames)
    progress.advance()
    if len(rows) < 2 * params.segment:
        return {"audio": True, "frames": int(len(rows)), "seconds": round(len(rows) / 30, 2),
                "note": f"{len(rows)} training frames: a speech model needs at least {2 * params.segment} "
                        f"(2 x speech.segment)"}
    model = SpeechModel.learn({k: v[rows] for k, v in blocks.items()}, runs, feats, params.model_dump())
    progress.advance()
    model.save(out)
    progress.advance()
    return {"audio": True, "frames": int(len(rows)), "seconds": round(len(rows) / 30, 2),
            "voiced_share": round(float(feats.voiced.mean()), 3), "runs": int(runs.max() + 1),
            # what the mouth reads, as cross-validation on the training clips chose it, and how well it predicted
            "mouth_inputs": model.mouth_spec.label, "jaw_corr_cv": model.config["mouth"]["jaw_corr_cv"]}


def has_model(model_dir: Path) -> bool:
    return (model_dir / WEIGHTS).is_file() and (model_dir / CONFIG).is_file()


def why_no_model(summary: dict[str, Any]) -> str:
    """Why an identity's speech stage made no model, as its summary says."""
    if summary.get("audio") is False:
        return ("its onboarding video had no audio track, and the speech model learns from the identity's own "
                "speech; onboard it from a video with sound")
    return summary.get("note") or "its speech model files are missing (run `anchor stage run speech NAME`)"


def synthesise(model_dir: Path, samples: np.ndarray, seed: int, progress: Progress | None = None
               ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """SMPL-X blocks at 30 fps for `samples` (mono at models.speech.SAMPLE_RATE), one frame per 1/30 s."""
    from tasks.audio import quantised

    model = SpeechModel.load(model_dir)
    return model.synthesise(features(quantised(samples)), seed, progress)


# ---------------------------------------------------------------------------------------- held-out comparison
SHUFFLE_S = 1.0  # piece length of the shuffled-real baseline
BEAT_JUDGEABLE = 75.0  # the real motion's percentile in its own null above which a clip can judge gesture timing


def held_out_audio(ingest_dir: Path, fit_dir: Path) -> tuple[dict[str, np.ndarray], np.ndarray] | None:
    """The identity's held-out fitted motion and the audio under it; None without audio or held-out clips."""
    from tasks.audio import decode
    from tasks.stages import motion as motion_task

    wav = ingest_dir / "audio.wav"
    if not wav.is_file():
        return None
    try:
        real, start_s = motion_task.held_out(fit_dir, ingest_dir)
    except InputError:
        return None
    n = len(real["transl"])
    audio = decode(wav)
    start = round(start_s * SAMPLE_RATE)
    return real, audio[start: start + n * HOP]


def compare(model_dir: Path, real: dict[str, np.ndarray], audio: np.ndarray, joints: Any, seed: int = 0
            ) -> dict[str, Any]:
    """The speech model driven by `audio` against the real motion under it: jaw correlation (and the loudness-only
    baseline's), beat consistency of generated, real and real-shuffled-in-1-s-pieces motion, jerk at the seams over
    the real motion's. `joints`: blocks → (T, J, 3) SMPL-X joints of the identity."""
    from models import speech as sp
    from tasks.audio import quantised

    n = len(real["transl"])
    model = SpeechModel.load(model_dir)
    feats = features(quantised(audio))  # as `synthesise` reads it: one analysis for the motion and the baseline
    gen, said = model.synthesise(feats, seed)
    gen = {k: v[:n] for k, v in gen.items()}
    jaw_real, jaw_gen = sp.jaw_angle(real["jaw_pose"]), sp.jaw_angle(gen["jaw_pose"])
    jaw_loud = sp.loudness_jaw(model.feats, sp.jaw_angle(model.blocks["jaw_pose"]), feats)[:n]
    pieces = np.array_split(np.arange(n), max(1, round(n / (SHUFFLE_S * sp.FPS))))
    order = np.random.default_rng(0).permutation(len(pieces))
    shuffled = {k: v[np.concatenate([pieces[i] for i in order])] for k, v in real.items()}
    upper = {k: joints(b)[:, sp.UPPER_BODY] for k, b in (("gen", gen), ("real", real), ("shuffled", shuffled))}
    beats = sp.onset_times(audio)
    jerk_gen, jerk_real = sp.jerk(upper["gen"]), sp.jerk(upper["real"])
    near = sorted({f for s in said["seam_frames"] for f in range(s - 3, s + model.config["blend"])
                   if 0 <= f < len(jerk_gen)})

    def corr(a: np.ndarray, b: np.ndarray) -> float | None:
        return None if len(a) < 2 or a.std() == 0 or b.std() == 0 else round(float(np.corrcoef(a, b)[0, 1]), 3)

    bc_gen, pct_gen = sp.beat_percentile(beats, upper["gen"], seed=seed)
    bc_real, pct_real = sp.beat_percentile(beats, upper["real"], seed=seed)

    def pct(p: float | None) -> float | None:
        return None if p is None else round(p, 1)

    return {"jaw_corr": corr(jaw_gen, jaw_real), "jaw_corr_loudness": corr(jaw_loud, jaw_real),
            "mouth_inputs": model.mouth_spec.label, "jaw_corr_cv": model.config["mouth"]["jaw_corr_cv"],
            "beat_consistency": round(bc_gen, 3), "beat_consistency_real": round(bc_real, 3),
            "beat_consistency_shuffled": round(sp.beat_consistency(beats, upper["shuffled"]), 3),
            "beat_percentile": pct(pct_gen), "beat_percentile_real": pct(pct_real),
            # gesture timing can be judged on a clip only where its real motion beats its own shifts
            "beat_judgeable": pct_real is not None and pct_real >= BEAT_JUDGEABLE,
            "seam_jerk_ratio": round(float(np.percentile(jerk_gen[near], 95) / np.percentile(jerk_real, 95)), 3)
            if near and np.percentile(jerk_real, 95) > 0 else None,
            "frames": n, "seams": len(said["seam_frames"]), "segments": said["segments"],
            "training_frames": len(model.runs), "audio_beats": len(beats),
            "series": {"jaw_real": jaw_real, "jaw_generated": jaw_gen, "jaw_loudness": jaw_loud},
            "generated": gen}
