"""`anchor bench …`: speed, memory and quality figures, each measured in a throw-away workspace."""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from core.artifacts import read_manifest
from core.monitor import PeakRSS
from core.workspace import Workspace
from tasks import registry, runner
from tasks.registry import default_params_yaml


def preprocess(video: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="anchor-bench-") as tmp:
        ws = Workspace(Path(tmp))
        ws.params_path.write_text(default_params_yaml())
        name = "bench"
        seconds: dict[str, float] = {}
        peaks: dict[str, float] = {}
        runner.execute(ws, "source", name, external=video)
        with PeakRSS() as total_mem:
            t_all = time.perf_counter()
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                frames = runner.execute(ws, "ingest", name).summary["frames"]
                seconds["ingest"] = time.perf_counter() - t0
            peaks["ingest"] = mem.peak_mb

            errors: list[BaseException] = []

            def timed(stage: str) -> None:
                t = time.perf_counter()
                try:
                    runner.execute(ws, stage, name)
                except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                    errors.append(exc)
                seconds[stage] = time.perf_counter() - t

            with PeakRSS() as mem:
                threads = [threading.Thread(target=timed, args=(s,)) for s in ("keypoints", "matting")]
                for th in threads:
                    th.start()
                for th in threads:
                    th.join()
            if errors:
                raise errors[0]
            peaks["keypoints"] = peaks["matting"] = mem.peak_mb  # they run side by side: one shared figure
            seconds["total"] = time.perf_counter() - t_all
    return {
        "frames": frames,
        "fps_total": round(frames / seconds["total"], 2),
        "fps": {s: round(frames / seconds[s], 2) for s in ("ingest", "keypoints", "matting")},
        "peak_rss_mb": total_mem.peak_mb,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "peak_rss_mb_by_stage": peaks,
    }


def smplx(video: Path) -> dict[str, Any]:
    """Fit and render figures on one video: preprocessing runs first, untimed, in a throw-away workspace."""
    with tempfile.TemporaryDirectory(prefix="anchor-bench-") as tmp:
        ws = Workspace(Path(tmp))
        ws.params_path.write_text(default_params_yaml())
        name = "bench"
        for stage in ("source", "ingest", "keypoints"):
            runner.execute(ws, stage, name, external=video if stage == "source" else None)
        runner.body_model_path(ws)  # build the mannequin outside the timings
        t0 = time.perf_counter()
        fit = runner.execute(ws, "smplx_fit", name).summary
        fit_s = time.perf_counter() - t0
        runner.execute(ws, "perturb", name)
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            rendered = runner.execute(ws, "render_mesh", name).summary
            render_s = time.perf_counter() - t0
    images = rendered["frames"] + rendered["perturbed_frames"]
    return {
        "frames": fit["frames"],
        "fit_fps": round(fit["frames"] / fit_s, 2),
        "render_fps": round(images / render_s, 2),
        "err_pct": fit["error_pct"],
        "jitter_ratio": fit["jitter_ratio"],
        "err_px": fit["error_px"],
        "err_p90_pct": fit["error_p90_pct"],
        "jitter_px": {"fit": fit["jitter_fit_px"], "detections": fit["jitter_detections_px"]},
        "render": {"images": images, "resolution": rendered["resolution"], "face_size": rendered["face_size"],
                   "faces_visible": rendered["faces_visible"], "peak_rss_mb": mem.peak_mb},
    }


def _identity_on_disk(root: Path, frames: int, side: int, video_length: int) -> Any:
    """A synthetic identity as the training data reads one: `frames` frames and mesh conditions as image files."""
    import cv2

    from models.bench import _MovingShapes
    from tasks.frames import frame_name
    from tasks.training_data import Identity

    images = _MovingShapes(frames, side, cycle=frames)
    ident = Identity("bench", [], [], [], [(0, frames)], side, starts=list(range(frames - video_length + 1)))
    for kind, paths in (("frames", ident.frame_paths), ("cond", ident.cond_paths)):
        (root / kind).mkdir(parents=True)
        for i in range(frames):
            path = root / kind / frame_name(i, "jpg" if kind == "frames" else "png")
            image = images[i] if kind == "cond" else 255 - images[(i + 7) % frames]
            cv2.imwrite(str(path), image[:, :, ::-1])
            paths.append(path)
    return ident


def train_loop(profile: str = "tiny", steps: int = 20, device: str = "cpu", resolution: int | None = None,
               frames: int = 48) -> dict[str, Any]:
    """The real training loop, data side included, on a synthetic identity of `frames` frames on disk: the frozen
    encoders run over its frames into the store (timed apart; then a second run finds them stored), then pretrain
    (from fresh weights) and finetune (from the saved pretrained model) train the body model for `steps` steps,
    batches decoded from the files, stacked and prefetched as training makes them. tiny: the profile's models and
    sizes; sd15-shapes: the full-size body SGDM, VAE and CLIP encoder with random weights, batch 1 x 4 frames. The
    first step (allocation, kernel choice) is not in `*_step_s`."""
    import torch

    from models import parts, shapes
    from models.sgdm import SGDM
    from tasks import training
    from tasks.base_weights import quiet
    from tasks.stages.finetune import FinetuneParams
    from tasks.stages.pretrain import PretrainParams
    from tasks.training_data import ClipBatches

    quiet()
    dev = torch.device(device)
    out: dict[str, Any] = {"profile": profile, "device": device, "frames_on_disk": frames, "steps": steps}
    with tempfile.TemporaryDirectory(prefix="anchor-bench-") as tmp, PeakRSS() as mem:
        root = Path(tmp)
        if profile == "tiny":
            paths = parts.write_tiny(root / "base")
            vae, encoder, sched = parts.load_vae(paths), parts.load_image_encoder(paths), parts.load_scheduler(paths)
            conditioning = str(PretrainParams().for_profile("tiny")["conditioning"])  # the profile's own SGDM
            fresh = lambda: parts.new_sgdm(paths, conditioning=conditioning)  # noqa: E731
            side, precision, lr_of = resolution or int(PretrainParams().for_profile("tiny")["resolution"]), "no", "tiny"
        else:
            vae, encoder, sched = shapes.sd15_vae(), shapes.clip_vit_l14(), shapes.sd15_scheduler()
            fresh = lambda: shapes.sd15_shapes_models(gradient_checkpointing=True)  # noqa: E731
            conditioning = "branch"  # sd15's
            side, precision, lr_of = resolution or 512, "auto", "sd15"
        vae.eval().to(dev)
        encoder.eval().to(dev)
        section = PretrainParams()
        ident = _identity_on_disk(root / "identity", frames, side, section.video_length)
        for run in ("", "_again"):  # the second finds everything stored
            data = ClipBatches([ident], vae, encoder, section.video_length, 0.0, root / "encoded",
                               reference_frames=conditioning != "branch")
            t0 = time.perf_counter()
            made = data.encode()
            out[f"encode{run}_s"] = round(time.perf_counter() - t0, 3)
            out[f"encoded{run}"] = made
        out["encode_ms_per_frame"] = round(1000 * out["encode_s"] / frames, 1)
        for stage, section in (("pretrain", PretrainParams()), ("finetune", FinetuneParams())):
            model = fresh() if stage == "pretrain" else SGDM.from_pretrained(root / "pretrain")
            model.to(dev)
            cfg = training.TrainConfig(steps=steps, lr=float(section.for_profile(lr_of)["lr"]),
                                       batch_size=section.batch_size, save_every=10 * steps,
                                       mixed_precision=precision, gradient_checkpointing=profile != "tiny")
            stamps: list[float] = []
            t0 = time.perf_counter()
            result = training.train(model, data, sched, cfg, root / f"state-{stage}",
                                    lambda _done, stamps=stamps: stamps.append(time.perf_counter()))
            seconds = time.perf_counter() - t0
            if stage == "pretrain":
                model.save_pretrained(root / "pretrain")
            out[f"{stage}_steps_per_s"] = round(steps / seconds, 2)
            out[f"{stage}_step_s"] = round((t0 + seconds - stamps[0]) / (steps - 1), 4) if steps > 1 else None
            out[f"{stage}_data_wait_ms_per_step"] = round(1000 * result["data_wait_s"] / steps, 2)
            del model
        out["resolution"] = side
        out["video_length"] = section.video_length
        out["precision"] = result["precision"]
        out["conditioning"] = conditioning
    out["peak_rss_mb"] = mem.peak_mb
    return out


def _render_inputs(root: Path, frames: int, profile: str = "tiny") -> dict[str, Path]:
    """A synthetic identity for render_body: the mannequin gesturing for `frames` frames in front of a 512 px
    camera, a fresh SGDM of the profile (where its mesh enters included) saved as its checkpoint, and one rendered
    frame as its reference image."""
    import cv2
    import numpy as np

    from models import body, parts
    from models.raster import MeshRasterizer
    from models.sgdm_pipeline import SGDMPipeline
    from tasks import smplx_table
    from tasks.frames import META, frame_name
    from tasks.stages import motion

    ws = Workspace(root / "ws")
    ws.root.mkdir()
    ws.params_path.write_text(default_params_yaml())
    _set_profile(ws.root, profile)
    body_file = runner.body_model_path(ws)
    paths = runner.base_paths(ws)
    ckpt = root / "finetune" / "body"
    from tasks.stages.pretrain import PretrainParams

    conditioning = str(PretrainParams().for_profile(profile)["conditioning"])
    pipe = SGDMPipeline(parts.new_sgdm(paths, conditioning=conditioning), parts.load_vae(paths),
                        parts.load_image_encoder(paths), parts.load_scheduler(paths), _sgdm_side(profile))
    pipe.save_pretrained(ckpt)
    t = np.arange(frames, dtype=np.float32)
    blocks = {k: np.zeros((frames, w), np.float32) for k, w in smplx_table.BLOCKS.items()}
    blocks["global_orient"][:, 0] = np.pi  # facing the camera
    blocks["transl"][:] = (0.0, 0.3, 2.6)
    blocks["body_pose"][:, 15 * 3 + 2] = -1.2 + 0.3 * np.sin(t / 9)  # left shoulder: arm down, swinging
    blocks["body_pose"][:, 16 * 3 + 2] = 1.2 + 0.3 * np.cos(t / 7)
    (root / "motion").mkdir()
    motion.write(root / "motion" / smplx_table.TABLE, blocks)
    (root / "fit").mkdir()
    smplx_table.write_identity(root / "fit" / smplx_table.IDENTITY,
                               {"betas": [0.0] * 10, "camera": {"focal": 768.0, "size": 512}})
    ingest = root / "ingest"
    (ingest / "frames" / "train_000").mkdir(parents=True)
    (ingest / META).write_text('{"clips": [{"name": "train_000", "split": "train", "frames": 1}]}\n')
    model = body.load(body_file)
    with MeshRasterizer(model.faces.astype(np.int64), 512) as mesh:
        import torch

        with torch.no_grad():
            v = model(**{k: torch.from_numpy(b[:1]) for k, b in blocks.items()}).vertices[0].numpy()
        cv2.imwrite(str(ingest / "frames" / "train_000" / frame_name(0)), mesh.render(v, body.intrinsics(768, 512)))
    return {"motion": root / "motion", "finetune": root / "finetune", "smplx_fit": root / "fit", "ingest": ingest,
            "body_model": body_file, "_ws": ws.root}


def _render_mode(frames: int, window: int, overlap: int, steps: int, device: str, profile: str = "tiny",
                 scheduler: str | None = None, max_latent_mb: int = 2048) -> dict[str, Any]:
    """One render_body run in this (fresh) process: frames/s and this process's peak memory."""
    import torch

    from core.progress import NullProgress
    from models.overlap import evaluations_per_step
    from tasks.devices import Compute
    from tasks.stages import render_body

    with tempfile.TemporaryDirectory(prefix="anchor-bench-") as tmp:
        root = Path(tmp)
        inputs = _render_inputs(root, frames, profile)
        ws = Workspace(inputs.pop("_ws"))
        params = render_body.RenderBodyParams(steps=steps, window=window, overlap=overlap,
                                              **({"scheduler": scheduler} if scheduler else {}))
        (root / "out").mkdir()
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            render_body.run(inputs, root / "out", params, NullProgress(),
                            settings=registry.settings(ws, render_body.STAGE),
                            compute=Compute(torch.device(device), max_latent_mb << 20))
            seconds = time.perf_counter() - t0
    return {"fps": round(frames / seconds, 2), "frame_evals_per_step": evaluations_per_step(frames, window, overlap),
            "peak_rss_mb": mem.peak_mb, "seconds": round(seconds, 1)}


def _sgdm_side(profile: str) -> int:
    """The side the profile's body SGDM renders at, as finetune trains it (half the output with a refiner: cpu's
    128 px, 48 x 32 x 32 latents)."""
    from tasks.stages.finetune import FinetuneParams
    from tasks.train_params import sgdm_side

    return sgdm_side(FinetuneParams().for_profile(profile))


def render_profile(frames: int, steps: int = 20, window: int = 16, overlap: int = 4, device: str = "cpu",
                   profile: str = "tiny", scheduler: str | None = None, max_latent_mb: int = 2048,
                   layouts: tuple[str, ...] = ("overlapped", "disjoint", "framewise")) -> dict[str, Any]:
    """render_body with random weights of `profile` on `device`, in each window layout, each in a fresh process
    so the peaks do not mix. `scheduler`: the profile's own unless given."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from tasks.stages.render_body import RenderBodyParams

    shapes = {"overlapped": (window, overlap), "disjoint": (window, 0), "framewise": (1, 0)}
    scheduler = scheduler or RenderBodyParams().scheduler[profile]
    out: dict[str, Any] = {"profile": profile, "frames": frames, "steps": steps, "window": window,
                           "overlap": overlap, "device": device, "scheduler": scheduler,
                           "max_latent_mb": max_latent_mb}
    for mode in layouts:
        w, o = shapes[mode]
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            out[mode] = pool.submit(_render_mode, frames, w, o, steps, device, profile, scheduler,
                                    max_latent_mb).result()
    return out


QUALITY_KEYS = ("pose_rate", "face_rate", "lmd_body_pct", "ssim_person", "nn_lmd_body_pct", "nn_ssim_person",
                "hand_rate_ratio", "nn_hand_rate_ratio", "hand_ssim", "nn_hand_ssim", "face_ssim", "nn_face_ssim",
                "train_min", "render_fps", "resolution")


def _set_profile(workspace: Path, profile: str | None, **sections: dict[str, Any]) -> None:
    """A bench workspace's params.yaml with another profile and sections updated key by key."""
    import yaml

    params = yaml.safe_load((workspace / "params.yaml").read_text()) or {}
    if profile is not None:
        params["profile"] = profile
    for name, values in sections.items():
        params[name] = {**params.get(name, {}), **values}
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def hold_out_last_30_percent(workspace: Path, profile: str | None = None) -> None:
    """Every second of the video counts as "short", so exactly the last 30% is held out (the split of the quality
    and speak benches)."""
    _set_profile(workspace, profile, ingest={"train_seconds": 1e9, "short_test_fraction": 0.3})


def quality(video: Path, workspace: Path, profile: str = "cpu", log: Any = None) -> dict[str, Any]:
    """What `make demo` does, in `workspace`, with the first 70% of the video for training and the last 30% held
    out: onboard, pretrain, finetune, then the evaluation render of the held-out part, scored against the real
    frames. Each step is the `anchor` command a user runs (its progress goes to `log`); training minutes are the
    wall time of `anchor pretrain` and `anchor finetune` together."""
    import json
    import os
    import subprocess
    import sys

    from tasks.stages import metrics, report

    anchor = [sys.executable, "-m", "cli.main"]
    env = {**os.environ, "ANCHOR_WORKSPACE": str(workspace)}
    name = "bench"

    def run(*args: str) -> float:
        t = time.perf_counter()
        subprocess.run([*anchor, *args], env=env, check=True, stdout=log, stderr=log)
        return time.perf_counter() - t

    run("init", str(workspace))
    hold_out_last_30_percent(workspace, profile)
    t_all = time.perf_counter()
    run("onboard", name, "--video", str(video))
    train_s = run("pretrain") + run("finetune", name, "--no-evaluate")
    run("evaluate", name)
    total_s = time.perf_counter() - t_all
    ws = Workspace(workspace)
    results = ((p.parent.parent, json.loads(p.read_text()))
               for p in sorted((ws.data / "renders" / name).glob("*/metrics/metrics.json")))
    render_dir, scored = next(((d, r) for d, r in results if r.get("motion") == f"{name}:test"), (None, None))
    if scored is None:
        raise FileNotFoundError(f"{workspace}: the evaluation render left no metrics.json")
    log_path = registry.artifact_dir(ws, "finetune", name) / "body" / "train_log.json"
    log = json.loads(log_path.read_text()) if log_path.is_file() else {}
    resolution = log.get("output_resolution", log.get("resolution"))  # of the frames scored

    def value(key: str, field: str = "value") -> float | None:
        row = scored.get(key) or {}
        return row.get(field)

    rates, nn_rates = scored.get("detection_rate_generated", {}), scored.get("baseline_detection_rate", {})
    return {"pose_rate": rates.get("body"), "face_rate": rates.get("face"), "lmd_body_pct": value("lmd_body", "pct"),
            "ssim_person": value("ssim_person"), "nn_lmd_body_pct": value("baseline_lmd_body", "pct"),
            "nn_ssim_person": value("baseline_ssim_person"), "train_min": round(train_s / 60, 2),
            "resolution": resolution, "total_min": round(total_s / 60, 2), "frames": scored.get("frames"),
            "nn_pose_rate": nn_rates.get("body"), "nn_face_rate": nn_rates.get("face"), "profile": profile,
            "hand_rate_ratio": scored.get("hand_rate_ratio"),
            "nn_hand_rate_ratio": scored.get("baseline_hand_rate_ratio"),
            "hand_ssim": value("hand_ssim"), "nn_hand_ssim": value("baseline_hand_ssim"),
            "face_ssim": value("face_ssim"), "nn_face_ssim": value("baseline_face_ssim"),
            "render_fps": report.render_fps({s: render_dir / s for s in report.RENDER_TIMED}, int(scored["frames"])),
            "side_by_side": str(render_dir / "metrics" / metrics.SIDE_BY_SIDE),
            "report": str(ws.data / "reports" / name / "report.html")}


# ------------------------------------------------------------------------------------------------------ memory
_FEW = {"tiny": 10, "cpu": 1, "sd15": 1}
MEMORY_PARAMS = {"profile": "tiny", "ingest": {"resolution": 256}, "pretrain": {"steps": _FEW, "face_steps": _FEW},
                 "finetune": {"steps": _FEW, "face_steps": _FEW}, "render_body": {"steps": 4}, "face": {"steps": 4},
                 "assemble": {"preset": "veryfast"}}


def loop_video(video: Path, out: Path, repeat: int) -> Path:
    """`video` played `repeat` times in a row (picture only, re-encoded): a long video of the same person."""
    from fractions import Fraction

    import av

    from tasks import video as vio

    info = vio.probe(video)
    with av.open(str(out), "w") as dst:
        stream = dst.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = info.width // 2 * 2, info.height // 2 * 2, "yuv420p"
        stream.time_base = Fraction(1, 30)
        stream.options = {"crf": "20", "preset": "veryfast"}
        pts = 0
        for _ in range(repeat):
            for _k, rgb in vio.cfr_frames(video, 30):  # upright, at 30 fps
                img = av.VideoFrame.from_ndarray(rgb[: stream.height, : stream.width], format="rgb24")
                img = img.reformat(format="yuv420p")
                img.pts, img.time_base = pts, Fraction(1, 30)
                pts += 1
                for packet in stream.encode(img):
                    dst.mux(packet)
        for packet in stream.encode():
            dst.mux(packet)
    return out


def _stage_in_fresh_process(root: str, stage: str, owner: str, external: str | None) -> float:
    """One stage in this (fresh) process; its peak RSS (this process and the workers it starts)."""
    from tasks import runner as stage_runner

    result = stage_runner.execute(Workspace(Path(root)), stage, owner, external=Path(external) if external else None)
    return result.peak_rss_mb


def _peaks(video: Path, root: Path, log: Any) -> dict[str, float]:
    """Every stage whose cost grows with the video's length, each in a process of its own, on one workspace."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import yaml

    from core.workspace import SHARED, render_subject
    from tasks.stages import motion

    root.mkdir(parents=True)
    ws = Workspace(root)
    ws.params_path.write_text(default_params_yaml())
    params = yaml.safe_load(ws.params_path.read_text())
    for section, values in MEMORY_PARAMS.items():
        if isinstance(values, dict):
            params[section].update(values)
        else:
            params[section] = values
    ws.params_path.write_text(yaml.safe_dump(params))
    name = "bench"
    ws.register_identity(name)
    peaks: dict[str, float] = {}
    ctx = multiprocessing.get_context("spawn")

    def run(stage: str, owner: str, external: Path | None = None) -> None:
        with ProcessPoolExecutor(1, mp_context=ctx) as pool:
            peaks[stage] = pool.submit(_stage_in_fresh_process, str(root), stage, owner,
                                       str(external) if external else None).result()
        print(f"memory: {video.name}: {stage} {peaks[stage]:.0f} MB", file=log, flush=True)

    run("source", name, video)
    for stage in ("ingest", "keypoints", "matting", "smplx_fit", "perturb", "render_mesh"):
        run(stage, name)
    run("pretrain", SHARED)
    run("finetune", name)
    fit, ingest = registry.artifact_dir(ws, "smplx_fit", name), registry.artifact_dir(ws, "ingest", name)
    blocks, start = motion.held_out(fit, ingest)
    key, staged = motion.stage(ws.state / "motions", blocks, {"kind": "held_out", "source": f"{name}:test"},
                               ingest / "audio.wav", start)
    subject = render_subject(name, key)
    run("motion", subject, staged)
    for stage in ("render_body", "face", "hands", "assemble", "metrics"):
        run(stage, subject)
    del peaks["source"], peaks["motion"]  # a copy: constant memory whatever the length
    return peaks


def memory(video: Path, repeat: int, log: Any = None) -> dict[str, Any]:
    """Peak memory per stage on `video` and on `video` looped `repeat` times (the tiny profile: the models' size
    does not grow with the video; what does is what this measures)."""
    with tempfile.TemporaryDirectory(prefix="anchor-bench-memory-") as tmp:
        long_video = loop_video(video, Path(tmp) / f"long{video.suffix or '.mp4'}", repeat)
        short = _peaks(video, Path(tmp) / "short", log)
        long = _peaks(long_video, Path(tmp) / "long", log)
    stages = {s: {"short_mb": round(short[s], 1), "long_mb": round(long[s], 1)} for s in short}
    ratios = {s: long[s] / short[s] for s in short if short[s] > 0}
    return {"video": video.name, "repeat": repeat, "stages": stages,
            "ratio_max": round(max(ratios.values()), 3), "worst_stage": max(ratios, key=ratios.get)}


# ------------------------------------------------------------------------------------------------------- speak
SPEAK_KEYS = ("jaw_corr", "jaw_corr_loudness", "mouth_inputs", "jaw_corr_cv", "beat_consistency",
              "beat_consistency_real", "beat_consistency_shuffled", "beat_percentile", "beat_percentile_real",
              "beat_judgeable", "seam_jerk_ratio", "synth_s_per_audio_min", "repeat_share")


def speak(video: Path, workspace: Path, log: Any = None, name: str = "bench") -> dict[str, Any]:
    """Learn the speech model from the first 70% of the video (the split of `bench quality`), drive it with the last
    30%'s audio, and compare with the real fitted motion of that part (tasks.stages.speech.compare). Only the stages
    the speech model needs run (source → ingest → keypoints → smplx_fit → speech), each as `anchor stage run`;
    synthesis time is measured on the held-out audio looped to one minute, after a warm-up (librosa compiles once)."""
    import os
    import subprocess
    import sys

    import numpy as np

    from models import speech as sp
    from tasks.runner import body_model_path
    from tasks.stages import motion as motion_task
    from tasks.stages import speech as speech_task

    anchor = [sys.executable, "-m", "cli.main"]
    env = {**os.environ, "ANCHOR_WORKSPACE": str(workspace)}
    if not (workspace / "params.yaml").is_file():  # an existing workspace keeps its own split (its fit is reused)
        subprocess.run([*anchor, "init", str(workspace)], env=env, check=True, stdout=log, stderr=log)
        hold_out_last_30_percent(workspace)
    for stage in ("source", "ingest", "keypoints", "smplx_fit", "speech"):
        extra = ["--video", str(video)] if stage == "source" else []
        subprocess.run([*anchor, "stage", "run", stage, name, *extra], env=env, check=True, stdout=log, stderr=log)
    ws = Workspace(workspace)
    fit, ingest, model_dir = (registry.artifact_dir(ws, s, name) for s in ("smplx_fit", "ingest", "speech"))
    held = speech_task.held_out_audio(ingest, fit)
    if not speech_task.has_model(model_dir) or held is None:
        raise RuntimeError(f"{video}: no speech model or no held-out audio (the video has no audio track)")
    real, audio = held
    seed = registry.params(ws).render_body.seed
    speech_task.synthesise(model_dir, audio[: sp.SAMPLE_RATE], seed)  # warm-up
    minute = np.tile(audio, int(np.ceil(60 * sp.SAMPLE_RATE / len(audio))))[: 60 * sp.SAMPLE_RATE]
    t = time.perf_counter()
    _, said = speech_task.synthesise(model_dir, minute, seed)
    per_minute = time.perf_counter() - t
    joints = motion_task.reference(fit, body_model_path(ws)).joints
    result = speech_task.compare(model_dir, real, audio, joints, seed)
    return {**{k: v for k, v in result.items() if k not in ("series", "generated")},
            "synth_s_per_audio_min": round(per_minute, 2),
            # of the minute's segments, the share showing frames shown within speech.min_reuse_s (at most half the
            # training material) before
            "repeat_share": round(said["reused_within_min_reuse"] / said["segments"], 3),
            "speech_model": (read_manifest(model_dir) or {}).get("output_hash")}


# ------------------------------------------------------------------------------------------------------ cached
def cached_onboard(video: Path, workspace: Path, log: Any = None, repeat: int = 3,
                   name: str = "bench") -> dict[str, Any]:
    """`anchor onboard` of the video once (untimed unless its stages were all cached already), then `repeat` more
    times as a user types it, each a fresh process with its own Prefect home in the workspace: wall seconds of each
    re-run (the median is the figure) and how many files of the workspace they wrote, the ledger aside."""
    import os
    import statistics
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
    anchor = [sys.executable, "-m", "cli.main", "-w", str(workspace)]
    if not (workspace / "params.yaml").is_file():
        subprocess.run([sys.executable, "-m", "cli.main", "init", str(workspace)], env=env, check=True, stdout=log,
                       stderr=log)
    t0 = time.perf_counter()
    subprocess.run([*anchor, "onboard", name, "--video", str(video)], env=env, check=True, stdout=log, stderr=log)
    first = time.perf_counter() - t0
    ws = Workspace(workspace)

    def stamps() -> dict[str, int]:
        return {str(p): p.stat().st_mtime_ns for p in workspace.rglob("*")
                if p.is_file() and not p.is_relative_to(ws.ledger_dir)}

    before, seconds = stamps(), []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run([*anchor, "onboard", name, "--video", str(video)], env=env, check=True, stdout=log,
                       stderr=log)
        seconds.append(time.perf_counter() - t0)
    after = stamps()
    rewritten = sorted(p for p in after if before.get(p) != after[p])
    return {"video": video.name, "first_s": round(first, 1), "cached_s": round(statistics.median(seconds), 2),
            "cached_runs_s": [round(s, 2) for s in seconds], "files_rewritten": len(rewritten),
            "rewritten": [os.path.relpath(p, workspace) for p in rewritten[:20]]}
