"""report: one self-contained HTML page per identity that a person opens to judge the model, and its PNG contact sheet.

It reads the identity's artifacts and the evaluation render (the identity's own held-out clips rendered by its
finetuned model, then scored by the metrics stage). Everything is embedded (images as data URIs, the plot as SVG),
so the page opens from a mail attachment with no network. Beside it, what DVC reads: metrics.json (numbers only,
`dvc metrics show/diff`), plots/ (one CSV per series, `dvc plots show`) and the contact sheet (an image plot).
Time per stage comes from the manifests of the artifacts shown: the run that produced each of them (the run
ledger is not an input, so it never makes a cached report stale).
"""

from __future__ import annotations

import base64
import csv
import io
import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
from jinja2 import Environment
from pydantic import Field

from core.artifacts import read_manifest
from core.progress import Progress
from core.section import Section
from core.stage import Stage
from tasks import smplx_table
from tasks.frames import clip_frame_paths, frame_name, read_meta, read_rgb, write_png
from tasks.stages import face, hands, keypoints, metrics, motion, render_body, render_mesh, speech
from tasks.train_params import TRAIN_LOG

HTML = "report.html"
SHEET = "contact_sheet.png"
METRICS = "metrics.json"
PLOTS = "plots"


class ReportParams(Section):
    """The per-identity report (data/reports/<identity>/): what a person opens after onboarding and training."""

    frames_per_clip: int = Field(3, ge=1, le=12, description="sample frames shown per held-out clip in the grid")
    thumbnail: int = Field(192, ge=64, le=512, description="side of each image in the grid and contact sheet, px")


def describe(s: dict[str, Any]) -> str:
    shown = [f"{k} {v:.4g}" if isinstance(v, int | float) else f"{k} not computed"
             for k, v in s.get("metrics", {}).items()]
    return f"held-out {s.get('frames')} frames: " + ", ".join(shown)


STAGE = Stage(
    "report", flow="evaluate",
    inputs=("source", "ingest", "keypoints", "matting", "smplx_fit", "perturb", "render_mesh", "speech", "pretrain",
            "finetune"),
    params=ReportParams, external="evaluation", body_model=True,
    reads=("models", "render_mesh", "render_body", "face", "hands", "assemble", "metrics"), home="reports",
    command="anchor evaluate {item}", dvc_outs=(HTML, "manifest.json"), dvc_metrics=(METRICS,),
    dvc_plots=(SHEET, PLOTS), describe=describe, outputs=(HTML, SHEET, METRICS, f"{PLOTS}/"),
    description="the identity's HTML report: held-out renders scored, fit, detection, time per stage")
# Paper Table I, "Ours". Their LMD is in pixels at their crop; their detector was OpenPose.
PAPER = {"fid": 35.91, "fvd": 53.38, "lmd_face": 1.45, "lmd_body": 5.14, "lmd_hand": 5.12}
ROWS = {"fid": "FID ↓", "fvd": "FVD ↓", "lmd_face": "LMD face (px) ↓", "lmd_body": "LMD body (px) ↓",
        "lmd_hand": "LMD hand (px) ↓", "flicker": "temporal flicker ↓", "ssim_person": "SSIM in the person ↑",
        "hand_ssim": "SSIM around the hands ↑", "face_ssim": "SSIM around the face ↑",
        "baseline_lmd_body": "baseline, nearest training frame: LMD body (px) ↓",
        "baseline_ssim_person": "baseline, nearest training frame: SSIM in the person ↑",
        "baseline_hand_ssim": "baseline, nearest training frame: SSIM around the hands ↑",
        "baseline_face_ssim": "baseline, nearest training frame: SSIM around the face ↑"}
COLUMNS = ("source", "mesh condition", "generated", "face and hands redone", "nearest training frame")
# the evaluation render's artifacts
RENDER_STAGES = ("motion", "render_body", "face", "hands", "assemble", "follow", "metrics")
FOLLOW = ("follow_lmd_body_pct", "follow_lmd_hand_pct", "hands_found", "follow_mouth_corr")  # its score vs its motion


def _evaluation(root: Path) -> dict[str, Path]:
    dirs = {s: root / s for s in RENDER_STAGES}
    missing = [s for s in ("motion", "render_body", "face", "metrics") if read_manifest(dirs[s]) is None]
    if missing:
        raise FileNotFoundError(f"evaluation render {root} lacks {', '.join(missing)}: run `anchor evaluate NAME`")
    if motion.read_info(dirs["motion"]).get("kind") != "held_out":
        raise ValueError(f"{root} does not render the identity's own held-out clips; the report needs that render")
    return dirs


def samples(test_clips: list[dict[str, Any]], per_clip: int) -> list[tuple[dict[str, Any], int, int]]:
    """(clip, frame in clip, frame in the render) for `per_clip` evenly spaced frames of each held-out clip; the
    render follows the held-out clips in order (tasks.motion.held_out)."""
    out, offset = [], 0
    for clip in test_clips:
        n = int(clip["frames"])
        picks = sorted({round(i * (n - 1) / max(per_clip - 1, 1)) for i in range(per_clip)}) if n > 1 else [0]
        out += [(clip, k, offset + k) for k in picks]
        offset += n
    return out


def _label(img: np.ndarray, text: str) -> np.ndarray:
    bar = np.full((22, img.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, text, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([bar, img])


def contact_sheet(grid: list[tuple[str, list[np.ndarray]]]) -> np.ndarray:
    """Rows of equally sized thumbnails, the column names on top and each row's name above its first image."""
    side = grid[0][1][0].shape[0]
    head = np.concatenate([_label(np.full((0, side, 3), 255, np.uint8), c) for c in COLUMNS[:len(grid[0][1])]], axis=1)
    rows = [np.concatenate([_label(img, name if j == 0 else "") for j, img in enumerate(images)], axis=1)
            for name, images in grid]
    return np.concatenate([head, *rows])


def _nearest(path: Path, side: int) -> np.ndarray:
    """The baseline's frame; grey when the metrics were made before the baseline existed."""
    return read_rgb(path, side) if path.is_file() else np.full((side, side, 3), 200, np.uint8)


def _data_uri(rgb: np.ndarray) -> str:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 88])
    if not ok:
        raise OSError("cannot encode a thumbnail")
    return f"data:image/jpeg;base64,{base64.b64encode(buf.tobytes()).decode()}"


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _series(rows: list[dict[str, str]], column: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(float(r.get("index", r.get("frame", i))), float(r[column])) for i, r in enumerate(rows)
           if r.get(column) not in (None, "")]
    arr = np.asarray(pts, np.float64).reshape(-1, 2)
    return arr[:, 0], arr[:, 1]


def _svg(draw: Callable[[Any], None], height: float) -> str:
    """A full-width plot drawn by `draw(axes)`, as inline SVG that is the same bytes for the same data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with matplotlib.rc_context({"svg.hashsalt": "anchor-report", "svg.fonttype": "none"}):
        fig, ax = plt.subplots(figsize=(9, height), dpi=96)
        draw(ax)
        ax.legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
        plt.close(fig)
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]


def fit_plot_svg(rows: list[dict[str, str]], boundaries: list[tuple[int, str]]) -> str:
    """Reprojection error per frame and part (% of the crop), clip boundaries marked; inline SVG, reproducible."""
    def draw(ax: Any) -> None:
        for part in ("body", "hands", "face"):
            x, y = _series(rows, f"{part}_pct")
            if len(x):
                ax.plot(x, y, lw=0.9, label=part)
        for start, split in boundaries:
            ax.axvline(start, color="#bbb" if split == "train" else "#d55", lw=0.6)
        ax.set_xlabel("frame (all clips in order; red lines start held-out clips)")
        ax.set_ylabel("error, % of crop")

    return _svg(draw, 2.8)


def write_plots(folder: Path, fit_rows: list[dict[str, str]], lmd_rows: list[dict[str, str]]) -> list[str]:
    """One CSV per series (DVC's stage plots take one y each), x = `frame`."""
    folder.mkdir()
    written = []
    for name, rows, column in (("fit_error_body_pct", fit_rows, "body_pct"),
                               ("fit_error_hands_pct", fit_rows, "hands_pct"),
                               ("fit_error_face_pct", fit_rows, "face_pct"),
                               ("lmd_face_px", lmd_rows, "lmd_face_px"),
                               ("lmd_body_px", lmd_rows, "lmd_body_px")):
        x, y = _series(rows, column)
        with open(folder / f"{name}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["frame", column])
            writer.writerows([int(a), round(float(b), 4)] for a, b in zip(x, y, strict=True))
        written.append(name)
    return written


def detection_rates(keypoints_dir: Path) -> dict[str, dict[str, float]]:
    """Share of frames with each part found by MediaPipe on the real frames, per split."""
    table = keypoints.load(keypoints_dir).to_pydict()
    out: dict[str, dict[str, float]] = {}
    for split in ("train", "test", "all"):
        rows = [i for i, s in enumerate(table["split"]) if split in ("all", s)]
        if rows:
            out[split] = {p: round(sum(table[p][i] is not None for i in rows) / len(rows), 4)
                          for p in keypoints.PARTS}
    return out


RENDER_TIMED = ("render_body", "face", "hands", "assemble")  # what a render costs, frames to video
TIMED_SINCE = {"hands"}  # stages a render made before them lacks: counted as no time


def render_fps(ev: dict[str, Path], frames: int) -> float | None:
    """Frames per second of the evaluation render, body + face + hands + assemble, from their manifests' run
    times."""
    seconds = [(read_manifest(ev[s]) or {}).get("duration_s", 0.0 if s in TIMED_SINCE else None)
               for s in RENDER_TIMED if s in ev]
    if len(seconds) != len(RENDER_TIMED) or any(t is None for t in seconds) or not sum(seconds):
        return None
    return round(frames / sum(seconds), 3)


def video_uri(path: Path) -> str | None:
    """An mp4 as a data URI, so the page plays it with nothing beside it."""
    if not path.is_file():
        return None
    return f"data:video/mp4;base64,{base64.b64encode(path.read_bytes()).decode()}"


def stage_times(artifacts: dict[str, Path]) -> list[dict[str, Any]]:
    """For each stage, how long the run that made the artifact shown here took (from its manifest)."""
    out = []
    for stage, path in artifacts.items():
        m = read_manifest(path) or {}
        out.append({"stage": stage, "seconds": m.get("duration_s"), "peak_rss_mb": m.get("peak_rss_mb"),
                    "host": m.get("host"), "started_at": m.get("started_at")})
    return out


def jaw_plot_svg(series: dict[str, np.ndarray]) -> str:
    """Jaw opening over the held-out frames: the real fit, the speech model's and the loudness baseline's."""
    def draw(ax: Any) -> None:
        for key, label, style in (("jaw_real", "real (fitted)", "-"), ("jaw_generated", "speech model", "-"),
                                  ("jaw_loudness", "loudness baseline", ":")):
            ax.plot(np.degrees(series[key]), style, lw=1.0, label=label)
        ax.set_xlabel("held-out frame")
        ax.set_ylabel("jaw opening, degrees")

    return _svg(draw, 2.4)


def speech_section(inputs: dict[str, Path], seed: int, side: int, shown: int = 4) -> dict[str, Any]:
    """The speech model driven by the held-out audio against the real held-out motion: figures, the jaw plot and a
    few frames of both as mesh conditions (what the body model would follow)."""
    if not speech.has_model(inputs["speech"]):
        summary = (read_manifest(inputs["speech"]) or {}).get("summary") or {}
        return {"missing": f"no speech model: {speech.why_no_model(summary)}"}
    held = speech.held_out_audio(inputs["ingest"], inputs["smplx_fit"])
    if held is None:
        return {"missing": "no held-out clips with audio to compare with"}
    real, audio = held
    ref = motion.reference(inputs["smplx_fit"], inputs["body_model"])
    result = speech.compare(inputs["speech"], real, audio, ref.joints, seed)
    n = result["frames"]
    rows = np.unique(np.linspace(0, n - 1, min(shown, n)).round().astype(int))
    res = int(smplx_table.read_identity(inputs["smplx_fit"] / smplx_table.IDENTITY)["camera"]["size"])
    res = min(res, 512)
    real_img = render_mesh.render_frames(inputs["body_model"], inputs["smplx_fit"], real, rows, res)
    gen_img = render_mesh.render_frames(inputs["body_model"], inputs["smplx_fit"], result["generated"], rows, res)
    frames = [{"frame": int(r), "real": _data_uri(cv2.resize(a, (side, side), interpolation=cv2.INTER_AREA)),
               "generated": _data_uri(cv2.resize(b, (side, side), interpolation=cv2.INTER_AREA))}
              for r, a, b in zip(rows, real_img, gen_img, strict=True)]
    figures = {k: v for k, v in result.items() if k not in ("series", "generated")}
    return {"figures": figures, "svg": jaw_plot_svg(result["series"]), "frames": frames}


def _value(row: Any) -> float | None:
    return row.get("value") if isinstance(row, dict) else None


def _note(row: Any) -> str:
    if not isinstance(row, dict):
        return ""
    if row.get("value") is None:
        return row.get("note", "not computed")
    extra = [f"{row['pct']:.2f} % of the crop" if "pct" in row else "",
             f"{row['frames']} frames" if "frames" in row else "", f"{row['clips']} clips" if "clips" in row else "",
             f"{row['dropped_frames']} hand frames left out" if row.get("dropped_frames") else ""]
    return ", ".join(e for e in extra if e)


def run(inputs: dict[str, Path], out: Path, params: ReportParams, progress: Progress, *, evaluation: Path,
        settings: SimpleNamespace) -> dict[str, Any]:
    ev = _evaluation(evaluation)
    meta = read_meta(inputs["ingest"])
    clips = sorted(meta["clips"], key=lambda c: c["start"])
    test_clips = [c for c in clips if c["split"] == "test"]
    info = motion.read_info(ev["motion"])
    n = int(info["frames"])
    scored = json.loads((ev["metrics"] / metrics.RESULT).read_text())
    source_summary = (read_manifest(inputs["source"]) or {}).get("summary", {})
    fine = read_manifest(inputs["finetune"]) or {}
    train_log = json.loads((inputs["finetune"] / "body" / TRAIN_LOG).read_text())
    fit_summary = (read_manifest(inputs["smplx_fit"]) or {}).get("summary", {})

    # the grid: source | mesh condition | generated | face and hands redone | the baseline's copy, a few frames of each
    # held-out clip
    picks = [p for p in samples(test_clips, params.frames_per_clip) if p[2] < n]
    progress.start("report: sample frames", len(picks))
    final = hands.final_frames(ev["render_body"], ev["face"], ev["hands"], n)
    side = params.thumbnail
    grid: list[tuple[str, list[np.ndarray]]] = []
    cells: list[dict[str, Any]] = []
    for clip, k, t in picks:
        png = frame_name(t, "png")
        images = [read_rgb(clip_frame_paths(inputs["ingest"], clip)[k], side),
                  read_rgb(ev["render_body"] / render_body.COND / png, side),
                  read_rgb(ev["render_body"] / render_body.FRAMES / png, side),
                  read_rgb(final[t], side), _nearest(ev["metrics"] / metrics.NEAREST / png, side)]
        name = f"{clip['name']} #{k}"
        grid.append((name, images))
        cells.append({"name": name, "frame": t, "images": [_data_uri(i) for i in images],
                      "face_redone": (ev["face"] / face.FRAMES / png).is_file()})
        progress.advance(1)
    sheet = contact_sheet(grid) if grid else np.full((32, len(COLUMNS) * side, 3), 255, np.uint8)
    write_png(out / SHEET, sheet)

    hands_summary = (read_manifest(ev["hands"]) or {}).get("summary")  # None: a render from before the stage
    fit_rows = _read_csv(inputs["smplx_fit"] / "fit_error.csv")
    lmd_rows = _read_csv(ev["metrics"] / metrics.PER_FRAME)
    write_plots(out / PLOTS, fit_rows, lmd_rows)
    boundaries, index = [], 0
    for clip in clips:
        boundaries.append((index, clip["split"]))
        index += int(clip["frames"])

    times = stage_times({**{s: inputs[s] for s in STAGE.inputs}, **{s: d for s, d in ev.items() if d.is_dir()}})

    real_rates = detection_rates(inputs["keypoints"])
    dvc_metrics: dict[str, Any] = {k: _value(scored.get(k)) for k in ROWS}
    dvc_metrics.update({
        "frames": n,
        "detection_rate": real_rates.get("all", {}),
        "detection_rate_generated": scored.get("detection_rate_generated", {}),
        "hand_rate_ratio": scored.get("hand_rate_ratio"),
        "render_fps": render_fps(ev, n),
        "fit_error_pct": fit_summary.get("error_pct", {}),
        "fit_jitter_ratio": fit_summary.get("jitter_ratio"),
    })
    progress.start("report: speech-driven held-out motion", 1)
    spoken = speech_section(inputs, settings.render_body.seed, side)
    progress.advance(1)
    if "figures" in spoken:
        dvc_metrics["speech"] = {k: spoken["figures"][k] for k in (
            "jaw_corr", "jaw_corr_loudness", "jaw_corr_cv", "beat_consistency", "beat_consistency_real",
            "beat_percentile", "beat_percentile_real", "seam_jerk_ratio")}
    follow = ((read_manifest(ev["follow"]) or {}).get("summary") or {})
    if follow:
        dvc_metrics["follow"] = {k: follow.get(k) for k in FOLLOW}
    (out / METRICS).write_text(json.dumps(dvc_metrics, indent=2, sort_keys=True) + "\n")

    table = [{"name": label, "value": _value(scored.get(key)), "note": _note(scored.get(key)),
              "paper": PAPER.get(key)} for key, label in ROWS.items()]
    page = Environment(autoescape=True).from_string(TEMPLATE).render(
        identity=fine.get("identity", ""), source=source_summary, clips=clips, fps=meta.get("fps", 30),
        resolution=meta.get("resolution"), model_version=(fine.get("output_hash") or "")[:12],
        model_finished=fine.get("finished_at"), code=fine.get("code_version", {}), profile=train_log.get("profile"),
        train_resolution=train_log.get("resolution"), output_resolution=train_log.get("output_resolution"),
        real_rates=real_rates,
        generated_rates=scored.get("detection_rate_generated", {}), fit=fit_summary,
        fit_svg=fit_plot_svg(fit_rows, boundaries), cells=cells, columns=COLUMNS, table=table,
        detector=scored.get("detector"), hand_rule=scored.get("hand_outlier_rule"), frames=n, times=times,
        sampled=scored.get("sampled"),
        framing=((read_manifest(ev["motion"]) or {}).get("summary") or {}).get("framing"),
        face_check=((read_manifest(ev["face"]) or {}).get("summary") or {}).get("face_check"),
        hands_done=hands.describe(hands_summary) if hands_summary else None,
        total_seconds=round(sum(t["seconds"] or 0.0 for t in times), 1), speech=spoken, follow=follow,
        video=video_uri(ev["metrics"] / metrics.SIDE_BY_SIDE), panels=metrics.PANELS,
        hand_ratio=scored.get("hand_rate_ratio"), nn_hand_ratio=scored.get("baseline_hand_rate_ratio"),
        fps_render=dvc_metrics["render_fps"])
    (out / HTML).write_text(page)
    return {"frames": n, "samples": len(cells), "metrics": {k: dvc_metrics[k] for k in ROWS},
            "stages_timed": sum(t["seconds"] is not None for t in times)}


TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ identity }}: Make-Your-Anchor+ report</title>
<style>
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#222}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums}.muted{color:#777}img{display:block}
</style></head><body>
<h1>{{ identity }} — Make-Your-Anchor+ report</h1>
<h2>Summary</h2>
<table>
<tr><th>source</th><td>{{ source.get("original_name", "?") }}
  <span class="muted">sha256 {{ source.get("source_sha256", "")[:16] }}</span></td></tr>
<tr><th>clips</th><td>{{ clips|length }} at {{ fps }} fps, {{ resolution }} px crop:
  {% for c in clips %}{{ c.name }} ({{ c.split }}, {{ c.frames }} frames){% if not loop.last %}, {% endif %}{% endfor %}
</td></tr>
<tr><th>model version</th><td>finetune {{ model_version }} <span class="muted">made {{ model_finished }},
  code {{ code.get("commit", "?")[:12] }}{% if code.get("dirty") %} (uncommitted changes){% endif %}</span></td></tr>
<tr><th>profile</th><td>{{ profile }} (trained at {{ train_resolution }} px{% if output_resolution and
  output_resolution != train_resolution %}, rendered at {{ output_resolution }} px through the learned 2× refiner{%
  endif %})
{% if profile == "tiny" %}<br><b>The tiny profile uses small random-initialised models: its pictures are noise by
design and its scores say nothing about quality.</b>{% elif profile == "cpu" %}<br>The cpu profile learns this
person from scratch on a CPU, with no pretrained weights: judge it against the baseline rows and the last column of
the grid, which copy the nearest training frame.{% endif %}</td></tr>
<tr><th>evaluation</th><td>the identity's own held-out clips ({{ frames }} frames) rendered by this model</td></tr>
{% if framing %}<tr><th>framing</th><td>head or shoulders outside the training frames' framing in
  {{ "%.1f"|format(100 * framing.head_or_shoulders_outside_share) }} % of the frames (worst head
  {{ framing.head.worst_pct }} %, shoulders {{ framing.shoulders.worst_pct }} % of the frame away), hands in
  {{ "%.1f"|format(100 * framing.hands.outside_share) }} %{% if face_check %}; face stage:
  {{ face_check.get("agreed", 0) }} crops agreed with the face the body drew, {{ face_check.get("aligned", 0) }}
  moved onto it, {{ face_check.get("skipped", 0) }} left alone, {{ face_check.get("no_face_found", 0) }} without a
  face found ({{ face_check.get("no_face_redone", 0) }} redone where the identity's skin was, {{
  face_check.get("no_face_left", 0) }} left as the body drew them){% endif %}</td></tr>{% endif %}
{% if hands_done %}<tr><th>hands</th><td>{{ hands_done }}</td></tr>{% endif %}
</table>

<h2>Metrics</h2>
<table><tr><th>metric</th><th>this identity</th><th>paper, Table I (Ours)</th><th>notes</th></tr>
{% for r in table %}<tr><td>{{ r.name }}</td>
<td class="n">{% if r.value is none %}—{% else %}{{ "%.4g"|format(r.value) }}{% endif %}</td>
<td class="n">{% if r.paper is none %}—{% else %}{{ r.paper }}{% endif %}</td><td>{{ r.note }}</td></tr>
{% endfor %}</table>
<p class="muted">{% if sampled %}Scored on {{ sampled }}. {% endif %}Landmarks: {{ detector }}.
Hand outliers: {{ hand_rule }}.
LMD is in pixels at this identity's crop; the paper's at its own crop and with OpenPose, so compare
tendencies, not digits. FID/FVD over one identity's held-out frames are small-sample estimates.</p>
{% if follow %}<p>Against its own motion (as every render is scored, ground truth or not; {{ follow.frames }} frames):
the landmarks MediaPipe finds on the generated frames are {{ follow.follow_lmd_body_pct }} % (body) and
{{ follow.follow_lmd_hand_pct }} % (hands) of the frame side from where the motion's joints project; hands the motion
holds in view are found in {{ follow.hands_found }} of the frames; the mouth opening on the frames correlates
{{ follow.follow_mouth_corr }} with the motion's jaw.</p>{% endif %}

<h2>The held-out clips side by side</h2>
{% if video %}<video controls preload="metadata" style="width:100%" src="{{ video }}"></video>
<p class="muted">{{ panels|join(" | ") }}{% if sampled %} (the scored frames only, without audio){% endif %}.
{% if fps_render %}Rendered at {{ fps_render }} frames/s (body, face and encoding).{% endif %}</p>
{% else %}<p>No side-by-side video (made before the metrics stage wrote one).</p>{% endif %}

<h2>Detection rates (MediaPipe on the real frames)</h2>
<table><tr><th>split</th>{% for p in real_rates.get("all", {}) %}<th>{{ p }}</th>{% endfor %}</tr>
{% for split, rates in real_rates.items() %}<tr><td>{{ split }}</td>
{% for p, v in rates.items() %}<td class="n">{{ "%.1f"|format(100 * v) }} %</td>{% endfor %}</tr>{% endfor %}
{% if generated_rates %}<tr><td>generated (held-out)</td>
{% for p in real_rates.get("all", {}) %}<td class="n">{% if p in generated_rates %}{{ "%.1f"|format(100 *
generated_rates[p]) }} %{% else %}—{% endif %}</td>{% endfor %}</tr>{% endif %}
</table>
{% if hand_ratio is not none %}<p>Hands found in the generated frames over the real ones (the lower hand):
{{ hand_ratio }}{% if nn_hand_ratio is not none %} (nearest training frame: {{ nn_hand_ratio }}){% endif %}.</p>
{% endif %}

<h2>SMPL-X fit</h2>
<p>Median reprojection error: {% for p, v in fit.get("error_pct", {}).items() %}{{ p }}
{% if v is none %}—{% else %}{{ v }} %{% endif %}{% if not loop.last %}, {% endif %}{% endfor %} of the crop;
jitter of the fit {{ fit.get("jitter_fit_px") }} px vs the detections' {{ fit.get("jitter_detections_px") }} px
(ratio {{ fit.get("jitter_ratio") }}).</p>
{{ fit_svg|safe }}

<h2>Sample frames of the held-out clips</h2>
{% if cells %}<table><tr><th></th>{% for c in columns %}<th>{{ c }}</th>{% endfor %}</tr>
{% for cell in cells %}<tr><td>{{ cell.name }}<br><span class="muted">render frame {{ cell.frame }}
{% if not cell.face_redone %}<br>face not redone (hidden or turned away){% endif %}</span></td>
{% for img in cell.images %}<td><img src="{{ img }}" alt="{{ columns[loop.index0] }}"></td>{% endfor %}</tr>
{% endfor %}</table>{% else %}<p>No held-out frames.</p>{% endif %}

<h2>Speech-driven motion (the held-out audio through the speech model)</h2>
{% if speech.missing %}<p>{{ speech.missing }}.</p>{% else %}{% set f = speech.figures %}
<p>The speech model learnt from {{ f.training_frames }} training frames was driven by the audio of the
{{ f.frames }} held-out frames and compared with the motion fitted to them.</p>
<table><tr><th>figure</th><th>value</th><th>what it says</th></tr>
<tr><td>jaw correlation</td><td class="n">{{ f.jaw_corr }}</td><td>per frame, generated vs real jaw opening
  (loudness-only baseline: {{ f.jaw_corr_loudness }}); the mouth reads {{ f.mouth_inputs }}, as cross-validation
  on the training clips chose ({% if f.jaw_corr_cv is not none %}jaw correlation there {{ f.jaw_corr_cv }}{% else
  %}too short to cross-validate: loudness{% endif %})</td></tr>
<tr><td>beat consistency</td><td class="n">{{ f.beat_consistency }}</td><td>audio onsets near a kinematic beat of
  each upper-body joint, BEAT/EMAGE's way (real motion: {{ f.beat_consistency_real }}, real motion shuffled in 1 s
  pieces: {{ f.beat_consistency_shuffled }})</td></tr>
<tr><td>beat percentile</td><td class="n">{{ f.beat_percentile if f.beat_percentile is not none else "—" }}</td>
  <td>where the generated motion's beat consistency falls among the same motion shifted in time (50: chance; real
  motion: {{ f.beat_percentile_real if f.beat_percentile_real is not none else "—" }}).
  {% if not f.beat_judgeable %}<b>This clip cannot judge gesture timing:</b> its real motion is not above its own
  shifts (percentile below 75), so no beat target is claimed on it.{% endif %}</td></tr>
<tr><td>seam jerk</td><td class="n">{{ f.seam_jerk_ratio if f.seam_jerk_ratio is not none else "—" }}</td>
  <td>95th percentile of joint jerk at the {{ f.seams }} seams over the real motion's</td></tr>
</table>
{{ speech.svg|safe }}
<table><tr><th>held-out frame</th>{% for fr in speech.frames %}<th>{{ fr.frame }}</th>{% endfor %}</tr>
<tr><td>real (fitted)</td>{% for fr in speech.frames %}<td><img src="{{ fr.real }}" alt="real"></td>{% endfor %}</tr>
<tr><td>from the speech</td>{% for fr in speech.frames %}<td><img src="{{ fr.generated }}" alt="speech"></td>
{% endfor %}</tr></table>{% endif %}

<h2>Time per stage (the runs that made the artifacts shown)</h2>
<table><tr><th>stage</th><th>seconds</th><th>peak RSS (MB)</th><th>host</th><th>started</th></tr>
{% for t in times %}<tr><td>{{ t.stage }}</td>
<td class="n">{% if t.seconds is none %}—{% else %}{{ "%.1f"|format(t.seconds) }}{% endif %}</td>
<td class="n">{% if t.peak_rss_mb is none %}—{% else %}{{ "%.0f"|format(t.peak_rss_mb) }}{% endif %}</td>
<td>{{ t.host or "" }}</td><td>{{ t.started_at or "" }}</td></tr>
{% endfor %}<tr><th>total</th><td class="n">{{ total_seconds }}</td><td colspan="3"></td></tr></table>
</body></html>
"""
