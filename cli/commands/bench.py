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


@bench_app.command("train")
def bench_train(profile: Annotated[str, typer.Option("--profile", help="tiny, or sd15-shapes (the full-size "
                                                     "architecture with random weights: one step, no files)")] = "tiny",
                as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False) -> None:
    """Training speed and peak memory: pretrain and finetune steps/s (tiny), or one full-size step (sd15-shapes)."""
    from core.errors import InputError

    if profile == "tiny":
        from cli.benchmarks import train_tiny

        result = train_tiny()
    elif profile == "sd15-shapes":
        from models.shapes import sd15_shapes_models, time_train_step

        timed = time_train_step(sd15_shapes_models(gradient_checkpointing=True), size=256, frames=4, batch=1)
        result = {"profile": "sd15-shapes", "step_s": round(timed["step_s"], 2), "peak_rss_mb": timed["peak_rss_mb"],
                  "params_m": timed.get("params_m"), "trainable_m": timed.get("trainable_m")}
    else:
        raise InputError(f"--profile {profile!r}: choose tiny or sd15-shapes")
    if as_json:
        print(json.dumps(result))
        return
    table = Table("figure", "value", title=f"bench train --profile {profile}")
    for key, value in result.items():
        table.add_row(key, str(value))
    out.print(table)


@bench_app.command("render")
def bench_render(profile: Annotated[str, typer.Option("--profile", help="tiny (random weights, no files)")] = "tiny",
                 frames: Annotated[int, typer.Option("--frames", min=1, help="Motion length.")] = 300,
                 steps: Annotated[int, typer.Option("--steps", min=1, help="DDIM steps.")] = 20,
                 as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False) -> None:
    """render_body frames/s, denoiser frame evaluations per step and peak memory: overlapped windows (16/4),
    disjoint windows and frame by frame, on a synthetic gesturing mannequin."""
    from core.errors import InputError

    if profile != "tiny":
        raise InputError(f"--profile {profile!r}: only tiny (the others need trained weights)")
    from cli.benchmarks import render_tiny

    result = render_tiny(frames, steps)
    if as_json:
        print(json.dumps(result))
        return
    table = Table("layout", "frames/s", "frame evals / step", "peak RSS MB", "seconds",
                  title=f"bench render --profile tiny --frames {frames} ({steps} steps)")
    for mode in ("overlapped", "disjoint", "framewise"):
        r = result[mode]
        table.add_row(mode, str(r["fps"]), str(r["frame_evals_per_step"]), str(r["peak_rss_mb"]), str(r["seconds"]))
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
    person against the real frames, the same for the "nearest training frame" baseline, and training minutes.
    Runs the `make demo` commands (about 23 minutes on 2 cores for a 20 s clip); their progress goes to stderr."""
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
    table.add_row("training minutes", f"{result['train_min']:.1f}", "", "≤ 20")
    table.add_row("total minutes (onboard → report)", f"{result['total_min']:.1f}", "", "≤ 30")
    out.print(table)
    if workspace is not None:
        out.print(f"report: {result['report']}")
