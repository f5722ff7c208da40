"""Speech-driven motion for one identity, learned from its own onboarding video (no pretrained weights).

Body, hands and head come from a motion graph over the identity's own fitted frames: the new audio is cut into
segments, and a Viterbi search picks, for each, a segment of the training video whose original audio looks alike
(loudness and onset profile, voicing, pitch) while keeping transitions between poses that are close (a natural
continuation costs nothing, a jump costs its pose and velocity distance plus a seam penalty). Seams are blended over
a few frames with quaternion slerp; a search that would show frames it showed seconds ago runs again with those
costing more. Jaw and mouth expression come from a ridge regressor trained on the identity's audio against its
fitted jaw and expression, reading a window of log-mel frames or of loudness alone, as cross-validation on held-back
blocks of the training clips chooses: the person's own mapping where the training minute supports one.

Every level is relative to the recording's own speech level, so a quieter microphone does not read as silence.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FPS = 30
SAMPLE_RATE = 24_000  # 800 samples per video frame
HOP = SAMPLE_RATE // FPS
N_FFT = 1024
N_MELS = 40
FLOOR_DB = -80.0  # below the recording's speech level; digital silence is clipped here
SILENCE_DBFS = -70.0  # frames quieter than this are silence in any recording (digital silence, faint hiss)
MIN_SNR_DB = 15.0  # a recording whose loud frames (95th percentile) are not this far above its quiet ones (5th)
# holds no speech: steady hiss or hum at any level is silence
VOICED_DB = -30.0  # frames this far below the recording's speech level count as silence too
CHUNK_FRAMES = 30 * FPS  # audio is analysed 30 s at a time: memory does not grow with its length
MARGIN = 6 * HOP  # samples either side of a chunk, more than any analysis window reaches (yin's 2048)
ROTATION_BLOCKS = ("global_orient", "body_pose", "left_hand_pose", "right_hand_pose", "jaw_pose", "leye_pose",
                   "reye_pose")
LINEAR_BLOCKS = ("transl", "expression")
MOUTH_BLOCKS = ("jaw_pose", "expression")
# SMPL-X joints that carry gesture and head motion: spine1-3, neck, collars, head, shoulders, elbows, wrists (what a
# transition compares and what beat consistency and jerk are measured on)
UPPER_BODY = (3, 6, 9, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21)
UPPER_JOINTS = tuple(j - 1 for j in UPPER_BODY)  # the same joints as rows of body_pose (which leaves out the pelvis)
REUSE_PASSES = 3  # Viterbi searches at most, each penalising the reuses the one before made
CONFIG = "speech_model.json"
WEIGHTS = "speech_model.npz"


# ------------------------------------------------------------------------------ arithmetic the same in any process
# OpenBLAS and its LAPACK sum in another order with another thread count, and that count is one setting for the
# whole process: a Dask worker runs BLAS on one thread, a CLI process on all cores, and identities onboarded side by
# side in threads share one pool that no thread can pin for itself alone. Every product and solve that shapes the
# speech model or its motion therefore runs in numpy's own loops, which give the same bits wherever they run. The
# matrices are small (a few hundred columns); it costs a fraction of a second per identity.
def _matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`a @ b` without BLAS."""
    return np.einsum("ij,jk->ik", a, b, optimize=False)


def _solve_spd(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`a⁻¹ b` for a symmetric positive definite `a` (a ridge system): Cholesky by columns and two triangular
    substitutions, every sum an elementwise numpy reduction rather than LAPACK."""
    n = len(a)
    low = np.zeros_like(a)
    for j in range(n):
        row = low[j, :j]
        low[j, j] = np.sqrt(a[j, j] - (row * row).sum())
        low[j + 1:, j] = (a[j + 1:, j] - (low[j + 1:, :j] * row).sum(1)) / low[j, j]
    z = np.zeros_like(b)
    for i in range(n):
        z[i] = (b[i] - (low[i, :i, None] * z[:i]).sum(0)) / low[i, i]
    w = np.zeros_like(b)
    for i in reversed(range(n)):
        w[i] = (z[i] - (low[i + 1:, i, None] * w[i + 1:]).sum(0)) / low[i, i]
    return w


# ------------------------------------------------------------------------------------------------ audio features
@dataclass
class Features:
    """Per video frame (30 fps): log-mel and loudness relative to the recording's speech level, onset strength
    relative to its own 95th percentile, log2 pitch relative to its median, and the voiced (speech) flag."""

    mel: np.ndarray  # (T, N_MELS) dB relative
    rms: np.ndarray  # (T,) dB relative
    onset: np.ndarray  # (T,)
    pitch: np.ndarray  # (T,) octaves from the median voiced pitch, 0 where unvoiced
    voiced: np.ndarray  # (T,) bool

    @property
    def frames(self) -> int:
        return len(self.rms)

    def window(self, start: int, stop: int) -> Features:
        return Features(*(getattr(self, f)[start:stop] for f in ("mel", "rms", "onset", "pitch", "voiced")))


def frames_of(samples: int) -> int:
    """Video frames (30 fps) covering `samples` at SAMPLE_RATE: the rendered length of an audio."""
    return max(0, round(samples / HOP))


def features(y: np.ndarray) -> Features:
    """`y`: mono float samples at SAMPLE_RATE. Analysed CHUNK_FRAMES at a time with a margin wider than any
    analysis window (the same values as in one pass), then normalised over the whole recording."""
    import librosa

    y = np.asarray(y, np.float32)
    t = frames_of(len(y))
    if t == 0:
        raise ValueError("audio shorter than one video frame")
    skip = MARGIN // HOP
    mel_basis = librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmax=8000)
    mel_db = np.empty((t, N_MELS), np.float32)
    rms_db, onset, f0 = (np.empty(t, np.float32) for _ in range(3))
    for a in range(0, t, CHUNK_FRAMES):
        b = min(t, a + CHUNK_FRAMES)
        lo, hi = a * HOP - MARGIN, b * HOP + MARGIN  # zeros outside the recording, as one pass would see
        seg = np.zeros(hi - lo, np.float32)
        part = y[max(lo, 0): max(min(hi, len(y)), 0)]
        seg[max(lo, 0) - lo: max(lo, 0) - lo + len(part)] = part
        keep = slice(skip, skip + b - a)
        power = _matmul(mel_basis, np.abs(librosa.stft(seg, n_fft=N_FFT, hop_length=HOP)) ** 2)  # mel power
        db = librosa.power_to_db(power, top_db=None)  # absolute: the same in every chunk
        mel_db[a:b] = db.T[keep]
        rms = librosa.feature.rms(y=seg, frame_length=N_FFT, hop_length=HOP)[0]
        rms_db[a:b] = 20 * np.log10(np.maximum(rms[keep], 1e-10))
        onset[a:b] = librosa.onset.onset_strength(S=db, sr=SAMPLE_RATE, hop_length=HOP)[keep]
        f0[a:b] = librosa.yin(seg, fmin=65, fmax=500, sr=SAMPLE_RATE, frame_length=2048, hop_length=HOP)[keep]
    quiet, level = (float(v) for v in np.percentile(np.maximum(rms_db, -120.0), [5, 95]))  # level: speech level
    gated = rms_db < SILENCE_DBFS
    if level - quiet < MIN_SNR_DB:
        gated[:] = True
    rel = np.where(gated, FLOOR_DB, np.maximum(rms_db - level, FLOOR_DB))
    voiced = rel > VOICED_DB
    onset = np.where(gated, 0.0, onset)
    onset = onset / max(float(np.percentile(onset[voiced], 95)) if voiced.any() else 0.0, 1e-6)
    octaves = np.log2(np.maximum(f0, 1.0))
    pitch = np.where(voiced, octaves - (np.median(octaves[voiced]) if voiced.any() else 0.0), 0.0)
    mel = np.where(gated[:, None], FLOOR_DB, np.maximum(mel_db - level, FLOOR_DB))  # silence: the same everywhere
    return Features(mel.astype(np.float32), rel.astype(np.float32),
                    onset.astype(np.float32), np.clip(pitch, -2, 2).astype(np.float32), voiced)


def onset_times(y: np.ndarray) -> np.ndarray:
    """Audio beats (seconds): the onsets librosa finds, for the beat-consistency score."""
    import librosa

    return librosa.onset.onset_detect(y=np.asarray(y, np.float32), sr=SAMPLE_RATE, hop_length=HOP, units="time")


def compile_audio_kernels() -> list[str]:
    """Compile librosa's numba kernels that `features` and `onset_times` use, in this one process, into numba's
    on-disk cache; returns the cache index files there. Run once after installing (`make setup` does): processes
    that compile the same gufunc at once (pytest workers, Dask workers, two commands) can write a mismatched pair of
    cache files, and every later process that loads the pair crashes with a segfault (numba issue 10128)."""
    import librosa
    import numba

    rng = np.random.default_rng(0)
    t = np.arange(SAMPLE_RATE, dtype=np.float32) / SAMPLE_RATE
    y = (0.3 * np.sin(2 * np.pi * 180 * t) * (t % 0.25 < 0.12) + 0.01 * rng.standard_normal(t.size))
    features(y.astype(np.float32))
    onset_times(y.astype(np.float32))
    root = Path(numba.config.CACHE_DIR) if numba.config.CACHE_DIR else Path(librosa.__file__).parent
    return sorted(str(p) for p in root.rglob("*.nbi"))


# ----------------------------------------------------------------------------------------------------- mouth
# The jaw and mouth expression are a ridge regression on a window of audio features. Which window and how strong a
# ridge is chosen per identity by cross-validation on its own training minute, in contiguous time blocks (frames a
# few apart are nearly the same, so a random split would grade the model on what it saw): a few hundred frames
# cannot carry ~370 spectral inputs for every voice, and where the richer input does not predict held-back time
# better than loudness alone, loudness is what the model uses.
MOUTH_INPUTS = ("loudness", "mel")  # from least to most: the loudness window; log-mel windows and loudness
BASELINE = ("loudness", 4, 0.3)  # the loudness-only baseline the benchmarks compare with (inputs, context, alpha)


@dataclass(frozen=True)
class MouthSpec:
    """What the mouth regressor reads: `inputs` (MOUTH_INPUTS) over `context` frames either side, ridge `alpha`."""

    inputs: str
    context: int
    alpha: float

    @property
    def label(self) -> str:
        return f"{self.inputs} ±{self.context} frames, alpha {self.alpha:g}"


def spectral_mean(f: Features) -> np.ndarray:
    """Each log-mel band's mean over the recording's speech: subtracted from the mel inputs, so a microphone's or a
    room's colouring, or a voice's own timbre, is not read as a mouth shape."""
    voiced = f.voiced if f.voiced.any() else np.ones(f.frames, bool)
    return f.mel[voiced].astype(np.float64).mean(0)


def mouth_inputs(f: Features, spec: MouthSpec, band_mean: np.ndarray) -> np.ndarray:
    """Each frame's inputs with `spec.context` frames either side: the loudness window, or the log-mel window
    (relative to `band_mean`, the recording's `spectral_mean`) and the frame's loudness."""
    c = spec.context
    if spec.inputs == "loudness":
        pad = np.pad(f.rms.astype(np.float64), (c, c), mode="edge")
        return np.stack([pad[k: k + f.frames] for k in range(2 * c + 1)], 1)
    if spec.inputs != "mel":
        raise ValueError(f"mouth inputs {spec.inputs!r}: one of {', '.join(MOUTH_INPUTS)}")
    pad = np.pad(f.mel.astype(np.float64) - band_mean, ((c, c), (0, 0)), mode="edge")
    return np.concatenate([*(pad[k: k + f.frames] for k in range(2 * c + 1)), f.rms[:, None].astype(np.float64)],
                          axis=1)


def _standardised(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                                          np.ndarray]:
    """(x standardised, its mean, its scale, y centred, y's mean)."""
    mx, sx, my = x.mean(0), x.std(0) + 1e-6, y.mean(0)
    return (x - mx) / sx, mx, sx, y - my, my


def _ridge_weights(gram: np.ndarray, rhs: np.ndarray, rows: int, alpha: float) -> np.ndarray:
    return _solve_spd(gram + alpha * rows * np.eye(len(gram)), rhs)


def fit_mouth(x: np.ndarray, y: np.ndarray, alpha: float) -> dict[str, np.ndarray]:
    """A standardised ridge regression of `y` on `x`, with the ranges it learnt from (what `apply_mouth` clips to)."""
    xs, mx, sx, yc, my = _standardised(x, y)
    w = _ridge_weights(_matmul(xs.T, xs), _matmul(xs.T, yc), len(xs), alpha)
    return {"mean_x": mx, "scale_x": sx, "weights": w, "mean_y": my, "low_x": x.min(0), "high_x": x.max(0),
            "low_y": y.min(0), "high_y": y.max(0)}


def apply_mouth(m: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    # inside what it learnt from: digital silence or a shout does not open the jaw past the person's own
    x = np.clip(x, m["low_x"], m["high_x"])
    return np.clip(_matmul((x - m["mean_x"]) / m["scale_x"], m["weights"]) + m["mean_y"], m["low_y"], m["high_y"])


def time_folds(frames: int, fold_frames: int, max_folds: int) -> list[np.ndarray]:
    """Contiguous blocks of at least `fold_frames` frames, at most `max_folds` of them; none when fewer than two
    fit (too little to cross-validate)."""
    k = min(max_folds, frames // max(1, fold_frames))
    return [] if k < 2 else np.array_split(np.arange(frames), k)


def cross_validate_mouth(feats: Features, y: np.ndarray, specs: list[MouthSpec], folds: list[np.ndarray],
                         gap: int, smoothing: float) -> dict[MouthSpec, np.ndarray]:
    """Each spec's jaw opening predicted on held-back blocks: every fold by a model fitted on the rest, less `gap`
    frames either side of the fold (its window and smoothing reach that far). `y`: the regression targets, jaw pose
    in its first three columns."""
    from scipy.ndimage import gaussian_filter1d

    band_mean = spectral_mean(feats)
    predicted: dict[MouthSpec, np.ndarray] = {}
    for inputs, context in sorted({(s.inputs, s.context) for s in specs}):
        x = mouth_inputs(feats, MouthSpec(inputs, context, 0.0), band_mean)
        mine = [s for s in specs if (s.inputs, s.context) == (inputs, context)]
        for s in mine:
            predicted[s] = np.empty(len(x))
        for fold in folds:
            keep = np.ones(len(x), bool)
            keep[max(0, fold[0] - gap): fold[-1] + 1 + gap] = False
            xs, mx, sx, yc, my = _standardised(x[keep], y[keep])
            gram, rhs = _matmul(xs.T, xs), _matmul(xs.T, yc)
            ranges = {"low_x": x[keep].min(0), "high_x": x[keep].max(0), "low_y": y[keep].min(0),
                      "high_y": y[keep].max(0)}
            for s in mine:
                m = {"mean_x": mx, "scale_x": sx, "weights": _ridge_weights(gram, rhs, len(xs), s.alpha),
                     "mean_y": my, **ranges}
                out = apply_mouth(m, x[fold])[:, :3]
                out = gaussian_filter1d(out, smoothing, axis=0, mode="nearest") if smoothing > 0 else out
                predicted[s][fold] = jaw_angle(out)
    return predicted


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1]) if len(a) > 1 and a.std() > 0 and b.std() > 0 else 0.0


def choose_mouth(predicted: dict[MouthSpec, np.ndarray], jaw: np.ndarray, folds: list[np.ndarray],
                 fallback: MouthSpec) -> tuple[MouthSpec, dict[MouthSpec, float]]:
    """The spec to use and every spec's cross-validated jaw correlation: within each held-back block, then the mean
    over blocks (pooled over blocks, a model fitted on the others predicts their mean level, which runs against the
    block's own, and a weak input scores below zero for it). The best loudness spec, unless a richer one scores
    higher *and* its block-by-block gain over loudness exceeds one standard error of that gain (the
    one-standard-error rule, paired by block). `fallback` when nothing was cross-validated."""
    per_fold = {s: np.array([_corr(p[f], jaw[f]) for f in folds]) for s, p in predicted.items()}
    scores = {s: float(v.mean()) for s, v in per_fold.items()}
    best = {i: max((s for s in scores if s.inputs == i), key=lambda s: scores[s], default=None) for i in MOUTH_INPUTS}
    chosen = best["loudness"]
    if chosen is None:
        return fallback, scores
    for inputs in MOUTH_INPUTS[1:]:
        s = best[inputs]
        if s is None or scores[s] <= scores[chosen]:
            continue
        gain = per_fold[s] - per_fold[chosen]
        if gain.mean() > gain.std(ddof=1) / np.sqrt(len(gain)):
            chosen = s
    return chosen, scores


def loudness_jaw(train: Features, jaw: np.ndarray, test: Features, spec: MouthSpec = MouthSpec(*BASELINE)
                 ) -> np.ndarray:
    """The baseline the mouth regressor must beat: jaw opening from loudness alone."""
    x = mouth_inputs(train, spec, np.zeros(0))
    m = fit_mouth(x, np.asarray(jaw, np.float64)[:, None], spec.alpha)
    return apply_mouth({**m, "low_y": np.full(1, -np.inf), "high_y": np.full(1, np.inf)},
                       mouth_inputs(test, spec, np.zeros(0)))[:, 0]


def jaw_angle(jaw_pose: np.ndarray) -> np.ndarray:
    """How far the jaw is open: its rotation about the x axis (SMPL-X's jaw opens about x, positive open). Not the
    rotation's whole angle: a fit's jaw also twists a little about y and z, and from a pose closed slightly past
    neutral, opening makes that angle smaller first (on one talking clip the whole angle fell as the lips parted)."""
    return np.asarray(jaw_pose, np.float64)[..., 0]


# -------------------------------------------------------------------------------------------- motion graph
def pose_vectors(blocks: dict[str, np.ndarray]) -> np.ndarray:
    """What a transition compares: upper-body and root rotations, hands at a lower weight."""
    n = len(blocks["body_pose"])
    body = blocks["body_pose"].reshape(n, 21, 3)[:, UPPER_JOINTS].reshape(n, -1)
    hands = np.concatenate([blocks["left_hand_pose"], blocks["right_hand_pose"]], axis=1) * 0.25
    return np.concatenate([blocks["global_orient"], body, hands], axis=1).astype(np.float32)


def segment_features(f: Features, starts: np.ndarray, length: int, bins: int) -> np.ndarray:
    """Per segment: loudness and onset profiles over `bins` sub-windows, voiced share and mean pitch."""
    idx = starts[:, None] + np.arange(length)[None]
    parts = np.array_split(np.arange(length), bins)
    loud = np.stack([f.rms[idx[:, p]].mean(1) for p in parts], 1) / 10.0  # 10 dB ≈ one unit
    onset = np.stack([f.onset[idx[:, p]].max(1) for p in parts], 1)
    voiced = f.voiced[idx].mean(1, keepdims=True) * 2.0
    pitch = f.pitch[idx].mean(1, keepdims=True)
    return np.concatenate([loud, onset, voiced, pitch], axis=1).astype(np.float32)


@dataclass
class SpeechModel:
    """What `synthesise` needs: the identity's fitted frames in time order (runs of consecutive frames), their
    audio features, the segment graph and the mouth regressor."""

    blocks: dict[str, np.ndarray]  # (N, width) per SMPL-X block, training frames in time order
    runs: np.ndarray  # (N,) run id: frames of one run are consecutive in the video
    feats: Features
    config: dict[str, Any]
    mouth: dict[str, np.ndarray] = field(default_factory=dict)

    # -------------------------------------------------------------------------------------------- learning
    @classmethod
    def learn(cls, blocks: dict[str, np.ndarray], runs: np.ndarray, feats: Features, config: dict[str, Any]
              ) -> SpeechModel:
        if feats.frames != len(runs):
            raise ValueError(f"{feats.frames} audio frames for {len(runs)} fitted frames")
        if len(runs) < 2 * config["segment"]:
            raise ValueError(f"{len(runs)} fitted frames: a speech model needs at least {2 * config['segment']}")
        model = cls({k: np.asarray(v, np.float32) for k, v in blocks.items()}, np.asarray(runs, np.int32), feats,
                    dict(config))
        y = np.concatenate([blocks[b] for b in MOUTH_BLOCKS], axis=1).astype(np.float64)
        specs = [MouthSpec(i, c, a) for i in MOUTH_INPUTS for c in config["mouth_contexts"]
                 for a in config["ridge_alphas"]]
        fallback = MouthSpec("loudness", max(config["mouth_contexts"]),
                             float(np.median(config["ridge_alphas"])))
        folds = time_folds(len(runs), round(config["cv_fold_s"] * FPS), config["cv_folds"])
        gap = max(config["mouth_contexts"]) + int(np.ceil(3 * config["mouth_smoothing"]))
        predicted = cross_validate_mouth(feats, y, specs, folds, gap, config["mouth_smoothing"]) if folds else {}
        spec, scores = choose_mouth(predicted, jaw_angle(blocks["jaw_pose"]), folds, fallback)
        model.config["mouth"] = {"inputs": spec.inputs, "context": spec.context, "alpha": spec.alpha,
                                 "jaw_corr_cv": round(scores[spec], 3) if spec in scores else None,
                                 "folds": len(folds),
                                 "scores": {s.label: round(v, 3) for s, v in scores.items()}}
        model.mouth = fit_mouth(mouth_inputs(feats, spec, spectral_mean(feats)), y, spec.alpha)
        return model

    @property
    def mouth_spec(self) -> MouthSpec:
        m = self.config["mouth"]
        return MouthSpec(m["inputs"], m["context"], m["alpha"])

    def predict_mouth(self, feats: Features) -> dict[str, np.ndarray]:
        from scipy.ndimage import gaussian_filter1d

        m, spec = self.mouth, self.mouth_spec
        band_mean = spectral_mean(feats)  # this recording's own, as the training minute's was its own
        y = np.empty((feats.frames, len(m["mean_y"])), np.float64)
        for a in range(0, feats.frames, CHUNK_FRAMES):  # a window of inputs per frame: chunked, memory stays flat
            b = min(feats.frames, a + CHUNK_FRAMES)
            lo, hi = max(0, a - spec.context), min(feats.frames, b + spec.context)
            y[a:b] = apply_mouth(m, mouth_inputs(feats.window(lo, hi), spec, band_mean)[a - lo: a - lo + b - a])
        y = gaussian_filter1d(y, self.config["mouth_smoothing"], axis=0, mode="nearest") if len(y) > 1 else y
        out, at = {}, 0
        for b in MOUTH_BLOCKS:
            width = self.blocks[b].shape[1]
            out[b] = y[:, at: at + width].astype(np.float32)
            at += width
        return out

    # ------------------------------------------------------------------------------------------- the graph
    def _states(self) -> np.ndarray:
        """Segment starts whose segment stays inside one run: every `stride`-th frame of each run, counted from
        the run's first frame, with `stride` dividing the segment length (or a multiple of it), so the natural
        continuation of every start is itself a start."""
        length, n = self.config["segment"], len(self.runs)
        first = np.zeros(n, np.int64)
        for k in range(1, n):
            first[k] = first[k - 1] if self.runs[k] == self.runs[k - 1] else k
        ok = np.array([s + length <= n and self.runs[s] == self.runs[s + length - 1] for s in range(n)])
        need = max(1, int(np.ceil(ok.sum() / self.config["max_states"])))
        stride = next((d for d in range(need, length + 1) if length % d == 0), length * int(np.ceil(need / length)))
        return np.flatnonzero(ok & ((np.arange(n) - first) % stride == 0))

    def _transitions(self, starts: np.ndarray) -> np.ndarray:
        """Cost of following segment i by segment j: 0 for the natural continuation, else the pose and velocity
        distance between the frame that would come next and j's first frame, plus the seam penalty; a jump back
        into or just before segment i itself (a visible loop) costs the repeat penalty on top."""
        c, length = self.config, self.config["segment"]
        pose = pose_vectors(self.blocks)
        pose = pose / (pose.std(0) + 1e-3)
        vel = np.diff(pose, axis=0, prepend=pose[:1])
        n = len(self.runs)
        nxt = np.minimum(starts + length, n - 1)
        cont = (starts + length < n) & (self.runs[nxt] == self.runs[starts])
        src = np.where(cont, nxt, starts + length - 1)  # where i would go on (or its last frame)
        dims = pose.shape[1]
        d_pose = _pairwise(pose[src], pose[starts]) / dims
        d_vel = _pairwise(vel[src], vel[starts]) / dims
        cost = c["seam_penalty"] + d_pose + c["velocity_weight"] * d_vel
        natural = cont[:, None] & (starts[None, :] == (starts + length)[:, None])
        cost[natural] = 0.0
        gap = starts[None, :] - starts[:, None]
        loop = (gap > -2 * length) & (gap < length) & ~natural
        cost[loop] += c["repeat_penalty"]
        return cost.astype(np.float32)

    def synthesise(self, feats: Features, seed: int = 0, progress: Any = None) -> tuple[dict[str, np.ndarray],
                                                                                      dict[str, Any]]:
        """SMPL-X blocks for every frame of `feats` (30 fps): the graph path, blended seams, the predicted mouth."""
        c, length = self.config, self.config["segment"]
        t_total = feats.frames
        steps = max(1, int(np.ceil(t_total / length)))
        starts = self._states()
        trans = self._transitions(starts)
        src_feat = segment_features(self.feats, starts, length, c["bins"])
        pad = steps * length - t_total
        target = feats if pad == 0 else _padded(feats, pad)
        tgt_feat = segment_features(target, np.arange(steps) * length, length, c["bins"])
        # A Viterbi path is Markov: it cannot see that a segment came up 15 s ago. A ten-minute voice-over would
        # show the favourite gestures again and again, so the search is repeated: where the path reuses frames it
        # showed within `min_reuse_s`, those frames' segments cost `reuse_penalty` more at that step next time
        # (penalties accumulate over the passes, at most REUSE_PASSES; the pass that repeats least is kept).
        # never more than half the training material: beyond it every segment is a repeat and none is spared
        window = round(min(c.get("min_reuse_s", 0.0) * FPS, 0.5 * len(self.runs)) / length)
        passes = REUSE_PASSES if window > 0 and c.get("reuse_penalty", 0.0) > 0 else 1
        extra: dict[int, np.ndarray] = {}
        best: tuple[int, np.ndarray] | None = None
        for k in range(passes):
            path = self._viterbi(starts, trans, src_feat, tgt_feat, extra, seed, progress, k)
            reused = recent_reuse(starts[path], length, window) if window > 0 else []
            if best is None or len(reused) < best[0]:
                best = (len(reused), path)
            if not reused or k == passes - 1:
                break
            for t in reused:
                used = starts[path[max(0, t - window): t]]
                near = np.flatnonzero((np.abs(starts[:, None] - used[None, :]) < length).any(1))
                extra[t] = np.union1d(extra.get(t, near[:0]), near)
        reuses, path = best  # the pass that repeated least
        blocks, seams = self._assemble(starts[path], t_total)
        blocks.update(self.predict_mouth(feats))
        said = {"segments": steps, "seams": len(seams), "states": len(starts),
                "source_frames_used": int(len(np.unique(starts[path])) * length),
                "reused_within_min_reuse": reuses}
        return blocks, {**said, "seam_frames": seams}

    def _viterbi(self, starts: np.ndarray, trans: np.ndarray, src_feat: np.ndarray, tgt_feat: np.ndarray,
                 extra: dict[int, np.ndarray], seed: int, progress: Any, attempt: int) -> np.ndarray:
        """The cheapest path of segment starts (indices into `starts`), one per target segment: emissions perturbed
        by seeded noise (the same noise on every attempt), so a seed picks among near-equal paths; `extra[t]`: the
        states that cost `reuse_penalty` more at step t."""
        c = self.config
        steps = len(tgt_feat)
        rng = np.random.default_rng(seed)
        if progress is not None:
            progress.start("choosing gestures for the speech" + (f" (pass {attempt + 1}: fewer repeats)"
                                                                 if attempt else ""), steps)

        def emission(t: int) -> np.ndarray:
            e = _emission(tgt_feat[t], src_feat) + c["variety"] * rng.gumbel(size=len(starts))
            if t in extra:
                e[extra[t]] += c["reuse_penalty"]
            return e

        back = np.zeros((steps, len(starts)), np.int32)
        cost = emission(0)
        for t in range(1, steps):
            total = cost[:, None] + trans
            back[t] = total.argmin(0)
            cost = total[back[t], np.arange(len(starts))] + emission(t)
            if progress is not None:
                progress.advance()
        path = np.zeros(steps, np.int64)
        path[-1] = int(cost.argmin())
        for t in range(steps - 1, 0, -1):
            path[t - 1] = back[t, path[t]]
        return path

    def _assemble(self, chosen: np.ndarray, frames: int) -> tuple[dict[str, np.ndarray], list[int]]:
        from scipy.spatial.transform import Rotation

        length, n = self.config["segment"], len(self.runs)
        blend = min(self.config["blend"], length)  # a blend never runs into the next seam
        rows = (chosen[:, None] + np.arange(length)[None]).reshape(-1)[:frames]
        out = {k: v[rows].copy() for k, v in self.blocks.items()}
        seams: list[int] = []
        for t in range(1, len(chosen)):
            at = t * length
            if at >= frames:
                break
            prev_end = chosen[t - 1] + length
            if chosen[t] == prev_end and prev_end < n and self.runs[prev_end] == self.runs[chosen[t - 1]]:
                continue  # the natural continuation: no seam
            seams.append(at)
            k = np.arange(min(blend, frames - at))
            # what the previous segment would have become: its own continuation, or its last frame held
            cont = prev_end + k
            cont = np.where((cont < n) & (self.runs[np.minimum(cont, n - 1)] == self.runs[chosen[t - 1]]), cont,
                            prev_end - 1)
            w = _smoothstep((k + 1) / (blend + 1))
            for name in self.blocks:
                old, new = self.blocks[name][cont], out[name][at + k]
                if name in ROTATION_BLOCKS:
                    a = Rotation.from_rotvec(old.reshape(-1, 3).astype(np.float64))
                    b = Rotation.from_rotvec(new.reshape(-1, 3).astype(np.float64))
                    ww = np.repeat(w, old.shape[1] // 3)
                    mixed = a * Rotation.from_rotvec((a.inv() * b).as_rotvec() * ww[:, None])
                    out[name][at + k] = mixed.as_rotvec().reshape(old.shape).astype(np.float32)
                else:
                    out[name][at + k] = ((1 - w)[:, None] * old + w[:, None] * new).astype(np.float32)
        return out, seams

    # ---------------------------------------------------------------------------------------- save / load
    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {f"block_{k}": v for k, v in self.blocks.items()}
        arrays |= {f"feat_{k}": getattr(self.feats, k) for k in ("mel", "rms", "onset", "pitch", "voiced")}
        arrays |= {f"mouth_{k}": v for k, v in self.mouth.items()}
        with open(folder / WEIGHTS, "wb") as fh:
            np.savez(fh, runs=self.runs, **arrays)
        (folder / CONFIG).write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, folder: Path) -> SpeechModel:
        config = json.loads((folder / CONFIG).read_text())
        with np.load(folder / WEIGHTS, allow_pickle=False) as z:
            blocks = {k[6:]: z[k] for k in z.files if k.startswith("block_")}
            feats = Features(*(z[f"feat_{k}"] for k in ("mel", "rms", "onset", "pitch", "voiced")))
            mouth = {k[6:]: z[k] for k in z.files if k.startswith("mouth_")}
            runs = z["runs"]
        return cls(blocks, runs, feats, config, mouth)


def recent_reuse(chosen: np.ndarray, length: int, window: int) -> list[int]:
    """Steps whose segment (first frame `chosen[t]`, `length` frames) overlaps one shown in the `window` steps
    before it."""
    return [t for t in range(1, len(chosen))
            if (np.abs(chosen[max(0, t - window): t] - chosen[t]) < length).any()]


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * _matmul(a, b.T), 0.0)


def _emission(target: np.ndarray, sources: np.ndarray) -> np.ndarray:
    return ((sources - target[None]) ** 2).sum(1)


def _smoothstep(x: np.ndarray) -> np.ndarray:
    return x * x * (3 - 2 * x)


def _padded(f: Features, pad: int) -> Features:
    """`f` with `pad` frames of its last value appended, so the last segment is whole."""
    return Features(*(np.concatenate([a, np.repeat(a[-1:], pad, axis=0)])
                      for a in (f.mel, f.rms, f.onset, f.pitch, f.voiced)))


# ------------------------------------------------------------------------------------------------- scores
BEAT_ORDER = 7  # a kinematic beat is smaller than every speed within 7 frames either side (BEAT/EMAGE)
BEAT_STILL = 0.3  # ... and the joint moves: normalised speed above this (a still joint has no beats)
BEAT_SIGMA = 0.3  # seconds: the Gaussian of an onset's distance to its nearest beat (BEAT/EMAGE)


def kinematic_beats(joints: np.ndarray, fps: float = FPS) -> list[np.ndarray]:
    """Per joint, the times (s) of its kinematic beats: local minima (order BEAT_ORDER) of its speed (central
    differences) over its mean speed, where that ratio is above BEAT_STILL. `joints`: (T, J, 3)."""
    from scipy.signal import argrelextrema

    if len(joints) < 3:
        return [np.zeros(0) for _ in range(joints.shape[1])]
    speed = np.linalg.norm(joints[2:] - joints[:-2], axis=-1) * fps / 2  # at frames 1 .. T-2
    mean = speed.mean(0)
    out = []
    for j in range(speed.shape[1]):
        if mean[j] <= 0:
            out.append(np.zeros(0))
            continue
        norm = speed[:, j] / mean[j]
        minima = argrelextrema(norm, np.less, order=BEAT_ORDER)[0]
        out.append((minima[norm[minima] > BEAT_STILL] + 1) / fps)
    return out


def beat_consistency(onsets: np.ndarray, joints: np.ndarray, fps: float = FPS, sigma: float = BEAT_SIGMA) -> float:
    """BC as BEAT and EMAGE compute it: for each audio onset (s) inside the motion, exp(-d²/2σ²) with d the
    distance to a joint's nearest kinematic beat, averaged over onsets, then over the upper-body joints given.
    A joint with no beat scores 0. `joints`: (T, J, 3)."""
    return _alignment(onsets, kinematic_beats(joints, fps), len(joints) / fps, sigma)


def _alignment(onsets: np.ndarray, beats: list[np.ndarray], duration: float, sigma: float = BEAT_SIGMA) -> float:
    a = np.asarray(onsets, np.float64)
    a = a[(a >= 0) & (a <= duration)]
    if len(a) == 0:
        return 0.0
    scores = []
    for b in beats:
        if len(b) == 0:
            scores.append(0.0)
            continue
        d = np.abs(a[:, None] - b[None]).min(1)
        scores.append(float(np.exp(-(d ** 2) / (2 * sigma ** 2)).mean()))
    return float(np.mean(scores))


def beat_null(onsets: np.ndarray, joints: np.ndarray, shifts: int = 200, min_shift_s: float = 1.0, seed: int = 0,
              fps: float = FPS) -> np.ndarray:
    """BC of the same motion circularly shifted in time by `shifts` seeded offsets of at least `min_shift_s`
    either way, against the same onsets: what chance alignment of this very motion scores. The beats are found
    once and shifted with it (rolling the positions would add a jump where the ends meet, and with it a speed
    spike that changes every joint's normalisation)."""
    n = len(joints)
    lo = int(np.ceil(min_shift_s * fps))
    if n <= 2 * lo:
        return np.zeros(0)
    beats, duration = kinematic_beats(joints, fps), n / fps
    offsets = np.random.default_rng(seed).integers(lo, n - lo + 1, size=shifts) / fps
    return np.array([_alignment(onsets, [(b + k) % duration for b in beats], duration) for k in offsets])


def beat_percentile(onsets: np.ndarray, joints: np.ndarray, shifts: int = 200, seed: int = 0,
                    fps: float = FPS) -> tuple[float, float | None]:
    """(BC, its percentile among `beat_null`'s shifts: 50 is chance, ties count half); None when the motion is too
    short to shift by a second either way."""
    score = beat_consistency(onsets, joints, fps)
    null = beat_null(onsets, joints, shifts, seed=seed, fps=fps)
    if len(null) == 0:
        return score, None
    return score, float(100 * ((null < score).mean() + 0.5 * (null == score).mean()))


def jerk(joints: np.ndarray, fps: float = FPS) -> np.ndarray:
    """(T-3, J) magnitude of the third difference of joint positions (m/s³)."""
    return np.linalg.norm(np.diff(joints, n=3, axis=0), axis=-1) * fps ** 3
