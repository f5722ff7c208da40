"""The SGDM training loop on the tiny profile: it learns, it resumes exactly, the reference drop is real."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models import parts
from tasks import training

F = 4


class FixedClips:
    """A tiny in-memory dataset: a few clips of latents, CLIP tokens and mesh conditions."""

    def __init__(self, n: int, seed: int = 0, inpaint: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        self.latents = torch.randn(n, 4, F, 16, 16, generator=g) * 0.5
        self.tokens = torch.randn(n, 17, 32, generator=g)
        self.cond = torch.rand(n, 3, F, 64, 64, generator=g)
        self.inpaint = inpaint

    def batch(self, gen: torch.Generator, size: int) -> dict[str, torch.Tensor]:
        idx = torch.randint(0, len(self.latents), (size,), generator=gen)
        out = {"latents": self.latents[idx], "tokens": self.tokens[idx], "cond": self.cond[idx]}
        if self.inpaint:
            mask = torch.zeros(size, 1, F, 16, 16)
            mask[..., 4:12, 4:12] = 1
            out |= {"mask": mask, "masked": out["latents"] * (1 - mask)}
        return out


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> parts.BasePaths:
    return parts.write_tiny(tmp_path_factory.mktemp("tiny-base"))


def _eval_loss(model, data: FixedClips, sched) -> float:
    model.eval()
    with torch.no_grad():
        losses = [float(training.loss_on(model, data.batch(torch.Generator().manual_seed(k), 1), sched,
                                         torch.Generator().manual_seed(100 + k), 0.0, 1.0)) for k in range(8)]
    model.train()
    return sum(losses) / len(losses)


@pytest.mark.slow
def test_loss_falls_on_a_fixed_small_batch(paths: parts.BasePaths, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = parts.new_sgdm(paths)
    sched = parts.load_scheduler(paths)
    data = FixedClips(1)
    before = _eval_loss(model, data, sched)
    result = training.train(model, data, sched, training.TrainConfig(steps=80, lr=2e-3, warmup=10,
                                                                      save_every=1000), tmp_path)
    after = _eval_loss(model, data, sched)
    assert len(result["losses"]) == 80 and result["started_at_step"] == 0
    assert after < 0.5 * before, (before, after)


def test_a_weighted_loss_is_the_weighted_mean_of_the_cells(paths: parts.BasePaths) -> None:
    """The hands' weight is a weighted mean, not a scaled loss: an even weight of any size changes nothing, and
    weight 3 on a region gives exactly (loss over all + 2 × loss over the region) / (1 + 2 × its share)."""
    model = parts.new_sgdm(paths).eval()
    sched = parts.load_scheduler(paths)
    batch = FixedClips(1).batch(torch.Generator().manual_seed(0), 1)
    region = torch.zeros(1, 1, F, 16, 16)
    region[..., 2:6, 8:12] = 1

    def loss(weight: torch.Tensor | None) -> float:
        with torch.no_grad():
            return float(training.loss_on(model, batch | ({} if weight is None else {"weight": weight}), sched,
                                          torch.Generator().manual_seed(1), 0.0, 1.0))

    plain, inside = loss(None), loss(region)
    assert loss(torch.full_like(region, 5.0)) == pytest.approx(plain, rel=1e-5)
    share = float(region.mean())
    assert loss(1 + 2 * region) == pytest.approx((plain + 2 * inside * share) / (1 + 2 * share), rel=1e-5)
    assert inside != pytest.approx(plain, rel=1e-3)


class Killed(Exception):
    pass


def _killed_at(at: int):  # noqa: ANN202
    """A progress callback that stops training when it reports step `at` (a kill after the last save)."""
    def progress(step: int) -> None:
        if step == at:
            raise Killed
    return progress


@pytest.mark.slow  # 8-20 s on a busy machine: `make test`, not the edit loop
@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_killed_run_resumes_to_the_same_weights(paths: parts.BasePaths, tmp_path: Path, ema: float) -> None:
    cfg = training.TrainConfig(steps=6, lr=1e-3, warmup=2, grad_accum=2, save_every=2, ref_drop=0.5, seed=3, ema=ema)
    sched = parts.load_scheduler(paths)

    straight = parts.new_sgdm(paths, seed=1)
    training.train(straight, FixedClips(3), sched, cfg, tmp_path / "straight")

    first = parts.new_sgdm(paths, seed=1)
    with pytest.raises(Killed):
        training.train(first, FixedClips(3), sched, cfg, tmp_path / "resumed", progress=_killed_at(5))
    assert (tmp_path / "resumed" / training.STATE / "step.json").read_text().strip() == '{"step": 4}'
    again = parts.new_sgdm(paths, seed=1)
    result = training.train(again, FixedClips(3), sched, cfg, tmp_path / "resumed")
    assert result["started_at_step"] == 4 and len(result["losses"]) == 2
    a, b = straight.state_dict(), again.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], parts.new_sgdm(paths, seed=1).state_dict()[k]) for k in a)
    if ema:  # the result is the average, not the last weights
        plain = parts.new_sgdm(paths, seed=1)
        training.train(plain, FixedClips(3), sched, training.TrainConfig(**{**cfg.__dict__, "ema": 0.0}),
                       tmp_path / "plain")
        p = plain.state_dict()
        assert any(not torch.equal(a[k], p[k]) for k in a)
        assert all(torch.equal(a[k], p[k]) for k in a if "motion_modules" in k)


def test_a_state_saved_on_another_gpu_resumes_here_to_the_same_weights(paths: parts.BasePaths, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The optimiser state of a run killed on a CUDA machine's second GPU (its storages tagged cuda:1, faked here)
    resumes on this device: loaded to the host first, then moved to where the model is."""
    cfg = training.TrainConfig(steps=4, lr=1e-3, warmup=1, save_every=2, seed=3)
    sched = parts.load_scheduler(paths)
    straight = parts.new_sgdm(paths, seed=1)
    training.train(straight, FixedClips(2), sched, cfg, tmp_path / "straight")

    with pytest.raises(Killed):
        training.train(parts.new_sgdm(paths, seed=1), FixedClips(2), sched, cfg, tmp_path / "resumed",
                       progress=_killed_at(3))
    saved = tmp_path / "resumed" / training.STATE / "optimizer.pt"
    state = torch.load(saved, weights_only=True)
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:1")
        torch.save(state, saved)
    if not torch.cuda.is_available():  # the file really says cuda:1: loaded where it was saved, it cannot be here
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(saved, weights_only=True)
    again = parts.new_sgdm(paths, seed=1)
    result = training.train(again, FixedClips(2), sched, cfg, tmp_path / "resumed")
    assert result["started_at_step"] == 2
    a, b = straight.state_dict(), again.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_reference_drop_zeroes_the_tokens(paths: parts.BasePaths) -> None:
    model = parts.new_sgdm(paths).eval()
    sched = parts.load_scheduler(paths)
    data = FixedClips(1)
    batch = data.batch(torch.Generator().manual_seed(0), 1)
    zeroed = {**batch, "tokens": torch.zeros_like(batch["tokens"])}
    with torch.no_grad():
        dropped = training.loss_on(model, batch, sched, torch.Generator().manual_seed(5), 1.0, 1.0)
        zeros = training.loss_on(model, zeroed, sched, torch.Generator().manual_seed(5), 0.0, 1.0)
        kept = training.loss_on(model, batch, sched, torch.Generator().manual_seed(5), 0.0, 1.0)
    assert torch.equal(dropped, zeros) and not torch.equal(dropped, kept)


@pytest.mark.slow
def test_face_model_learns_with_mask_inputs_and_its_prior_stays_frozen(paths: parts.BasePaths,
                                                                      tmp_path: Path) -> None:
    torch.manual_seed(0)
    face = parts.new_sgdm(paths, face=True)
    sched = parts.load_scheduler(paths)
    data = FixedClips(1, inpaint=True)
    temporal = {n: p.detach().clone() for n, p in face.temporal_parameters().items()}
    before = _eval_loss(face, data, sched)
    result = training.train(face, data, sched, training.TrainConfig(steps=80, lr=2e-3, warmup=10,
                                                                     save_every=1000), tmp_path)
    after = _eval_loss(face, data, sched)
    assert len(result["losses"]) == 80 and after < 0.5 * before, (before, after)
    assert all(torch.equal(temporal[n], p) for n, p in face.temporal_parameters().items())
    # the mask and the masked latent are inputs it reads: other ones give another prediction
    batch = data.batch(torch.Generator().manual_seed(0), 1)
    other = {**batch, "mask": 1 - batch["mask"], "masked": batch["latents"] * batch["mask"]}
    with torch.no_grad():
        a = training.loss_on(face, batch, sched, torch.Generator().manual_seed(7), 0.0, 1.0)
        b = training.loss_on(face, other, sched, torch.Generator().manual_seed(7), 0.0, 1.0)
    assert not torch.equal(a, b)


def test_gpu_options_run_on_cpu_with_small_shapes(paths: parts.BasePaths, tmp_path: Path) -> None:
    """bf16 autocast and gradient checkpointing are GPU options; their code paths must stay correct on a CPU."""
    sched = parts.load_scheduler(paths)
    data = FixedClips(1)
    batch = data.batch(torch.Generator().manual_seed(0), 1)
    plain, ckpt = parts.new_sgdm(paths), parts.new_sgdm(paths)
    ckpt.enable_gradient_checkpointing()
    plain.train()
    ckpt.train()
    losses = [training.loss_on(m, batch, sched, torch.Generator().manual_seed(1), 0.0, 1.0) for m in (plain, ckpt)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[0], losses[1])
    g0 = dict(plain.named_parameters())["controlnet.conv_in.weight"].grad
    g1 = dict(ckpt.named_parameters())["controlnet.conv_in.weight"].grad
    torch.testing.assert_close(g0, g1, atol=1e-6, rtol=1e-4)
    result = training.train(parts.new_sgdm(paths), data, sched,
                            training.TrainConfig(steps=2, lr=1e-3, mixed_precision="bf16",
                                                 gradient_checkpointing=True), tmp_path)
    assert len(result["losses"]) == 2 and all(0 < x < 10 for x in result["losses"])


def test_a_run_reports_what_its_saved_states_cost_and_a_cpu_trains_in_float32(paths: parts.BasePaths,
                                                                              tmp_path: Path) -> None:
    from tasks.train_params import describe

    cfg = training.TrainConfig(steps=5, lr=1e-3, save_every=2, mixed_precision="bf16")
    result = training.train(parts.new_sgdm(paths, seed=1), FixedClips(2), parts.load_scheduler(paths), cfg,
                            tmp_path)
    assert result["saves"] == 3  # after steps 2 and 4, and the last
    size = sum(f.stat().st_size for f in (tmp_path / training.STATE).iterdir())
    assert result["state_mb"] == round(size / 2**20, 1) > 0 and result["save_s"] > 0
    assert result["precision"] == "no"  # bf16 asked, but a CPU has no autocast worth taking
    text = describe({"body": {"steps": 5, "loss_first": 1.0, "loss_last": 0.5, **{k: result[k] for k in (
        "saves", "save_s", "state_mb")}}})
    assert f"3 saved states ({result['save_s']} s, {result['state_mb']} MB each)" in text


def test_losses_read_every_few_steps_are_every_steps_loss(paths: parts.BasePaths, tmp_path: Path) -> None:
    sched = parts.load_scheduler(paths)
    runs = {}
    for every in (1, 3):
        cfg = training.TrainConfig(steps=5, lr=1e-3, save_every=100, seed=2, loss_every=every)
        runs[every] = training.train(parts.new_sgdm(paths, seed=1), FixedClips(2), sched, cfg, tmp_path / str(every))
    assert len(runs[3]["losses"]) == 5 and all(isinstance(v, float) for v in runs[3]["losses"])
    assert runs[3]["losses"] == runs[1]["losses"] and len(set(runs[1]["losses"])) == 5
