"""models.bench: runs on a box with only the models layer's libraries, refuses a device it lacks in one line, and
reports the figures the GPU benchmarks promise (measured here on tiny stand-ins of the full-size parts)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import bench, parts
from models.overlap import evaluations_per_step
from models.sgdm_pipeline import SGDMPipeline

ROOT = Path(__file__).resolve().parents[2]
ORCHESTRATION = ("prefect", "dvc", "mediapipe", "typer", "rich", "core", "tasks", "flows", "cli")


@pytest.mark.slow  # 8-20 s on a busy machine: `make test`, not the edit loop
def test_imports_nothing_of_the_orchestration_stack() -> None:
    code = ("import sys, json, models.bench; "
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    loaded = set(json.loads(subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                                           check=True).stdout))
    assert {"torch", "diffusers", "models"} <= loaded
    assert not loaded & set(ORCHESTRATION)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("argv", [["train", "--device", "cuda"], ["render", "--device", "cuda:0", "--frames", "4"]])
def test_cuda_on_a_machine_without_it_is_one_line_and_exit_2(argv: list[str],
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m models.bench ARGV` is `raise SystemExit(main(ARGV))`: its entry point, here in this process (a new
    interpreter's imports are the test above's)."""
    with pytest.raises(SystemExit) as ended:
        bench.main(argv)
    out, err = capsys.readouterr()
    assert ended.value.code == 2 and out == ""
    assert err.strip().splitlines() == ["error: device 'cuda" + argv[2][4:] + "': this machine has no CUDA "
                                        f"device (torch {torch.__version__})"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> parts.BasePaths:
    return parts.write_tiny(tmp_path_factory.mktemp("bench") / "base")


def test_render_reports_the_promised_figures(tiny: parts.BasePaths, monkeypatch: pytest.MonkeyPatch) -> None:
    def small(resolution: int) -> SGDMPipeline:
        return SGDMPipeline(parts.new_sgdm(tiny), parts.load_vae(tiny), parts.load_image_encoder(tiny),
                            parts.load_scheduler(tiny), resolution)

    monkeypatch.setattr(bench.shapes, "sd15_shapes_pipeline", small)
    steps: list[int] = []
    result = bench.render("cpu", frames=20, steps=2, resolution=32, scheduler="dpmpp",
                          progress=lambda i, n: steps.append(i))
    assert {"device", "resolution", "frames", "seconds", "frame_evals_per_step", "peak_vram_gb"} <= result.keys()
    assert (result["device"], result["resolution"], result["frames"], result["scheduler"]) == ("cpu", 32, 20, "dpmpp")
    assert result["frame_evals_per_step"] == evaluations_per_step(20, 16, 4) == 32
    assert result["peak_vram_gb"] is None and result["seconds"] > 0 and len(steps) == 2


def test_train_steps_the_optimiser_on_the_spatial_weights_only(tiny: parts.BasePaths,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    built: list = []

    def small(gradient_checkpointing: bool = True):
        model = parts.new_sgdm(tiny)
        built.append((model, {n: p.detach().clone() for n, p in model.named_parameters()}))
        return model

    monkeypatch.setattr(bench.shapes, "sd15_shapes_models", small)
    result = bench.train("cpu", resolution=32, frames=2, steps=1, factor=4)
    assert {"device", "resolution", "step_s", "peak_vram_gb"} <= result.keys()
    assert (result["device"], result["resolution"], result["mixed_precision"]) == ("cpu", 32, "no")
    model, before = built[0]
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved and all(model.get_parameter(n).requires_grad for n in moved)
    assert any("motion_modules" in n for n in before) and not any("motion_modules" in n for n in moved)
    assert 0 < result["trainable_m"] < result["params_m"]
