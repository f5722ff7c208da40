"""anchor bench …: speed, memory and quality figures (never timed tests); the measuring code is in cli/benchmarks.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cli.app import bench_app, out


@bench_app.command("preprocess")
def bench_preprocess(video: Annotated[Path, typer.Option("--video", help="Video to preprocess.")],
                     as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False) -> None:
    """Frames/s and peak memory of ingest, keypoints and matting (keypoints ∥ matting, as the flow runs them)."""
    from cli.benchmarks import preprocess
    from tasks import video as vio

    vio.probe(video)
    result = preprocess(video.resolve())
    if as_json:
        print(json.dumps(result))
        return
    table = Table("stage", "frames/s", "seconds", "peak RSS MB",
                  title=f"preprocess {video.name}: {result['frames']} frames")
    for stage in ("ingest", "keypoints", "matting"):
        table.add_row(stage, f"{result['fps'][stage]:.1f}", f"{result['seconds'][stage]:.1f}",
                      f"{result['peak_rss_mb_by_stage'][stage]:.0f}")
    table.add_row("total", f"{result['fps_total']:.1f}", f"{result['seconds']['total']:.1f}",
                  f"{result['peak_rss_mb']:.0f}")
    out.print(table)


@bench_app.command("smplx")
def bench_smplx(video: Annotated[Path, typer.Option("--video", help="Video to fit and render.")],
                as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False) -> None:
    """SMPL-X fit and mesh-render frames/s with the fit's error and jitter (preprocessing runs first, untimed)."""
    from cli.benchmarks import smplx
    from tasks import video as vio

    vio.probe(video)
    result = smplx(video.resolve())
    if as_json:
        print(json.dumps(result))
        return
    table = Table("figure", "value", title=f"smplx {video.name}: {result['frames']} frames")
    table.add_row("fit frames/s", f"{result['fit_fps']:.1f}")
    table.add_row(f"render frames/s ({result['render']['resolution']} px, all outputs)", f"{result['render_fps']:.1f}")
    for part in ("body", "hands", "face"):
        pct, px = result["err_pct"][part], result["err_px"][part]
        table.add_row(f"median error {part}", "n/a (not detected)" if pct is None else f"{pct:.2f} % ({px:.1f} px)")
    table.add_row("jitter fit / detections", f"{result['jitter_ratio']:.3f}")
    out.print(table)


DEVICE_HELP = "auto (CUDA when present), cpu, cuda or cuda:N"


def _device(name: str) -> str:
    """The device a bench runs on; one this machine lacks is one line and exit 2, before any work."""
    from core.errors import InputError
    from models.bench import pick_device

    try:
        return str(pick_device(name))
    except RuntimeError as e:
        raise InputError(str(e)) from None


def _model_bench(what: str, **kwargs: object) -> dict:
    """models.bench's figures."""
    from models import bench

    return getattr(bench, what)(**kwargs)


def _print(result: dict, as_json: bool, title: str) -> None:
    if as_json:
        print(json.dumps(result))
        return
    table = Table("figure", "value", title=title)
    for key, value in result.items():
        table.add_row(key, str(value))
    out.print(table)


@bench_app.command("train")
def bench_train(profile: Annotated[str, typer.Option("--profile", help="tiny (the real training loop at tiny "
                                                     "size), or sd15-shapes (the full-size architecture with random "
                                                     "weights, no files)")] = "tiny",
                device: Annotated[str, typer.Option("--device", help=DEVICE_HELP)] = "auto",
                resolution: Annotated[int | None, typer.Option("--resolution", min=16, help="Image side (default: "
                                                               "the profile's; sd15-shapes: 512).")] = None,
                steps: Annotated[int, typer.Option("--steps", min=2, help="Training steps per stage.")] = 20,
                frames: Annotated[int, typer.Option("--frames", min=8, help="Frames of the synthetic identity "
                                                    "written to disk and encoded.")] = 48,
                as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False) -> None:
    """Training as the pretrain and finetune stages run it, data side included: the frozen encoders' pass over a
    synthetic identity's frames on disk (then again, finding them stored), and the training loop's steps/s,
    seconds per step and time waiting for data. For the model's step alone on a bare GPU box: `python -m
    models.bench train`."""
    from core.errors import InputError

    if profile not in ("tiny", "sd15-shapes"):
        raise InputError(f"--profile {profile!r}: choose tiny or sd15-shapes")
    from cli.benchmarks import train_loop

    result = train_loop(profile, steps, _device(device), resolution, frames)
    _print(result, as_json, f"bench train --profile {profile}")


@bench_app.command("render")
def bench_render(profile: Annotated[str, typer.Option("--profile", help="tiny or cpu (render_body with random "
                                                      "weights of that profile, three window layouts), or "
                                                      "sd15-shapes (the full-size pipeline, random weights)")] = "tiny",
                 frames: Annotated[int, typer.Option("--frames", min=1, help="Motion length.")] = 300,
                 steps: Annotated[int, typer.Option("--steps", min=1, help="Denoising steps.")] = 20,
                 device: Annotated[str, typer.Option("--device", help=DEVICE_HELP)] = "auto",
                 resolution: Annotated[int, typer.Option("--resolution", min=64, help="sd15-shapes image side.")] = 512,
                 scheduler: Annotated[str | None, typer.Option("--scheduler", help="ddim, dpmpp or unipc (default: "
                                                               "the profile's own; sd15-shapes: ddim)")] = None,
                 max_latent_mb: Annotated[int, typer.Option("--max-latent-mb", min=0, help="execution.max_latent_mb: "
                                                            "latents and sampler history beyond it go to a scratch "
                                                            "file")] = 2048,
                 layout: Annotated[str | None, typer.Option("--layout", help="tiny/cpu: only this window layout "
                                                            "(overlapped, disjoint or framewise)")] = None,
                 as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False) -> None:
    """Render speed and peak memory. tiny/cpu: render_body frames/s, denoiser frame evaluations per step and peak
    RSS for overlapped windows (16/4), disjoint windows and frame by frame, on a synthetic gesturing mannequin.
    sd15-shapes: seconds for --frames frames at 512² with CFG (the same code as `python -m models.bench render`)."""
    from core.errors import InputError

    if profile not in ("tiny", "cpu", "sd15-shapes"):
        raise InputError(f"--profile {profile!r}: choose tiny, cpu or sd15-shapes (sd15 needs trained weights)")
    if scheduler is not None and scheduler not in ("ddim", "dpmpp", "unipc"):
        raise InputError(f"--scheduler {scheduler!r}: choose ddim, dpmpp or unipc")
    layouts = ("overlapped", "disjoint", "framewise")
    if layout is not None and layout not in layouts:
        raise InputError(f"--layout {layout!r}: choose {', '.join(layouts)}")
    on = _device(device)
    if profile == "sd15-shapes":
        result = _model_bench("render", device=on, frames=frames, steps=steps, resolution=resolution,
                              scheduler=scheduler or "ddim", max_latent_mb=max_latent_mb)
        _print(result, as_json, f"bench render --profile sd15-shapes --frames {frames}")
        return
    from cli.benchmarks import render_profile

    result = render_profile(frames, steps, device=on, profile=profile, scheduler=scheduler,
                            max_latent_mb=max_latent_mb, layouts=(layout,) if layout else layouts)
    if as_json:
        print(json.dumps(result))
        return
    table = Table("layout", "frames/s", "frame evals / step", "peak RSS MB", "seconds",
                  title=f"bench render --profile {profile} --frames {frames} ({steps} {result['scheduler']} steps)")
    for mode in layouts:
        if mode in result:
            r = result[mode]
            table.add_row(mode, str(r["fps"]), str(r["frame_evals_per_step"]), str(r["peak_rss_mb"]),
                          str(r["seconds"]))
    out.print(table)
    out.print("paper (Algorithm 1, 300 frames, window 16, overlap 4): 400 frame evaluations per step")


@bench_app.command("quality")
def bench_quality(video: Annotated[Path, typer.Option("--video", help="Video of one person, about a minute.")],
                  profile: Annotated[str, typer.Option("--profile", help="cpu (trains from scratch), or sd15 with "
                                                       "local weights set in a --workspace's params.yaml")] = "cpu",
                  workspace: Annotated[Path | None, typer.Option("--workspace", help="Run here and keep everything "
                                                                 "(report included); default: a temporary "
                                                                 "directory, removed afterwards.")] = None,
                  as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False) -> None:
    """Learns the person from the first 70% of the video and renders the last 30% from its own fitted motion:
    MediaPipe pose/face found in the generated frames, body landmark distance (% of the frame) and SSIM inside the
    person against the real frames, hands found (generated over real), the same for the "nearest training frame"
    baseline, training minutes and render frames per second.
    Runs the `make demo` commands (about 24 minutes on 2 cores for a 20 s clip); their progress goes to stderr."""
    import shutil
    import tempfile

    from cli.benchmarks import QUALITY_KEYS, quality
    from core.errors import InputError
    from tasks import video as vio

    if profile not in ("cpu", "sd15", "tiny"):
        raise InputError(f"--profile {profile!r}: choose cpu, sd15 or tiny")
    vio.probe(video)
    root = workspace.expanduser().resolve() if workspace else Path(tempfile.mkdtemp(prefix="anchor-quality-"))
    try:
        result = quality(video.resolve(), root, profile, log=sys.stderr)
    finally:
        if workspace is None:
            shutil.rmtree(root, ignore_errors=True)
    if as_json:
        print(json.dumps({k: result[k] for k in QUALITY_KEYS}))
        return
    table = Table("figure", "model", "nearest training frame", "target",
                  title=f"bench quality {video.name}: {result['frames']} held-out frames at {result['resolution']} px")
    def num(v: float | None, fmt: str) -> str:
        return "—" if v is None else fmt.format(v)

    table.add_row("pose found", num(result["pose_rate"], "{:.1%}"), num(result["nn_pose_rate"], "{:.1%}"), "≥ 98%")
    table.add_row("face found", num(result["face_rate"], "{:.1%}"), num(result["nn_face_rate"], "{:.1%}"), "≥ 95%")
    table.add_row("LMD body, % of frame", num(result["lmd_body_pct"], "{:.2f}"), num(result["nn_lmd_body_pct"],
                  "{:.2f}"), "≤ 1.5, below baseline")
    table.add_row("SSIM in the person", num(result["ssim_person"], "{:.3f}"), num(result["nn_ssim_person"], "{:.3f}"),
                  "≥ 0.80, above baseline")
    table.add_row("hands found, generated / real (lower hand)", num(result["hand_rate_ratio"], "{:.2f}"),
                  num(result["nn_hand_rate_ratio"], "{:.2f}"), "≥ 0.9 (capped at 1)")
    table.add_row("SSIM around the hands", num(result["hand_ssim"], "{:.3f}"), num(result["nn_hand_ssim"], "{:.3f}"),
                  "above baseline")
    table.add_row("SSIM around the face", num(result["face_ssim"], "{:.3f}"), num(result["nn_face_ssim"], "{:.3f}"),
                  "above baseline")
    table.add_row("training minutes", f"{result['train_min']:.1f}", "", "≤ 20")
    table.add_row("render frames/s (body + face + encoding)", num(result["render_fps"], "{:.2f}"), "", "≥ 2")
    table.add_row("total minutes (onboard → report)", f"{result['total_min']:.1f}", "", "≤ 30")
    out.print(table)
    if workspace is not None:
        out.print(f"report: {result['report']}\nside by side: {result['side_by_side']}", markup=False)


@bench_app.command("memory")
def bench_memory(video: Annotated[Path, typer.Option("--video", help="Video of one person.")],
                 repeat: Annotated[int, typer.Option("--repeat", min=2, max=64, help="How many times the long "
                                                     "video plays the short one.")] = 8,
                 as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False) -> None:
    """Peak memory of every stage whose work grows with the video, on VIDEO and on VIDEO looped --repeat times
    (tiny profile, each stage in a process of its own): memory must not grow with length. Progress on stderr."""
    from cli.benchmarks import memory
    from tasks import video as vio

    vio.probe(video)
    result = memory(video.resolve(), repeat, log=sys.stderr)
    if as_json:
        print(json.dumps(result))
        return
    table = Table("stage", "short MB", f"x{repeat} MB", "ratio", title=f"bench memory {video.name}")
    for stage, row in result["stages"].items():
        table.add_row(stage, f"{row['short_mb']:.0f}", f"{row['long_mb']:.0f}",
                      f"{row['long_mb'] / row['short_mb']:.2f}" if row["short_mb"] else "-")
    out.print(table)
    out.print(f"largest ratio {result['ratio_max']:.2f} ({result['worst_stage']}); target ≤ 1.25", markup=False)


@bench_app.command("speak")
def bench_speak(video: Annotated[Path, typer.Option("--video", help="Video of one person talking, with sound.")],
                workspace: Annotated[Path | None, typer.Option("--workspace", help="Run here and keep everything "
                                                               "(a second run reuses the fit; an existing "
                                                               "workspace keeps its own train/test split); default: "
                                                               "a temporary directory, removed afterwards.")] = None,
                as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False) -> None:
    """Learns the speech model from the first 70% of the video, drives it with the last 30%'s audio and compares with
    the real fitted motion there: jaw correlation (and the loudness-only baseline's), beat consistency as BEAT/EMAGE
    compute it (generated, real, real shuffled in 1 s pieces) and where generated and real fall among 200 time
    shifts of themselves (percentile; 50 is chance), jerk at the seams over the real motion's, synthesis seconds per
    minute of audio. Runs source → ingest → keypoints → smplx_fit → speech (a few minutes for 20 s on 2 cores)."""
    import shutil
    import tempfile

    from cli.benchmarks import SPEAK_KEYS, speak
    from tasks import video as vio

    if not vio.probe(video).has_audio:
        from core.errors import InputError

        raise InputError(f"{video}: no audio track; the speech benchmark needs the person's speech")
    root = workspace.expanduser().resolve() if workspace else Path(tempfile.mkdtemp(prefix="anchor-speak-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        result = speak(video.resolve(), root, log=sys.stderr)
    finally:
        if workspace is None:
            shutil.rmtree(root, ignore_errors=True)
    if as_json:
        print(json.dumps(result))
        return
    table = Table("figure", "value", "target", title=f"bench speak {video.name}: {result['frames']} held-out frames, "
                  f"learnt from {result['training_frames']}")
    judged = "≥ 75" if result["beat_judgeable"] else "none: the real motion is not above its shifts here"
    targets = {"jaw_corr": "≥ 0.6 and ≥ loudness", "jaw_corr_loudness": "", "mouth_inputs": "",
               "jaw_corr_cv": "(on the training clips)", "beat_consistency": "",
               "beat_consistency_real": "", "beat_consistency_shuffled": "", "beat_percentile": judged,
               "beat_percentile_real": "≥ 75 for the clip to judge gesture timing", "beat_judgeable": "",
               "seam_jerk_ratio": "≤ 1.5", "synth_s_per_audio_min": "≤ 10",
               "repeat_share": "(within speech.min_reuse_s)"}
    for key in SPEAK_KEYS:
        table.add_row(key, "—" if result[key] is None else str(result[key]), targets[key])
    out.print(table)


@bench_app.command("cached")
def bench_cached(video: Annotated[Path, typer.Option("--video", help="Video of one person.")],
                 workspace: Annotated[Path | None, typer.Option("--workspace", help="Run here and keep it (a second "
                                                                "bench is cached from the start); default: a "
                                                                "temporary directory, removed afterwards.")] = None,
                 repeat: Annotated[int, typer.Option("--repeat", min=1, help="Cached re-runs to time.")] = 3,
                 as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False) -> None:
    """How quick a cached command is: `anchor onboard` of the video once, then again --repeat times with every stage
    cached, each as a user runs it (a new process, Prefect's home in the workspace). Prints the re-runs' median
    wall seconds (target ≤ 15) and the files of the workspace they wrote (target 0; the ledger aside)."""
    import shutil
    import tempfile

    from cli.benchmarks import cached_onboard
    from tasks import video as vio

    vio.probe(video)
    root = workspace.expanduser().resolve() if workspace else Path(tempfile.mkdtemp(prefix="anchor-cached-"))
    try:
        result = cached_onboard(video.resolve(), root / "ws" if workspace is None else root, log=sys.stderr,
                                repeat=repeat)
    finally:
        if workspace is None:
            shutil.rmtree(root, ignore_errors=True)
    if as_json:
        print(json.dumps(result))
        return
    table = Table("figure", "value", "target", title=f"bench cached {video.name}")
    table.add_row("first onboard, seconds", str(result["first_s"]), "")
    table.add_row("cached re-run, median seconds", str(result["cached_s"]), "≤ 15")
    table.add_row("files rewritten by the re-runs", str(result["files_rewritten"]), "0")
    out.print(table)
