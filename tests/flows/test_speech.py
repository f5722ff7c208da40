"""Speech drives an anchor: the speech model learnt in onboarding, speech motion staged like any motion (keyed by
the audio and the model), `anchor speak`, lineage and staleness, and bad input."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import av
import numpy as np
import pytest

from core.artifacts import read_manifest
from core.errors import InputError
from core.workspace import Workspace
from models import speech as sp
from tasks import audio as aud
from tasks import registry, runner, smplx_table
from tasks.registry import artifact_dir
from tasks.stages import motion as motion_task
from tasks.stages import speech as speech_task
from tests.conftest import (
    ONBOARDED_ID,
    anchor,
    cli,
    copy_workspace,
    cut_clip,
    encode_aac,
    set_param,
    shared_video,
    video_frames,
)

pytestmark = pytest.mark.slow
ID = ONBOARDED_ID


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory, trained: Path) -> Workspace:
    return Workspace(copy_workspace(trained, tmp_path_factory.mktemp("ws") / "ws"))


@pytest.fixture(scope="module")
def voice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 s of the seated anchor's speech the model never heard (from 5 s on; onboarding saw the first 1.5 s)."""
    y = aud.decode(shared_video("anchor_seated_hevc.mp4"))
    path = tmp_path_factory.mktemp("audio") / "voice.wav"
    aud.write_wav(path, y[5 * sp.SAMPLE_RATE: 7 * sp.SAMPLE_RATE])
    return path


def test_onboarding_learns_the_speech_model_from_the_training_clips_only(ws: Workspace, tmp_path: Path) -> None:
    """The held-out clip's sound changed: the same model, byte for byte; the training clip's changed: another."""
    from core.artifacts import write_json
    from core.hashing import MANIFEST, hash_tree

    m = read_manifest(artifact_dir(ws, "speech", ID))
    assert m["summary"]["audio"] is True and m["summary"]["frames"] == 44
    # 44 frames (1.5 s) cannot be held back in two blocks of speech.cv_fold_s: the mouth reads loudness, and says so
    assert m["summary"]["mouth_inputs"] == "loudness ±8 frames, alpha 1" and m["summary"]["jaw_corr_cv"] is None
    model = sp.SpeechModel.load(artifact_dir(ws, "speech", ID))
    _, fit = smplx_table.read(artifact_dir(ws, "smplx_fit", ID) / smplx_table.TABLE)
    assert np.array_equal(model.blocks["body_pose"], fit["body_pose"][:44])  # its own fitted frames, in order

    def speech_model_after(start_s: float, end_s: float | None) -> str:
        """Noise over [start_s, end_s) of the ingested sound, its samples rewritten in place (same rate and format,
        every other byte as it was), then the speech stage again."""
        import wave

        w = Workspace(copy_workspace(ws.root, tmp_path / f"ws-{start_s}"))
        ingest = artifact_dir(w, "ingest", ID)
        with wave.open(str(ingest / "audio.wav")) as f:
            params, raw = f.getparams(), bytearray(f.readframes(f.getnframes()))
        step = params.sampwidth * params.nchannels
        a = round(start_s * params.framerate) * step
        b = len(raw) if end_s is None else round(end_s * params.framerate) * step
        raw[a:b] = np.random.default_rng(0).integers(0, 256, b - a, dtype=np.uint8).tobytes()
        with wave.open(str(ingest / "audio.wav"), "wb") as f:
            f.setparams(params)
            f.writeframes(bytes(raw))
        write_json(ingest / MANIFEST, {**read_manifest(ingest), "output_hash": hash_tree(ingest)})  # a new ingest
        made = runner.execute(w, "speech", ID)
        assert not made.reused  # its input changed: it ran
        return made.output_hash

    train_end_s = 44 / sp.FPS
    assert speech_model_after(train_end_s, None) == m["output_hash"]  # the held-out sound: never heard
    assert speech_model_after(0.2, train_end_s - 0.2) != m["output_hash"]


def test_speech_motion_is_keyed_by_audio_and_model_and_lasts_as_long_as_the_audio(ws: Workspace, voice: Path,
                                                                               tmp_path: Path) -> None:
    from flows.render import stage_motion

    key, staged = stage_motion(ws, None, ID, str(voice), None)  # type: ignore[arg-type]
    again_key, again = stage_motion(ws, None, ID, str(voice), None)  # type: ignore[arg-type]
    assert again_key == key and (again / smplx_table.TABLE).read_bytes() == (staged / smplx_table.TABLE).read_bytes()
    info = motion_task.read_info(staged)
    model = read_manifest(artifact_dir(ws, "speech", ID))["output_hash"]
    assert info["kind"] == "speech" and info["speech_model"] == model and info["frames"] == 60
    assert info["audio"] and "audio_sha256" not in info and "audio_source" not in info  # the samples are the key
    beside = motion_task.read_framing(staged)
    assert beside["audio_sha256"] == hashlib.sha256(voice.read_bytes()).hexdigest()
    assert beside["audio_source"] == str(voice)
    with av.open(str(staged / motion_task.AUDIO)) as c:
        assert abs(c.streams.audio[0].duration * c.streams.audio[0].time_base - 2.0) < 1 / 30
    elsewhere = tmp_path / "copy of the voice.wav"
    shutil.copyfile(voice, elsewhere)
    assert stage_motion(ws, None, ID, str(elsewhere), None)[0] == key  # type: ignore[arg-type]  # content, not path
    # another seed, other gestures under another key; the same speech as m4a: the same length
    assert stage_motion(ws, None, ID, str(voice), None, seed=7)[0] != key  # type: ignore[arg-type]
    m4a = encode_aac(voice, tmp_path / "voice.m4a")
    _, as_m4a = stage_motion(ws, None, ID, str(m4a), None)  # type: ignore[arg-type]
    assert abs(motion_task.read_info(as_m4a)["frames"] - 60) <= 1
    # silence is not an error: the anchor at rest, the mouth less open than while it speaks (1.5 s of fitted training
    # frames make a noisy reference)
    quiet = tmp_path / "quiet.wav"
    aud.write_wav(quiet, np.zeros(sp.SAMPLE_RATE, np.float32))
    _, rest = stage_motion(ws, None, ID, str(quiet), None)  # type: ignore[arg-type]
    _, blocks = smplx_table.read(rest / smplx_table.TABLE)
    model = sp.SpeechModel.load(artifact_dir(ws, "speech", ID))
    speaking = sp.jaw_angle(model.blocks["jaw_pose"])[model.feats.voiced]
    assert len(blocks["transl"]) == 30
    assert sp.jaw_angle(blocks["jaw_pose"]).max() < speaking.mean()


def test_anchor_speak_renders_the_audio_and_a_new_speech_model_makes_it_stale(ws: Workspace, voice: Path,
                                                                          tmp_path: Path) -> None:
    from core.lineage import trace
    from flows.versions import renders

    out = tmp_path / "speak.mp4"
    spoken = tmp_path / "spoken.wav"  # the voice's first second: rendered twice below (here, then once stale)
    aud.write_wav(spoken, aud.decode(voice)[:sp.SAMPLE_RATE])
    done = cli(ws.root, "speak", ID, "--audio", str(spoken), "--out", str(out))
    assert done.returncode == 0, done.stderr
    # the command's own progress and summary only: Prefect's lines go to the run's log file
    said = done.stdout + done.stderr
    assert "Finished in state" not in said and "| INFO" not in said and "video: " in done.stdout, said
    [log] = sorted((ws.state / "logs").glob("run-*.log"))[-1:]
    assert "Finished in state Completed()" in log.read_text()
    assert len(video_frames(out)) == 30
    with av.open(str(out)) as c:
        assert len(c.streams.audio) == 1
        seconds = sum(f.samples for f in c.decode(c.streams.audio[0])) / c.streams.audio[0].rate
        assert abs(seconds - 1.0) < 0.05
    model = read_manifest(artifact_dir(ws, "speech", ID))["output_hash"]
    [listed] = [r for r in renders(ws, ID) if r["motion"].get("kind") == "speech"]
    record = json.loads((ws.root / "data/renders" / listed["subject"] / "assemble/render.json").read_text())
    assert record["motion"]["speech_model"] == model and record["motion"]["audio_source"] == str(spoken)
    assert not listed["stale"] and listed["motion"]["speech_model"] == model
    [step] = [s for s in trace(ws, out) if s["stage"] == "motion"]
    assert step["speech_model"] == model and step["audio_source"] == str(spoken)
    shown = anchor(ws.root, "status", ID)
    assert shown.returncode == 0 and f"speech: {listed['subject']}: audio {spoken}" in shown.stdout, shown.stdout
    assert any(s["stage"] == "speech" and s["output_hash"] == model for s in trace(ws, out))

    set_param(ws.root, "speech", "seam_penalty", 2.0)  # a new speech model: the speech render goes stale
    runner.execute(ws, "speech", ID)
    [stale] = [r for r in renders(ws, ID) if r["subject"] == listed["subject"]]
    assert stale["stale"] and any(w.startswith("speech model ") for w in stale["why"])
    redo = anchor(ws.root, "rerender", ID)
    assert redo.returncode == 0, redo.stderr
    after = {r["subject"]: r for r in renders(ws, ID)}
    assert after[listed["subject"]]["superseded_by"] != listed["subject"] and not after[listed["subject"]]["stale"]
    new = after[after[listed["subject"]]["superseded_by"]]
    assert not new["stale"] and new["motion"]["speech_model"] != model
    # a changed audio file makes it stale too
    aud.write_wav(spoken, aud.decode(shared_video("anchor_seated_hevc.mp4"))[9 * sp.SAMPLE_RATE: 11 * sp.SAMPLE_RATE])
    [changed] = [r for r in renders(ws, ID) if r["subject"] == new["subject"]]
    assert changed["stale"] and changed["why"] == ["audio spoken.wav changed"]


def test_bad_speech_input_is_one_line_and_writes_nothing(ws: Workspace, voice: Path, tmp_path: Path) -> None:
    out = tmp_path / "never.mp4"
    text = tmp_path / "script.mp3"
    text.write_text("Good evening, here is the news.\n")
    empty = tmp_path / "empty.wav"
    aud.write_wav(empty, np.zeros(0, np.float32))
    renders_before = sorted((ws.data / "renders").rglob("*")) if (ws.data / "renders").exists() else []
    for bad, says in ((text, "not an audio or video file"), (empty, "the audio is empty")):
        done = anchor(ws.root, "speak", ID, "--audio", str(bad), "--out", str(out))
        assert done.returncode != 0 and says in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert not out.exists()
    by_render = anchor(ws.root, "render", ID, "--motion", str(empty))
    assert by_render.returncode != 0 and "the audio is empty" in by_render.stderr

    # an identity onboarded from a silent video has no speech model, and says why
    mute = "mute"
    clip = cut_clip(shared_video("anchor_seated_hevc.mp4"), tmp_path / "mute.mp4", 40, 360, 640)
    ws.register_identity(mute)
    runner.execute(ws, "source", mute, external=clip)
    for stage in ("ingest", "keypoints", "smplx_fit", "speech"):
        runner.execute(ws, stage, mute)
    model_dir = artifact_dir(ws, "speech", mute)
    assert read_manifest(model_dir)["summary"] == {"audio": False} and not speech_task.has_model(model_dir)
    done = anchor(ws.root, "speak", mute, "--audio", str(voice), "--out", str(out))
    assert done.returncode != 0 and "onboarding video had no audio track" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not out.exists()
    with pytest.raises(InputError, match="no speech model"):
        from flows.render import stage_speech

        stage_speech(ws, mute, voice)
    assert (sorted((ws.data / "renders").rglob("*")) if (ws.data / "renders").exists() else []) == renders_before


def test_speech_benchmark_compares_the_held_out_audio_driven_motion_with_the_real_one(
        onboarded: Path, short_video: Path, tmp_path: Path) -> None:
    """`anchor bench speak`'s measuring code on the onboarded template (every stage it runs is cached there)."""
    from cli.benchmarks import SPEAK_KEYS, speak

    root = copy_workspace(onboarded, tmp_path / "ws")
    result = speak(short_video, root, name=ID)
    assert set(SPEAK_KEYS) <= set(result) and result["frames"] == 19 and result["training_frames"] == 44
    assert result["mouth_inputs"] == "loudness ±8 frames, alpha 1" and result["jaw_corr_cv"] is None
    assert result["speech_model"] == read_manifest(artifact_dir(Workspace(root), "speech", ID))["output_hash"]
    # each figure is what its definition gives on the held-out part, recomputed here from the models' primitives:
    # the generated motion against the real one (not the real against itself, not the training part)
    w = Workspace(root)
    fit, ingest, model_dir = (artifact_dir(w, s, ID) for s in ("smplx_fit", "ingest", "speech"))
    real, audio = speech_task.held_out_audio(ingest, fit)
    seed = registry.params(w).render_body.seed
    gen, _ = speech_task.synthesise(model_dir, audio, seed)
    gen = {k: v[:19] for k, v in gen.items()}
    joints = motion_task.reference(fit, runner.body_model_path(w)).joints
    upper_gen, upper_real = (joints(b)[:, sp.UPPER_BODY] for b in (gen, real))
    jaw_gen, jaw_real = sp.jaw_angle(gen["jaw_pose"]), sp.jaw_angle(real["jaw_pose"])
    assert result["jaw_corr"] == round(float(np.corrcoef(jaw_gen, jaw_real)[0, 1]), 3) != 1.0
    onsets = sp.onset_times(audio)
    assert result["audio_beats"] == len(onsets) > 0
    assert result["beat_consistency"] == round(sp.beat_consistency(onsets, upper_gen), 3)
    assert result["beat_consistency_real"] == round(sp.beat_consistency(onsets, upper_real), 3)
    assert not np.allclose(upper_gen, upper_real, atol=1e-3)  # two motions: the generated is not the real one
    # 19 frames cannot be shifted by a second either way: no percentile, and no gesture-timing verdict
    assert result["beat_percentile"] is None and result["beat_percentile_real"] is None
    assert result["beat_judgeable"] is False
    assert result["synth_s_per_audio_min"] > 0
