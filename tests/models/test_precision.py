"""Training precision follows the claimed device's hardware: bf16 only where it is native."""

from __future__ import annotations

import pytest
import torch

from models import bench, precision
from tasks import training


@pytest.fixture
def capability(monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple[int, int]]:
    """Faked NVIDIA GPUs: each index's compute capability, read for the device asked about (not the current one)."""
    gpus: dict[str, tuple[int, int]] = {}
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: gpus[str(torch.device(device))])
    return gpus


def test_bf16_only_where_native_else_fp16_with_a_scaler(capability: dict[str, tuple[int, int]]) -> None:
    capability.update({"cuda:0": (8, 0), "cuda:1": (7, 5)})  # an A100 beside a T4
    a100, t4 = torch.device("cuda:0"), torch.device("cuda:1")
    assert precision.training_precision("bf16", a100) == "bf16"
    assert precision.training_precision("bf16", t4) == "fp16"
    assert precision.training_precision("auto", t4) == "fp16"
    assert precision.training_precision("auto", a100) == "bf16"
    assert precision.training_precision("fp16", a100) == "fp16"
    assert precision.training_precision("no", a100) == "no"
    for asked in ("bf16", "fp16", "auto"):
        assert precision.training_precision(asked, torch.device("cpu")) == "no"
    with pytest.raises(ValueError, match="fp8"):
        precision.training_precision("fp8", a100)


def test_only_fp16_scales_its_loss() -> None:
    assert not precision.grad_scaler("fp16", torch.device("cpu")).is_enabled()  # nothing to scale on a CPU
    for which in ("bf16", "no"):
        assert not precision.grad_scaler(which, torch.device("cuda")).is_enabled()


def test_training_and_its_bench_resolve_precision_with_the_same_function() -> None:
    assert training.training_precision is bench.training_precision is precision.training_precision
    assert training.grad_scaler is bench.grad_scaler is precision.grad_scaler
