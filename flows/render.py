"""Render one identity driven by one motion: the render flow's stages (motion → render_body → face → hands →
assemble, in the order their inputs give), then copy the video out.

A render's artifacts live under data/renders/<identity>/<motion key>/, where the key is the content hash of the
staged motion (its SMPL-X parameters and audio), so the same identity, motion and params render once: a second run
is all cache hits. `--seed` and `--no-face` are per-run overrides of the params sections, part of the cache key.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from prefect import flow

from core.artifacts import read_manifest
from core.errors import InputError
from core.hashing import sha256_file
from core.progress import notify
from core.workspace import Workspace, check_identity_name, render_subject, split_render_subject
from flows.motion import fit_video
from flows.stage_task import StageRunner
from models.motion_io import FIT_FPS
from models.speech import SAMPLE_RATE
from tasks import registry
from tasks import video as vio
from tasks.audio import decode, is_audio, write_wav
from tasks.runner import body_model_path, hand_basis
from tasks.stages import assemble
from tasks.stages import motion as motion_task
from tasks.stages import speech as speech_task

TEST_SUFFIX = ":test"


def _require(ws: Workspace, stage: str, identity: str, how: str) -> Path:
    art = registry.artifact_dir(ws, stage, identity)
    if not (art / "manifest.json").is_file():
        raise InputError(f"identity {identity!r} has no {stage} yet: {how}")
    return art


def stage_motion(ws: Workspace, stages: StageRunner, identity: str, spec: str, frames: int | None,
                 speech: bool = False, seed: int | None = None) -> tuple[str, Path]:
    """Turn `--motion` into a staged motion directory for `identity`; returns (key, directory). An audio file (or,
    with `speech`, any file's audio) drives the identity's speech model. A motion mostly outside the identity's
    framing is warned about here, before any denoising starts."""
    path = Path(spec).expanduser()
    if speech or (not spec.endswith(TEST_SUFFIX) and is_audio(path)):
        key, staged = stage_speech(ws, identity, path, frames, seed)
    else:
        key, staged = _stage_motion(ws, stages, identity, spec, frames)
    warning = motion_task.framing_warning(motion_task.read_framing(staged).get("framing") or {})
    if warning:
        notify(f"warning: {identity} following {spec}: {warning}")
    return key, staged


def _stage_motion(ws: Workspace, stages: StageRunner, identity: str, spec: str,
                  frames: int | None) -> tuple[str, Path]:
    fit = _require(ws, "smplx_fit", identity, f"run `anchor onboard {identity} --video ...`")
    staging = ws.state / "motions"
    params = registry.params(ws).motion
    ref = motion_task.reference(fit, body_model_path(ws))
    if spec.endswith(TEST_SUFFIX):
        other = check_identity_name(spec[: -len(TEST_SUFFIX)])
        other_fit = _require(ws, "smplx_fit", other, f"run `anchor onboard {other} --video ...`")
        other_ingest = registry.artifact_dir(ws, "ingest", other)
        audio = other_ingest / "audio.wav"
        if other == identity:
            blocks, start = motion_task.held_out(fit, other_ingest)  # its own fit: no retargeting
            info = {"kind": "held_out", "source": spec}
        else:
            _, start = motion_task.held_out(other_fit, other_ingest)
            loaded = motion_task.fit_as_motion(other_fit, other_ingest, split="test")
            blocks, described = motion_task.prepare(loaded, ref, params)
            info = {"kind": "other_identity", "source": spec, **described}
        return motion_task.stage(staging, blocks, info, audio, start, frames, (ref, params))
    path = Path(spec).expanduser()
    if not path.is_file():
        raise InputError(f"--motion {spec}: expected NAME:test, a video file or a motion file; no such file")
    if motion_task.is_video(path):
        info_ = vio.probe(path)
        motion_task.check_length(max(1, round(info_.duration * 30)), 30.0, params.max_frames, path.name)  # unfitted
        loaded, ingest = fit_video(ws, stages, path.resolve())
        blocks, described = motion_task.prepare(loaded, ref, params)
        info = {"kind": "video", "source": str(path.resolve()), **described}
        return motion_task.stage(staging, blocks, info, ingest / "audio.wav", 0.0, frames, (ref, params))
    blocks, described = motion_task.prepare(motion_task.load_file(path, hands=hand_basis(ws)), ref, params)
    info = {"kind": "file", "source": str(path.resolve()), **described}
    return motion_task.stage(staging, blocks, info, None, 0.0, frames, (ref, params))


def speech_model(ws: Workspace, identity: str) -> Path:
    """The identity's speech model, or the one-line reason there is none."""
    model_dir = _require(ws, "speech", identity, f"run `anchor onboard {identity} --video ...` (it learns the "
                         "speech model)")
    if not speech_task.has_model(model_dir):
        summary = (read_manifest(model_dir) or {}).get("summary") or {}
        raise InputError(f"{identity} has no speech model: {speech_task.why_no_model(summary)}")
    return model_dir


def stage_speech(ws: Workspace, identity: str, audio: Path, frames: int | None = None, seed: int | None = None
                 ) -> tuple[str, Path]:
    """Motion for `audio` from the identity's speech model, staged with the audio; the audio's samples, the model's
    version and the seed make the render's key (the audio file's path and hash sit beside it, for lineage)."""
    fit = _require(ws, "smplx_fit", identity, f"run `anchor onboard {identity} --video ...`")
    model_dir = speech_model(ws, identity)
    if not audio.is_file():
        raise InputError(f"{audio}: no such file")
    params = registry.params(ws)
    samples = decode(audio, max_seconds=params.motion.max_frames / FIT_FPS)
    seed = params.render_body.seed if seed is None else seed
    notify(f"{identity}: motion for {len(samples) / SAMPLE_RATE:.1f} s of speech from its speech model (seed {seed})")
    blocks, said = speech_task.synthesise(model_dir, samples, seed)
    said.pop("seam_frames", None)
    info = {"kind": "speech", "source": "speech", "audio_source": str(audio.resolve()),
            "audio_sha256": sha256_file(audio), "speech_model": (read_manifest(model_dir) or {}).get("output_hash"),
            "seed": seed, "speech": said}
    ref = motion_task.reference(fit, body_model_path(ws))
    with tempfile.TemporaryDirectory(prefix="anchor-speech-") as tmp:
        wav = Path(tmp) / motion_task.AUDIO
        write_wav(wav, samples)
        return motion_task.stage(ws.state / "motions", blocks, info, wav, 0.0, frames, (ref, params.motion))


def copy_out(video: Path, out: Path) -> None:
    """Copy beside the target and rename, so a reader never sees half a video."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.copyfile(video, tmp)
    tmp.replace(out)


def render_stages(ws: Workspace, stages: StageRunner, identity: str, motion: str, frames: int | None = None,
                  seed: int | None = None, face: bool | None = None, speech: bool = False
                  ) -> tuple[str, dict[str, Any]]:
    """motion → render_body → face → hands → assemble for `identity` (finetuned); returns (render subject, assemble's
    result). The evaluation flow renders the held-out clips through here too, so both share one cache."""
    _require(ws, "finetune", identity, f"run `anchor pretrain` and `anchor finetune {identity}`")
    key, staged = stage_motion(ws, stages, identity, motion, frames, speech, seed)
    subject = render_subject(identity, key)
    return subject, render_staged(stages, subject, staged, seed, face)


def render_overrides(seed: int | None = None, face: bool | None = None) -> dict[str, dict[str, Any]]:
    """`--seed` for every render stage with a seed, `--no-face` for the face stage: per-run params overrides."""
    out: dict[str, dict[str, Any]] = {}
    for name in registry.in_flow("render"):
        fields = getattr(registry.get(name).params, "model_fields", {})
        if seed is not None and "seed" in fields:
            out.setdefault(name, {})["seed"] = seed
        if face is not None and "enabled" in fields and name == "face":
            out.setdefault(name, {})["enabled"] = face
    return out


def render_staged(stages: StageRunner, subject: str, staged: Path, seed: int | None = None,
                  face: bool | None = None) -> dict[str, Any]:
    """The render stages of one subject from its staged motion; `seed`/`face` override the params for this render
    (None: as params.yaml says). Returns the result of the stage that makes the video."""
    names = registry.in_flow("render")
    results = stages.run_steps(registry.layers(names), subject,
                               external={s: staged for s in names if registry.get(s).external == "motion"},
                               overrides=render_overrides(seed, face))
    return results[assemble.STAGE.name]


def stage_summary(stages: StageRunner, qualified: bool = False) -> dict[str, dict[str, Any]]:
    """Results by stage (`stage[owner]` when `qualified`: a flow that runs stages of several owners)."""
    return {f"{stage}[{ident}]" if qualified else stage: {**res, "cache_hit": stages.cache_hits[(stage, ident)]}
            for (stage, ident), res in stages.results.items()}


@flow(name="render", flow_run_name="render-{identity}", log_prints=False)
def render(workspace: str, identity: str, motion: str, out: str | None = None, frames: int | None = None,
           seed: int | None = None, face: bool = True, speech: bool = False) -> dict[str, Any]:
    ws = Workspace(Path(workspace))
    check_identity_name(identity)
    stages = StageRunner.of_this_run(ws, "render")
    subject, result = render_stages(ws, stages, identity, motion, frames, seed, None if face else False,
                                    speech)
    video = ws.root / result["path"] / assemble.VIDEO
    if out:
        copy_out(video, Path(out))
    return {
        "identity": identity,
        "motion": motion,
        "motion_key": split_render_subject(subject)[1],  # type: ignore[index]
        "run_id": stages.run_id,
        "video": str(Path(out).resolve()) if out else str(video),
        "artifact": result["path"],
        "summary": result["summary"],
        "stages": stage_summary(stages),
    }
