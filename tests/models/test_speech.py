"""models/speech.py: features, the mouth regressor, the motion graph's seams, determinism, the scores; and the audio
reader (tasks/audio.py). The identity here is synthetic motion paired with real speech (the seated test clip)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from core.errors import InputError
from models import speech as sp
from tasks import audio as aud
from tasks import smplx_table
from tasks.stages.speech import SpeechParams
from tests.conftest import encode_aac, shared_video

CONFIG = SpeechParams().model_dump()  # the stage's defaults


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return aud.decode(shared_video("anchor_seated_hevc.mp4"))


def synthetic_identity(feats: sp.Features, seed: int = 0) -> dict[str, np.ndarray]:
    """Gestures as slow oscillations of the upper body; the jaw opening with the voice (smoothed loudness)."""
    rng = np.random.default_rng(seed)
    t = np.arange(feats.frames) / sp.FPS
    blocks = {k: np.zeros((feats.frames, w), np.float32) for k, w in smplx_table.BLOCKS.items()}
    body = blocks["body_pose"].reshape(feats.frames, 21, 3)
    for j in sp.UPPER_JOINTS:
        freq, phase = rng.uniform(0.3, 1.2, 3), rng.uniform(0, 2 * np.pi, 3)
        body[:, j] = 0.3 * np.sin(2 * np.pi * freq[None] * t[:, None] + phase[None])
    blocks["body_pose"] = body.reshape(feats.frames, 63)
    blocks["left_hand_pose"][:] = 0.2 * np.sin(2 * np.pi * 0.7 * t)[:, None]
    loud = np.clip((feats.rms + 30) / 30, 0, 1)
    blocks["jaw_pose"][:, 0] = 0.02 + 0.2 * np.convolve(loud, np.ones(3) / 3, mode="same")
    blocks["expression"][:, 0] = loud
    blocks["transl"][:] = [0.0, 0.2, 2.5]
    return blocks


def learn(y: np.ndarray, seconds: float, jaw: Any = None, **config: object) -> sp.SpeechModel:
    """A model of the synthetic identity on the first `seconds` of `y`; `jaw(feats)`, if given, replaces its jaw
    opening (and the expression that follows it)."""
    feats = sp.features(y[: int(seconds * sp.SAMPLE_RATE)])
    blocks = synthetic_identity(feats)
    if jaw is not None:
        blocks["jaw_pose"][:, 0] = blocks["expression"][:, 0] = jaw(feats)
    return sp.SpeechModel.learn(blocks, np.zeros(feats.frames, np.int32), feats, {**CONFIG, **config})


def max_step(blocks: dict[str, np.ndarray]) -> float:
    """Largest frame-to-frame rotation of any upper-body joint (radians)."""
    body = blocks["body_pose"].reshape(len(blocks["body_pose"]), 21, 3)[:, sp.UPPER_JOINTS].astype(np.float64)
    a = Rotation.from_rotvec(body[:-1].reshape(-1, 3))
    b = Rotation.from_rotvec(body[1:].reshape(-1, 3))
    return float((a.inv() * b).magnitude().max())


def test_same_audio_and_seed_give_the_same_motion_one_frame_per_thirtieth_of_a_second(speech: np.ndarray) -> None:
    model = learn(speech, 6.0)
    clip = speech[7 * sp.SAMPLE_RATE: int(9.5 * sp.SAMPLE_RATE)]  # 2.5 s it never heard
    first, said = model.synthesise(sp.features(clip), seed=3)
    again, _ = model.synthesise(sp.features(clip), seed=3)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert set(first) == set(smplx_table.BLOCKS)
    assert abs(len(first["transl"]) - 2.5 * 30) <= 1 and said["segments"] == 7
    assert all(v.shape == (len(first["transl"]), smplx_table.BLOCKS[k]) for k, v in first.items())


def test_seams_are_blended_so_no_joint_jumps_far_beyond_the_identitys_own_steps(speech: np.ndarray) -> None:
    """A harsh case: 90 frames of smooth, phase-shifted oscillations to say 10 s with, so the path jumps often and
    far (raw seams up to ~0.85 rad); blended, no frame-to-frame step exceeds 2.5x the largest in the training motion
    nor a third of the largest raw jump."""
    model = learn(speech, 3.0)
    feats = sp.features(speech[5 * sp.SAMPLE_RATE: 15 * sp.SAMPLE_RATE])
    blended, said = model.synthesise(feats, seed=0)
    model.config["blend"] = 0
    raw, said_raw = model.synthesise(feats, seed=0)
    assert said["seam_frames"] == said_raw["seam_frames"] and len(said["seam_frames"]) >= 5
    own, jump = max_step(model.blocks), max_step(raw)
    assert jump > 5 * own  # unblended, the seams would jump
    assert max_step(blended) <= min(2.5 * own, jump / 3)


def test_a_loud_burst_opens_the_jaw_there_and_silence_keeps_it_closed(speech: np.ndarray) -> None:
    model = learn(speech, 8.0)
    rate = sp.SAMPLE_RATE
    t = np.arange(int(0.6 * rate)) / rate
    burst = 0.4 * np.sin(2 * np.pi * 160 * t) * (1 + 0.5 * np.sin(2 * np.pi * 4 * t))
    burst += 0.05 * np.random.default_rng(0).normal(size=len(t))
    audio = np.concatenate([np.zeros(rate), burst, np.zeros(rate)]).astype(np.float32)
    blocks, _ = model.synthesise(sp.features(audio), seed=0)
    jaw = sp.jaw_angle(blocks["jaw_pose"])
    assert len(jaw) == 78
    silent = np.r_[jaw[:27], jaw[51:]]
    loud = jaw[33:45]
    trained = sp.jaw_angle(model.blocks["jaw_pose"])
    assert loud.mean() > 3 * silent.mean()
    pauses = trained[~model.feats.voiced]
    assert silent.max() <= pauses.mean() + 0.01  # at rest, as in the person's own pauses
    assert loud.mean() >= 0.75 * trained[model.feats.voiced].mean()  # open about as far as when they speak


def _smooth(x: np.ndarray) -> np.ndarray:
    return np.convolve(x, np.ones(3) / 3, mode="same").astype(np.float32)


def test_the_mouth_reads_loudness_where_only_loudness_carries_the_jaw(speech: np.ndarray) -> None:
    """The synthetic identity's jaw is its smoothed loudness: the log-mel window has nothing more to give, and
    cross-validation on held-back blocks must say so rather than fit the spectrum's noise."""
    model = learn(speech, 14.0)
    mouth = model.config["mouth"]
    assert model.mouth_spec.inputs == "loudness", mouth["scores"]
    assert mouth["folds"] == 5 and mouth["jaw_corr_cv"] > 0.9
    assert len(mouth["scores"]) == 2 * len(CONFIG["mouth_contexts"]) * len(CONFIG["ridge_alphas"])
    # and held-out speech is read the same way
    held = sp.features(speech[14 * sp.SAMPLE_RATE:])
    truth = sp.jaw_angle(synthetic_identity(held)["jaw_pose"])
    assert np.corrcoef(sp.jaw_angle(model.predict_mouth(held)["jaw_pose"]), truth)[0, 1] > 0.9


def test_the_mouth_reads_the_spectrum_where_a_band_carries_the_jaw(speech: np.ndarray) -> None:
    """A jaw that follows how bright the voice is (its upper mel bands over its lower ones), which loudness cannot
    tell: cross-validation must choose the log-mel window, and it must predict held-out speech."""
    def bright(f: sp.Features) -> np.ndarray:
        tilt = f.mel[:, 28:].mean(1) - f.mel[:, :12].mean(1)
        return np.where(f.voiced, 0.05 + 0.01 * _smooth(np.clip(tilt + 20, 0, 30)), 0.02).astype(np.float32)

    model = learn(speech, 14.0, jaw=bright)
    mouth = model.config["mouth"]
    assert model.mouth_spec.inputs == "mel", mouth["scores"]
    loud = max(v for k, v in mouth["scores"].items() if k.startswith("loudness"))
    assert mouth["jaw_corr_cv"] > loud + 0.3 and mouth["jaw_corr_cv"] > 0.7
    held = sp.features(speech[14 * sp.SAMPLE_RATE:])
    assert np.corrcoef(sp.jaw_angle(model.predict_mouth(held)["jaw_pose"]), bright(held))[0, 1] > 0.7


def test_a_jaw_the_audio_does_not_carry_and_a_minute_too_short_to_hold_back_leave_the_mouth_on_loudness(
        speech: np.ndarray) -> None:
    noise = learn(speech, 14.0, jaw=lambda f: (0.1 + 0.05 * np.random.default_rng(3).random(f.frames)))
    assert noise.mouth_spec.inputs == "loudness" and abs(noise.config["mouth"]["jaw_corr_cv"]) < 0.2
    short = learn(speech, 3.5)  # 105 frames: fewer than two blocks of cv_fold_s
    assert short.config["mouth"]["folds"] == 0 and short.config["mouth"]["jaw_corr_cv"] is None
    assert short.mouth_spec == sp.MouthSpec("loudness", max(CONFIG["mouth_contexts"]), 1.0)


def test_a_long_speech_shows_again_what_it_showed_seconds_ago_less_often_when_that_costs(speech: np.ndarray) -> None:
    """Minutes of speech on 14 s of material: the same gestures must come back, but not within seconds if the
    search can help it. With the reuse penalty off, count the steps that show frames shown within the window (half
    the material here); with it on, fewer, and the motion is still one frame per 1/30 s."""
    model = learn(speech, 14.0)
    long = sp.features(np.tile(speech[14 * sp.SAMPLE_RATE:], 10))  # 60 s of speech the model never heard
    model.config.update(min_reuse_s=20.0, reuse_penalty=0.0)
    _, free = model.synthesise(long, seed=0)
    model.config.update(reuse_penalty=2.0)
    blocks, costly = model.synthesise(long, seed=0)
    assert free["reused_within_min_reuse"] > 0.3 * free["segments"]  # the unpenalised search repeats a lot
    assert costly["reused_within_min_reuse"] < 0.9 * free["reused_within_min_reuse"], (free, costly)
    assert len(blocks["transl"]) == long.frames
    steps = np.array([0, 30, 5, 100, 12, 41])  # segment starts of 12 frames, a 3-step window
    # 5 overlaps 0 two steps back; 12 overlaps 5; 41 would overlap 30, four steps back: outside the window
    assert sp.recent_reuse(steps, 12, 3) == [2, 4]


def test_held_back_blocks_are_contiguous_and_never_shorter_than_asked() -> None:
    folds = sp.time_folds(307, 60, 5)
    assert len(folds) == 5 and np.array_equal(np.concatenate(folds), np.arange(307))
    assert all(len(f) >= 60 and np.all(np.diff(f) == 1) for f in folds)
    assert len(sp.time_folds(200, 60, 5)) == 3 and sp.time_folds(119, 60, 5) == []


def test_levels_are_relative_to_the_recording_and_silence_is_unvoiced(speech: np.ndarray) -> None:
    clip = speech[: 4 * sp.SAMPLE_RATE]
    loud, quiet = sp.features(clip), sp.features(0.25 * clip)  # 12 dB quieter microphone
    assert np.abs(loud.rms - quiet.rms)[loud.voiced].max() < 0.5
    assert (loud.voiced == quiet.voiced).mean() > 0.98 and loud.voiced.mean() > 0.5
    silent = sp.features(np.zeros(sp.SAMPLE_RATE, np.float32))
    assert silent.frames == 30 and not silent.voiced.any() and (silent.rms == sp.FLOOR_DB).all()
    # steady hiss or hum is no speech at any level; speech over a -50 dBFS hiss still is
    rng = np.random.default_rng(0)
    for dbfs in (-75, -62, -45, -25):
        hiss = rng.normal(size=2 * sp.SAMPLE_RATE).astype(np.float32)
        hiss *= 10 ** (dbfs / 20) / hiss.std()
        heard = sp.features(hiss)
        assert not heard.voiced.any() and (heard.mel == sp.FLOOR_DB).all(), dbfs
    hiss = rng.normal(size=len(clip)).astype(np.float32)
    noisy = sp.features(clip + hiss * (10 ** (-50 / 20) / hiss.std()))
    assert (noisy.voiced == loud.voiced).mean() > 0.9


def test_a_saved_model_loads_and_speaks_the_same(speech: np.ndarray, tmp_path: Path) -> None:
    model = learn(speech, 4.0)
    model.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [sp.CONFIG, sp.WEIGHTS]
    back = sp.SpeechModel.load(tmp_path / "m")
    feats = sp.features(speech[10 * sp.SAMPLE_RATE: 12 * sp.SAMPLE_RATE])
    a, _ = model.synthesise(feats, seed=1)
    b, _ = back.synthesise(feats, seed=1)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def _paused_at(times: np.ndarray, frames: int, joints: int = 3, seed: int = 0, noise: float = 0.1) -> np.ndarray:
    """(frames, joints, 3) positions whose speed is high but for a short pause at each of `times` (s): gestures
    that stop on the beat, each joint with a direction and a little speed noise of its own."""
    rng = np.random.default_rng(seed)
    t = np.arange(frames) / sp.FPS
    pause = np.exp(-((t[:, None] - times[None]) ** 2) / (2 * 0.05 ** 2)).max(1) if len(times) else np.zeros(frames)
    out = np.zeros((frames, joints, 3))
    for j in range(joints):
        speed = (1 - 0.6 * pause) * (1 + noise * rng.random(frames))  # slows to ~0.4 (a beat: above BEAT_STILL)
        path = np.cumsum(speed) - speed / 2  # so that the central difference at frame k is centred on speed[k]
        out[:, j] = path[:, None] * rng.normal(size=3) / sp.FPS
    return out


def test_beat_consistency_is_one_on_the_beat_and_falls_off_with_sigma() -> None:
    onsets = np.array([1.0, 2.0, 3.0])
    joints = _paused_at(onsets, 120, joints=1, noise=0.0)
    assert [np.round(b, 3).tolist() for b in sp.kinematic_beats(joints)] == [[1.0, 2.0, 3.0]]
    assert sp.beat_consistency(onsets, joints) == pytest.approx(1.0)
    late = onsets + sp.BEAT_SIGMA
    assert sp.beat_consistency(late, joints) == pytest.approx(np.exp(-0.5), abs=1e-6)
    still = np.zeros((120, 1, 3))
    assert sp.kinematic_beats(still)[0].size == 0 and sp.beat_consistency(onsets, still) == 0.0
    # each joint counts on its own: a second joint that never pauses halves the score
    both = np.concatenate([joints, np.cumsum(np.ones((120, 1, 3)), 0) / 30], axis=1)
    assert sp.beat_consistency(onsets, both) == pytest.approx(0.5)


def test_gestures_that_pause_on_the_onsets_beat_their_own_shifts_and_chance_does_not() -> None:
    rng = np.random.default_rng(1)
    frames = 30 * 20
    onsets = np.sort(rng.uniform(0.5, 19.5, 24))
    on_beat, pct = sp.beat_percentile(onsets, _paused_at(onsets, frames, joints=4))
    assert on_beat > 0.8 and pct > 95
    # chance: gestures pausing at random times, smooth random motion and jitter, against these onsets, land
    # anywhere in their own nulls (a percentile is uniform under chance: about 50 on average, rarely above 95)
    percentiles, scores = [], []
    for seed in range(16):
        r = np.random.default_rng(100 + seed)
        smooth = np.cumsum(np.cumsum(r.normal(size=(frames, 4, 3)), 0), 0) / 1e3
        jitter = r.normal(size=(frames, 4, 3)) * 0.01
        elsewhere = _paused_at(np.sort(r.uniform(0.5, 19.5, 24)), frames, joints=4, seed=seed)
        for motion in (smooth, jitter, elsewhere):
            score, p = sp.beat_percentile(onsets, motion, shifts=100, seed=seed)
            percentiles.append(p)
            scores.append(score)
    assert 38 < np.mean(percentiles) < 62 and np.mean(np.array(percentiles) > 95) <= 0.15, percentiles
    assert np.mean(scores) < 0.9 * on_beat
    assert sp.beat_percentile(onsets, _paused_at(onsets, 50, joints=1))[1] is None  # too short to shift


def test_jerk_is_the_third_derivative_of_position() -> None:
    t = np.arange(60) / sp.FPS
    joints = np.zeros((60, 2, 3))
    joints[:, 0, 0] = t ** 3  # 6 m/s³
    joints[:, 1, 2] = 2 * t  # steady: none
    jerk = sp.jerk(joints)
    assert jerk.shape == (57, 2)
    np.testing.assert_allclose(jerk[:, 0], 6.0, rtol=1e-6)
    np.testing.assert_allclose(jerk[:, 1], 0.0, atol=1e-6)


def test_audio_reader_refuses_what_is_not_audio_and_reads_any_container(tmp_path: Path) -> None:
    text = tmp_path / "notes.wav"
    text.write_text("not a sound\n")
    with pytest.raises(InputError, match="not an audio or video file"):
        aud.check(text)
    empty = tmp_path / "empty.wav"
    aud.write_wav(empty, np.zeros(0, np.float32))
    with pytest.raises(InputError, match="the audio is empty"):
        aud.check(empty)
    with pytest.raises(InputError, match="the audio is empty"):
        aud.decode(empty)
    from_video = aud.decode(shared_video("halfbody_portrait.mp4"))
    assert abs(len(from_video) / sp.SAMPLE_RATE - 9.9) < 0.1
    aud.check(shared_video("halfbody_portrait.mp4"))


def test_features_of_long_audio_are_made_in_chunks_with_the_values_of_one_pass(speech: np.ndarray,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    clip = speech[: 5 * sp.SAMPLE_RATE]
    whole = sp.features(clip)
    monkeypatch.setattr(sp, "CHUNK_FRAMES", 37)  # 150 frames in five uneven chunks
    chunked = sp.features(clip)
    for name in ("mel", "rms", "onset", "pitch"):
        np.testing.assert_allclose(getattr(chunked, name), getattr(whole, name), atol=1e-3, err_msg=name)
    assert np.array_equal(chunked.voiced, whole.voiced)


def test_the_mouth_is_predicted_in_chunks_with_the_values_of_one_pass(speech: np.ndarray,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    model = learn(speech, 4.0)
    feats = sp.features(speech[6 * sp.SAMPLE_RATE: 11 * sp.SAMPLE_RATE])
    whole = model.predict_mouth(feats)
    monkeypatch.setattr(sp, "CHUNK_FRAMES", 29)
    chunked = model.predict_mouth(feats)
    for name in sp.MOUTH_BLOCKS:
        np.testing.assert_allclose(chunked[name], whole[name], atol=1e-5, err_msg=name)


def test_a_subsampled_graph_keeps_its_natural_continuations(speech: np.ndarray) -> None:
    """More training frames than `max_states`: starts are thinned with a stride dividing the segment length, so a
    long stretch of similar speech still plays the person's own continuous motion (few seams)."""
    model = learn(speech, 12.0, segment=15, max_states=150)  # 360 frames: stride 3
    starts = model._states()
    assert len(starts) <= 150 and set(starts + 15) & set(starts)
    assert all((s + 15) in set(starts) for s in starts if s + 30 <= 360)
    feats = model.feats.window(0, 300)  # the training audio itself: the path may follow the video as it was
    _, said = model.synthesise(feats, seed=0)
    assert len(said["seam_frames"]) < said["segments"] // 2


def test_a_blend_longer_than_a_segment_is_refused_in_params() -> None:
    from pydantic import ValidationError

    from tasks.stages.speech import SpeechParams

    with pytest.raises(ValidationError, match="blend"):
        SpeechParams(segment=6, blend=12)
    assert SpeechParams(segment=12, blend=12).blend == 12


def test_an_audio_only_file_is_audio_whatever_its_suffix(speech: np.ndarray, tmp_path: Path) -> None:
    wav = tmp_path / "v.wav"
    aud.write_wav(wav, speech[: sp.SAMPLE_RATE])
    mp4 = encode_aac(wav, tmp_path / "voice.mp4")
    assert aud.is_audio(wav) and aud.is_audio(mp4)
    assert not aud.is_audio(shared_video("halfbody_portrait.mp4"))  # a video with sound is a video


def test_the_model_and_its_motion_are_the_same_bits_whatever_the_blas_threads(speech: np.ndarray) -> None:
    """A Dask worker runs BLAS on one thread, a CLI process on all cores, and identities onboarded in threads share
    one pool none can pin for itself: learning and speaking must not care."""
    from threadpoolctl import threadpool_limits

    made = []
    for threads in (1, 2):
        with threadpool_limits(threads):
            model = learn(speech, 6.0)
            blocks, _ = model.synthesise(sp.features(speech[8 * sp.SAMPLE_RATE: 12 * sp.SAMPLE_RATE]), seed=2)
        made.append((model.mouth, model.feats.mel, blocks))
    (m1, f1, b1), (m2, f2, b2) = made
    assert all(np.array_equal(m1[k], m2[k]) for k in m1) and np.array_equal(f1, f2)
    assert all(np.array_equal(b1[k], b2[k]) for k in b1)


@pytest.mark.slow
def test_the_audio_kernels_compiled_at_set_up_are_all_a_real_recording_needs(tmp_path: Path) -> None:
    """After `compile_audio_kernels` (run once by `make setup`), the features and onsets of a real recording
    compile nothing more: no process after set-up writes numba's cache, so none can race another writing it."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    root = Path(__file__).parents[2]
    warm = subprocess.run([sys.executable, "-c", "from models.speech import compile_audio_kernels as c\n"
                           "print('\\n'.join(c()))"], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert warm.returncode == 0, warm.stderr
    index = warm.stdout.split()
    for kernel in ("guf-utils.__peak_pick", "guf-utils._localmax", "guf-pitch._pi_wrapper"):
        assert any(Path(p).name.startswith(kernel) for p in index), (kernel, index)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "numba").rglob("*")}
    wav = tmp_path / "voice.wav"
    aud.write_wav(wav, aud.decode(shared_video("anchor_seated_hevc.mp4"))[: 3 * sp.SAMPLE_RATE])
    real = ("import sys\nfrom models import speech as sp\nfrom tasks import audio as aud\n"
            "y = aud.decode(sys.argv[1])\nsp.features(y)\nprint(len(sp.onset_times(y)))")
    used = subprocess.run([sys.executable, "-c", real, str(wav)], env=env, cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert used.returncode == 0 and int(used.stdout) > 0, used.stderr
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "numba").rglob("*")} == before
