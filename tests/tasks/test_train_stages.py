"""pretrain and finetune on the tiny profile, on real artifacts: outputs, frozen prior, learning, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from core.artifacts import read_manifest
from core.errors import StageError
from core.hashing import sha256_file
from core.workspace import SHARED, Workspace
from models import parts, pipeline
from models.predictor import Predictor
from models.sgdm import SGDM
from tasks import runner, training
from tasks.registry import artifact_dir
from tasks.stages import render_body
from tasks.training_data import load_identity
from tests.conftest import ONBOARDED_ID, copy_workspace

slow = pytest.mark.slow  # on onboarded or trained identities; the quick checks below are not
ID = ONBOARDED_ID
TRAIN = {"steps": {"tiny": 60, "cpu": 1, "sd15": 1}, "face_steps": {"tiny": 6, "cpu": 1, "sd15": 1},
         "save_every": 20}


def test_pretrain_needs_an_identity(workspace: Path) -> None:
    with pytest.raises(StageError, match="needs at least one onboarded identity"):
        runner.execute(Workspace(workspace), "pretrain", SHARED)


@pytest.fixture(scope="module")
def learned(tmp_path_factory: pytest.TempPathFactory, onboarded: Path) -> Workspace:
    params = {"pretrain": TRAIN, "finetune": {**TRAIN, "steps": {"tiny": 200, "cpu": 1, "sd15": 1}}}
    ws = Workspace(copy_workspace(onboarded, tmp_path_factory.mktemp("train") / "ws", params))
    runner.execute(ws, "pretrain", SHARED)
    runner.execute(ws, "finetune", ID)
    return ws


@slow
def test_checkpoints_and_manifests(learned: Workspace) -> None:
    pre = artifact_dir(learned, "pretrain", SHARED)
    fine = artifact_dir(learned, "finetune", ID)
    assert pre == learned.root / "data/checkpoints/pretrain"
    assert fine == learned.root / "data/checkpoints/identities/demo/finetune"
    for root in (pre, fine):
        for which in ("body", "face"):
            assert (root / which / "unet/diffusion_pytorch_model.safetensors").is_file()
            assert (root / which / "controlnet/config.json").is_file()
    m = read_manifest(fine)
    kinds = {i.get("kind") for i in m["inputs"]}
    assert "base_models" in kinds
    assert any(i.get("stage") == "pretrain" and i.get("identity") == SHARED for i in m["inputs"])
    pm = read_manifest(pre)
    assert pm["summary"]["identities"] == [ID]
    # pretrain encoded the foreground frames, finetune the full ones (latents and reference tokens of each frame)
    for summary in (pm["summary"], m["summary"]):
        assert summary["body"]["encoded"] >= 2 * summary["body"]["samples"] > 0
        assert summary["face"]["encoded"] >= 3 * summary["face"]["samples"] > 0
    assert {i["stage"] for i in pm["inputs"] if "stage" in i} == {"ingest", "matting", "render_mesh"}
    assert json.loads((fine / "face" / "sgdm_config.json").read_text())["inpaint"] is True
    # the tiny profile weighs the hands in the body model's loss (render_mesh's squares), never in the face model's
    body = m["summary"]["body"]
    hands = pq.read_table(artifact_dir(learned, "render_mesh", ID) / "hands.parquet").to_pandas()
    train = hands[hands["clip"].str.startswith("train")]
    assert body["hand_weight"] == 2.0
    assert body["hand_frames"] == int((train["left"].notna() | train["right"].notna()).sum()) > 0
    assert "hand_weight" not in m["summary"]["face"]
    from tasks.train_params import describe

    assert f"hands weighted 2.0× in {body['hand_frames']} frames" in describe(m["summary"])
    # resumable state is dropped once the artifact is complete
    assert not any((learned.state / "scratch").rglob("step.json"))


@slow
def test_losses_fall_and_the_prior_stays_frozen(learned: Workspace) -> None:
    s = read_manifest(artifact_dir(learned, "pretrain", SHARED))["summary"]
    assert s["body"]["loss_last"] < 0.5 * s["body"]["loss_first"]
    paths = runner.base_paths(learned)
    fresh = parts.new_sgdm(paths)
    tuned = SGDM.from_pretrained(artifact_dir(learned, "finetune", ID) / "body")
    t0, t1 = fresh.temporal_parameters(), tuned.temporal_parameters()
    assert t0.keys() == t1.keys() and all(torch.equal(t0[k], t1[k]) for k in t0)
    s0, s1 = fresh.spatial_parameters(), tuned.spatial_parameters()
    assert sum(not torch.equal(s0[k], s1[k]) for k in s0) > 0.9 * len(s0)


@slow
def test_a_body_batch_weighs_the_cells_of_the_identity_s_hands(learned: Workspace, tmp_path: Path) -> None:
    """The weight map of a training batch is the hand weight exactly on the latent cells under render_mesh's hand
    squares of those frames, 1 elsewhere; a render_mesh without hands.parquet (older workspaces) trains evenly."""
    from tasks.training_data import ClipBatches, hand_weights, load_identity

    paths = runner.base_paths(learned)
    vae, enc = parts.load_vae(paths).eval(), parts.load_image_encoder(paths).eval()
    render = artifact_dir(learned, "render_mesh", ID)
    ident = load_identity(ID, artifact_dir(learned, "ingest", ID), render, artifact_dir(learned, "ingest", ID),
                          res=64, video_length=4)
    assert len(ident.hands) == len(ident) and sum(map(len, ident.hands)) > 0
    batch = ClipBatches([ident], vae, enc, 4, 0.0, tmp_path / "enc", hand_weight=3.0).batch(
        torch.Generator().manual_seed(0), 2)
    weight = batch["weight"]
    assert weight.shape == (2, 1, 4, *batch["latents"].shape[-2:])
    assert set(weight.unique().tolist()) <= {1.0, 3.0} and (weight == 3.0).any()
    assert 0 < float((weight == 3.0).float().mean()) < 0.3  # hands are a small part of the frame
    legacy = tmp_path / "render"
    shutil.copytree(render, legacy)
    (legacy / "hands.parquet").unlink()
    old = load_identity(ID, artifact_dir(learned, "ingest", ID), legacy, artifact_dir(learned, "ingest", ID), res=64,
                        video_length=4)
    assert old.hands == [[]] * len(old)
    even = ClipBatches([old], vae, enc, 4, 0.0, tmp_path / "enc", hand_weight=3.0).batch(
        torch.Generator().manual_seed(0), 2)
    assert torch.equal(even["weight"], torch.ones_like(weight))
    # squares as shares of the side map outwards onto whole cells
    grid = hand_weights([[[0.25, 0.5, 0.1]], []], 8, 8, 3.0)
    assert grid.shape == (1, 2, 8, 8) and grid[0, 1].eq(1).all()
    assert (grid[0, 0] == 3).nonzero().tolist() == [[4, 2]]


def _training_batches(ws: Workspace, n: int, store: Path) -> tuple[list[dict[str, torch.Tensor]], object, object]:
    from tasks.training_data import ClipBatches, load_identity

    paths = runner.base_paths(ws)
    vae, enc = parts.load_vae(paths).eval(), parts.load_image_encoder(paths).eval()
    ident = load_identity(ID, artifact_dir(ws, "ingest", ID), artifact_dir(ws, "render_mesh", ID),
                          artifact_dir(ws, "ingest", ID), res=64, video_length=4)
    gen = torch.Generator().manual_seed(0)
    data = ClipBatches([ident], vae, enc, 4, 0.0, store, reference_frames=True)  # tiny trains "both"
    return [data.batch(gen, 1) for _ in range(n)], vae, parts.load_scheduler(paths)


@slow
def test_finetuned_model_generates_training_frames_closer_than_the_pretrained_one(learned: Workspace,
                                                                                tmp_path: Path) -> None:
    """Full generation from noise (20 DDIM steps, guidance 3.5) for a training clip's mesh condition and a
    reference of the same person: the identity's model comes closer to the real frames than the pretrained one,
    which never saw backgrounds. Pixels are compared with the real frames passed through the (random) tiny VAE,
    the best its decoder can show."""
    batches, vae, sched = _training_batches(learned, 3, tmp_path)

    def error(model: SGDM) -> float:
        model.eval()
        errs = []
        for k, batch in enumerate(batches):
            out = pipeline.sample(model, vae, sched, batch["tokens"], batch["cond"], steps=20, guidance=3.5,
                                  control_scale=1.0, generator=torch.Generator().manual_seed(k),
                                  reference=batch["reference"])
            real = pipeline.decode_latents(vae, batch["latents"])
            errs.append(float((out - real).square().mean()))
        return sum(errs) / len(errs)

    pre = error(SGDM.from_pretrained(artifact_dir(learned, "pretrain", SHARED) / "body"))
    fine = error(SGDM.from_pretrained(artifact_dir(learned, "finetune", ID) / "body"))
    assert fine < 0.85 * pre, (fine, pre)


@slow
def test_finetuned_model_restores_a_training_frame_better_than_the_pretrained_one(learned: Workspace,
                                                                                  tmp_path: Path) -> None:
    """The same training frame, condition, reference and noise: the identity's own model recovers the frame from
    a half-noised latent better than the pretrained one (learned on foregrounds only), and both beat the prior."""
    batches, _, sched = _training_batches(learned, 3, tmp_path)
    paths = runner.base_paths(learned)

    def error(model: SGDM) -> float:
        model.eval()
        errs = []
        for k, batch in enumerate(batches):
            noise = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(10 + k))
            t = torch.tensor([400])
            noisy = sched.add_noise(batch["latents"], noise, t)
            alpha = sched.alphas_cumprod[400]
            with torch.no_grad():
                eps = pipeline.predict_noise(model, noisy, t, batch["tokens"], batch["cond"], 1.0, 1.0,
                                             reference=batch["reference"])
            x0 = (noisy - (1 - alpha).sqrt() * eps) / alpha.sqrt()
            errs.append(float((x0 - batch["latents"]).square().mean()))
        return sum(errs) / len(errs)

    fresh = error(parts.new_sgdm(paths))
    pre = error(SGDM.from_pretrained(artifact_dir(learned, "pretrain", SHARED) / "body"))
    fine = error(SGDM.from_pretrained(artifact_dir(learned, "finetune", ID) / "body"))
    assert fine < pre < fresh, (fine, pre, fresh)


@slow
def test_finetune_killed_midway_resumes_from_its_saved_state(learned: Workspace, monkeypatch) -> None:
    params = yaml.safe_load(learned.params_path.read_text())
    params["finetune"]["seed"] = 7  # a new cache key: a new version of the identity's models
    params["finetune"]["steps"]["tiny"] = 60
    learned.params_path.write_text(yaml.safe_dump(params))

    class Stop(Exception):
        pass

    calls = {"n": 0}
    real_train = training.train

    def interrupted(*args, **kwargs):
        progress = kwargs.get("progress") or args[5]

        def tick(done: int) -> None:
            progress(done)
            calls["n"] += 1
            if done == 50:
                raise Stop

        if len(args) > 5:
            args = (*args[:5], tick)
        else:
            kwargs["progress"] = tick
        return real_train(*args, **kwargs)

    monkeypatch.setattr(training, "train", interrupted)
    before = read_manifest(artifact_dir(learned, "finetune", ID))["output_hash"]
    with pytest.raises(Stop):
        runner.execute(learned, "finetune", ID)
    # the old version is untouched and the partial state waits in scratch
    assert read_manifest(artifact_dir(learned, "finetune", ID))["output_hash"] == before
    states = list((learned.state / "scratch" / "finetune" / ID).rglob("step.json"))
    assert [json.loads(p.read_text())["step"] for p in states] == [40]
    monkeypatch.setattr(training, "train", real_train)
    result = runner.execute(learned, "finetune", ID)
    assert result.summary["body"]["resumed_at"] == 40
    # the frames and the frozen encoders are those of the first finetune: their outputs are read, not remade
    assert (result.summary["body"]["encoded"], result.summary["face"]["encoded"]) == (0, 0)
    assert result.output_hash != before
    fine = artifact_dir(learned, "finetune", ID)
    weights = sorted(fine.rglob("*.safetensors"))
    resumed = {p.relative_to(fine): sha256_file(p) for p in weights}
    # the same finetune run again without interruption (the scratch state is gone, the artifact removed so that it
    # is not simply taken again): the same weights, bit for bit
    shutil.rmtree(fine)
    again = runner.execute(learned, "finetune", ID)
    assert again.summary["body"]["resumed_at"] == 0
    assert {p.relative_to(fine): sha256_file(p) for p in weights} == resumed


@slow
@pytest.mark.usefixtures("prefect_harness")
def test_pretrain_flow_reproduces_the_checkpoint_and_records_it_in_dvc(learned: Workspace) -> None:
    import subprocess
    import sys

    from flows.train import pretrain

    before = read_manifest(artifact_dir(learned, "pretrain", SHARED))["output_hash"]
    summary = pretrain(str(learned.root))
    (key, result), = summary["stages"].items()
    assert key == f"pretrain[{SHARED}]" and summary["dvc"] == ["pretrain"]
    assert result["output_hash"] == before  # seeded training on a CPU: the same bytes again
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "pretrain"], cwd=learned.root,
                            capture_output=True, text=True)
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout + status.stderr


def _tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {f"{f.relative_to(checkpoint)}:{k}": v for f in sorted(checkpoint.rglob("*.safetensors"))
            for k, v in load_file(str(f)).items()}


@slow
def test_finetune_starts_from_the_pretrained_weights(learned: Workspace, tmp_path: Path) -> None:
    """With no steps, finetune is the pretrained model itself (a finetune that ignored its start would be the base
    model instead); with steps, it has moved from there."""
    zero = {"steps": {"tiny": 0, "cpu": 0, "sd15": 0}, "face_steps": {"tiny": 0, "cpu": 0, "sd15": 0}}
    ws = Workspace(copy_workspace(learned.root, tmp_path / "ws", {"finetune": zero}))
    runner.execute(ws, "finetune", ID)
    pre, fine = artifact_dir(ws, "pretrain", SHARED), artifact_dir(ws, "finetune", ID)
    for which in ("body", "face"):
        a, b = _tensors(pre / which), _tensors(fine / which)
        assert a.keys() == b.keys() and len(a) > 10
        assert all(torch.equal(a[k], b[k]) for k in a), which
        # and the pretrained weights are not the base ones a finetune ignoring its start would have begun from
        start = parts.new_sgdm(runner.base_paths(ws), face=which == "face").state_dict()
        trained = SGDM.from_pretrained(pre / which).state_dict()
        assert any(not torch.equal(trained[k], start[k]) for k in start), which
    moved = _tensors(artifact_dir(learned, "finetune", ID) / "body")
    assert any(not torch.equal(moved[k], v) for k, v in _tensors(pre / "body").items())


@slow
def test_a_finetune_with_a_refiner_and_a_predictor_renders_twice_its_models_side(learned: Workspace,
                                                                                  tmp_path: Path) -> None:
    """The cascade through the real stages: the body SGDM learns at half the output side, the refiner on the
    identity's frames at the output's, the predictor at the SGDM's; render_body's conditions and frames come out at
    the output's side, sampled from the prediction for the share of the steps its strength asks."""
    from tasks.frames import read_rgb
    from tasks.train_params import describe
    from tests.conftest import held_out, render

    few = {"tiny": 2, "cpu": 1, "sd15": 1}
    ws = Workspace(copy_workspace(learned.root, tmp_path / "ws", {"finetune": {
        "steps": few, "face_steps": few, "refiner_steps": {"tiny": 3, "cpu": 1, "sd15": 0},
        "predictor_steps": {"tiny": 2, "cpu": 1, "sd15": 0}},
        "render_body": {"strength": {"tiny": 0.25, "cpu": 0.5, "sd15": 1.0}}}))
    result = runner.execute(ws, "finetune", ID)
    body = artifact_dir(ws, "finetune", ID) / "body"
    index = json.loads((body / "model_index.json").read_text())
    side = int(yaml.safe_load((ws.root / "params.yaml").read_text())["finetune"]["resolution"]["tiny"])
    assert (index["resolution"], index["output_resolution"]) == (side // 2, side)
    assert (body / "refiner" / "config.json").is_file() and index["refiner"] == ["models.refiner", "Refiner"]
    assert not (artifact_dir(ws, "finetune", ID) / "face" / "refiner").exists()
    assert result.summary["body"]["refiner"]["steps"] == 3 and "refiner" not in result.summary["face"]
    assert "(refiner 3 steps, loss" in describe(result.summary)
    assert (body / "predictor" / "config.json").is_file() and index["predictor"] == ["models.predictor", "Predictor"]
    predictor = Predictor.from_pretrained(body / "predictor")
    assert predictor.config.side == side // 2  # at the SGDM's side, against training frame 0 (finetune's default)
    first = load_identity(ID, artifact_dir(ws, "ingest", ID), artifact_dir(ws, "render_mesh", ID),
                          artifact_dir(ws, "ingest", ID), res=side // 2, video_length=1).frame(0)
    assert torch.allclose(predictor.reference, torch.from_numpy(first).permute(2, 0, 1).float() / 127.5 - 1)
    assert not (artifact_dir(ws, "finetune", ID) / "face" / "predictor").exists()
    assert result.summary["body"]["predictor"]["steps"] == 2 and "predictor" not in result.summary["face"]
    assert "(predictor 2 steps, loss" in describe(result.summary)
    log = json.loads((body / "train_log.json").read_text())
    assert (log["resolution"], log["output_resolution"]) == (side // 2, side)
    blocks, _ = held_out(ws)
    subject = render(ws, {k: v[:5] for k, v in blocks.items()})
    out = artifact_dir(ws, "render_body", subject)
    assert read_rgb(out / "frames" / "000004.png").shape == (side, side, 3)
    assert read_rgb(out / "cond" / "000000.png").shape == (side, side, 3)
    assert sorted(p.name for p in (out / "frames").iterdir()) == [f"{t:06d}.png" for t in range(5)]
    summary = json.loads((out / "manifest.json").read_text())["summary"]
    steps = int(yaml.safe_load((ws.root / "params.yaml").read_text())["render_body"]["steps"]["tiny"])
    assert summary["predictor"] is True and summary["denoising_steps"] == int(steps * 0.25) < steps
    assert f"predicted, then refined in {int(steps * 0.25)} denoising steps" in render_body.describe(summary)


@slow
def test_the_frozen_encoders_run_once_per_frame_and_never_again_on_the_same_frames_and_weights(
        trained: Path, tmp_path: Path) -> None:
    from tasks.training_data import ClipBatches, load_identity

    ws = Workspace(trained)  # read only
    paths = runner.base_paths(ws)
    vae, enc = parts.load_vae(paths).eval(), parts.load_image_encoder(paths).eval()
    encoded: list[int] = []
    real_encode = vae.encode
    vae.encode = lambda x: (encoded.append(x.shape[0]), real_encode(x))[1]  # frames through the VAE
    store = tmp_path / "encoded"

    def batches(data: ClipBatches) -> list[dict[str, torch.Tensor]]:
        return [data.batch(torch.Generator().manual_seed(k), 2) for k in range(6)]

    for face in (False, True):
        ident = load_identity(ID, artifact_dir(ws, "ingest", ID), artifact_dir(ws, "render_mesh", ID),
                              artifact_dir(ws, "ingest", ID), res=64, video_length=4, face=face, face_res=64)
        first_run = ClipBatches([ident], vae, enc, 4, 0.0, store, face=face)
        encoded.clear()
        assert first_run.encode() == first_run.encodings() == (3 if face else 2) * len(ident)
        assert sum(encoded) == (2 if face else 1) * len(ident)  # each frame once (and each masked frame)
        first = batches(first_run)
        assert first[0]["latents"].shape[:3] == (2, 4, 4)  # 2 samples of 4 frames
        assert sum(encoded) == (2 if face else 1) * len(ident)  # batches only read
        # a later run (another process, nothing in memory; one chunk held at a time): read from disk, the same numbers
        later = ClipBatches([ident], vae, enc, 4, 0.0, store, face=face, encoded_bytes=0)
        assert later.encode() == 0
        again = batches(later)
        assert sum(encoded) == (2 if face else 1) * len(ident)
        assert all(torch.equal(a[k], b[k]) for a, b in zip(first, again, strict=True) for k in a)
        # the numbers are the encoders' own: a frame encoded alone gives its stored latent
        alone = pipeline.encode_frames(vae, torch.from_numpy(ident.frame(5)).permute(2, 0, 1)[None, :, None] / 255)
        torch.testing.assert_close(later._read(ident, "latent", 5), alone[0, :, 0], atol=1e-5, rtol=1e-4)
    # other weights are another entry: encoded anew, never the old numbers
    with torch.no_grad():
        next(vae.parameters()).add_(0.01)
    changed = ClipBatches([ident], vae, enc, 4, 0.0, store, face=True)
    assert changed.encode() == changed.encodings()
    assert not torch.equal(changed._read(ident, "latent", 5), later._read(ident, "latent", 5))
