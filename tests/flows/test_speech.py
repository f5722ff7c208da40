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
from tasks import runner, smplx_table
from tasks.registry import artifact_dir
from tasks.stages import motion as motion_task
from tasks.stages import speech as speech_task
from tests.conftest import (
    ONBOARDED_ID,
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


def test_onboarding_learns_the_speech_model_from_the_training_clips_only(ws: Workspace) -> None:
    m = read_manifest(artifact_dir(ws, "speech", ID))
    meta = json.loads((artifact_dir(ws, "ingest", ID) / "meta.json").read_text())
    train = sum(c["frames"] for c in meta["clips"] if c["split"] == "train")
    assert m["summary"]["audio"] is True and m["summary"]["frames"] == train == 44
    model = sp.SpeechModel.load(artifact_dir(ws, "speech", ID))
    assert model.config["segment"] == 12 and len(model.runs) == train and model.feats.frames == train
    _, fit = smplx_table.read(artifact_dir(ws, "smplx_fit", ID) / smplx_table.TABLE)
    assert np.array_equal(model.blocks["body_pose"], fit["body_pose"][:train])  # its own fitted frames, in order


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
    spoken = tmp_path / "spoken.wav"
    shutil.copyfile(voice, spoken)
    done = cli(ws.root, "speak", ID, "--audio", str(spoken), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert len(video_frames(out)) == 60
    with av.open(str(out)) as c:
        assert len(c.streams.audio) == 1
        seconds = sum(f.samples for f in c.decode(c.streams.audio[0])) / c.streams.audio[0].rate
        assert abs(seconds - 2.0) < 0.05
    model = read_manifest(artifact_dir(ws, "speech", ID))["output_hash"]
    [listed] = [r for r in renders(ws, ID) if r["motion"].get("kind") == "speech"]
    record = json.loads((ws.root / "data/renders" / listed["subject"] / "assemble/render.json").read_text())
    assert record["motion"]["speech_model"] == model and record["motion"]["audio_source"] == str(spoken)
    assert not listed["stale"] and listed["motion"]["speech_model"] == model
    [step] = [s for s in trace(ws, out) if s["stage"] == "motion"]
    assert step["speech_model"] == model and step["audio_source"] == str(spoken)
    shown = cli(ws.root, "status", ID)
    assert shown.returncode == 0 and f"speech: {listed['subject']}: audio {spoken}" in shown.stdout, shown.stdout
    assert any(s["stage"] == "speech" and s["output_hash"] == model for s in trace(ws, out))

    set_param(ws.root, "speech", "seam_penalty", 2.0)  # a new speech model: the speech render goes stale
    runner.execute(ws, "speech", ID)
    [stale] = [r for r in renders(ws, ID) if r["subject"] == listed["subject"]]
    assert stale["stale"] and any(w.startswith("speech model ") for w in stale["why"])
    redo = cli(ws.root, "rerender", ID)
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
        done = cli(ws.root, "speak", ID, "--audio", str(bad), "--out", str(out))
        assert done.returncode != 0 and says in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert not out.exists()
    by_render = cli(ws.root, "render", ID, "--motion", str(empty))
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
    done = cli(ws.root, "speak", mute, "--audio", str(voice), "--out", str(out))
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
    assert -1 <= result["jaw_corr"] <= 1 and -1 <= result["jaw_corr_loudness"] <= 1
    for key in ("beat_consistency", "beat_consistency_real", "beat_consistency_shuffled"):
        assert 0 <= result[key] <= 1
    assert result["synth_s_per_audio_min"] > 0
    assert result["speech_model"] == read_manifest(artifact_dir(Workspace(root), "speech", ID))["output_hash"]
