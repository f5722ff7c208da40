"""SGDMPipeline: a checkpoint folder renders by itself, on any device and dtype, in bounded memory, and gives the
frames the straightforward Algorithm 1 gives, bit for bit."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from models import overlap, parts, pipeline
from models.sgdm_pipeline import SGDMPipeline

RES, F = 64, 7


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny body and face checkpoints saved as training saves them; the base folders they came from removed."""
    root = tmp_path_factory.mktemp("pipe")
    base = parts.write_tiny(root / "base")
    out = {}
    for which, face in (("body", False), ("face", True)):
        sgdm = parts.new_sgdm(base, face=face, seed=3)
        with torch.no_grad():  # a mesh branch that does something (its outputs start at zero)
            for p in sgdm.controlnet.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.02)
        pipe = SGDMPipeline(sgdm, parts.load_vae(base), parts.load_image_encoder(base), parts.load_scheduler(base),
                            RES)
        pipe.save_pretrained(root / which, parts_from={"vae": base.sd15 / "vae", "image_encoder": base.image_encoder,
                                                       "scheduler": base.sd15 / "scheduler"})
        out[which] = root / which
    shutil.rmtree(root / "base")
    return out


def _images(n: int, seed: int, side: int = RES) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(n)]


def _reference_render(pipe: SGDMPipeline, conditions: list[np.ndarray], reference: np.ndarray, seed: int,
                      steps: int = 4, guidance: float = 3.5, control: float = 2.0, window: int = 4,
                      overlap_frames: int = 2) -> np.ndarray:
    """Algorithm 1 written out on the whole latent tensor, as the render stage computed it before the pipeline."""
    tokens = pipeline.encode_reference(pipe.image_encoder, torch.from_numpy(reference).permute(2, 0, 1)[None].float()
                                       / 255)
    f = pipeline.vae_factor(pipe.vae)
    gen = torch.Generator().manual_seed(seed)
    latents = pipeline.initial_latents((1, pipe.vae.config.latent_channels, len(conditions), RES // f, RES // f), gen)
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    latents = latents * sched.init_noise_sigma

    def predict(x: torch.Tensor, t: torch.Tensor, w: slice) -> torch.Tensor:
        cond = torch.from_numpy(np.stack(conditions[w])).permute(3, 0, 1, 2)[None].float() / 255
        return pipeline.predict_noise(pipe.sgdm, x, t, tokens, cond, guidance, control)

    latents = overlap.denoise(predict, latents, sched, window, overlap_frames)
    frames = [pipeline.decode_latents(pipe.vae, latents[:, :, w])[0] for w in overlap.chunks(len(conditions), window)]
    return (torch.cat(frames, dim=1).permute(1, 2, 3, 0) * 255).round().to(torch.uint8).numpy()


@pytest.mark.slow  # 8-20 s on a busy machine: `make test`, not the edit loop
def test_a_checkpoint_folder_alone_renders_the_frames_of_the_plain_algorithm(checkpoints: dict[str, Path]) -> None:
    pipe = SGDMPipeline.from_pretrained(checkpoints["body"])
    assert pipe.resolution == RES and not pipe.inpaint
    conditions, reference = _images(F, 1), _images(1, 2)[0]
    kw = {"steps": 4, "guidance": 3.5, "control_scale": 2.0, "window": 4, "overlap_frames": 2}
    frames = pipe(conditions, reference, generator=torch.Generator().manual_seed(5), **kw)
    assert frames.shape == (F, RES, RES, 3) and frames.dtype == np.uint8
    assert np.array_equal(frames, _reference_render(pipe, conditions, reference, 5))
    # the same seed, the same frames; another seed, others; a latent video spilled to disk changes nothing
    assert np.array_equal(frames, pipe(conditions, reference, generator=torch.Generator().manual_seed(5), **kw))
    assert not np.array_equal(frames, pipe(conditions, reference, generator=torch.Generator().manual_seed(6), **kw))
    spilled = pipe(conditions, reference, generator=torch.Generator().manual_seed(5), max_latent_bytes=0, **kw)
    assert np.array_equal(frames, spilled)
    # frames handed over a window at a time, in order, nothing returned
    got: list[tuple[int, np.ndarray]] = []
    assert pipe(conditions, reference, generator=torch.Generator().manual_seed(5), output=lambda i, fr:
                got.append((i, fr)), **kw) is None
    assert [i for i, _ in got] == [0, 4] and np.array_equal(np.concatenate([fr for _, fr in got]), frames)


def test_to_moves_every_parameter_and_buffer(checkpoints: dict[str, Path]) -> None:
    pipe = SGDMPipeline.from_pretrained(checkpoints["body"])
    pipe.to(dtype=torch.float64)
    tensors = [t for m in (pipe.sgdm, pipe.vae, pipe.image_encoder) for t in (*m.parameters(), *m.buffers())
               if t.is_floating_point()]
    assert tensors and all(t.dtype == torch.float64 for t in tensors)
    pipe.to("meta")
    assert all(t.device.type == "meta" for m in (pipe.sgdm, pipe.vae, pipe.image_encoder)
               for t in (*m.parameters(), *m.buffers()))
    assert pipe.device.type == "meta"


def test_a_vae_whose_config_asks_to_be_upcast_stays_float32_in_a_float16_pipeline(checkpoints: dict[str, Path]
                                                                                 ) -> None:
    pipe = SGDMPipeline.from_pretrained(checkpoints["body"])
    assert pipe.vae.config.force_upcast  # diffusers' default, as SD's VAE folders leave it
    pipe.to(dtype=torch.float16)
    assert {p.dtype for p in pipe.vae.parameters()} == {torch.float32}
    assert {p.dtype for p in pipe.sgdm.parameters()} == {torch.float16}
    pipe.vae.register_to_config(force_upcast=False)  # a VAE fine-tuned for float16 says so, and gets it
    pipe.to(dtype=torch.float16)
    assert {p.dtype for p in pipe.vae.parameters()} == {torch.float16}


def test_the_face_checkpoint_inpaints_frames_under_masks(checkpoints: dict[str, Path]) -> None:
    pipe = SGDMPipeline.from_pretrained(checkpoints["face"])
    assert pipe.inpaint
    conditions, images, reference = _images(5, 3), _images(5, 4), _images(1, 5)[0]
    masks = [np.zeros((RES, RES), np.uint8) for _ in range(5)]
    for m in masks:
        m[16:48, 16:48] = 255
    kw = {"steps": 3, "window": 4, "overlap_frames": 1}
    frames = pipe(conditions, reference, images=images, masks=masks, generator=torch.Generator().manual_seed(0), **kw)
    other = pipe(conditions, reference, images=images, masks=masks, generator=torch.Generator().manual_seed(1), **kw)
    assert frames.shape == other.shape == (5, RES, RES, 3)
    inside = np.stack(masks) == 255
    # outside the mask: the images as given, whatever the seed; inside: redone, and redone otherwise by another seed
    assert np.array_equal(frames[~inside], np.stack(images)[~inside])
    assert np.array_equal(other[~inside], np.stack(images)[~inside])
    assert (frames[inside] != np.stack(images)[inside]).mean() > 0.9
    assert (frames[inside] != other[inside]).mean() > 0.5
    with pytest.raises(ValueError, match="needs images and masks"):
        pipe(conditions, reference, **kw)
    body = SGDMPipeline.from_pretrained(checkpoints["body"])
    with pytest.raises(ValueError, match="not an inpainting one"):
        body(conditions, reference, images=images, masks=masks, **kw)


def test_a_multistep_solver_can_replace_ddim_and_an_old_checkpoint_is_named(checkpoints: dict[str, Path],
                                                                           tmp_path: Path) -> None:
    pipe = SGDMPipeline.from_pretrained(checkpoints["body"])
    conditions, reference = _images(4, 7), _images(1, 8)[0]
    ddim = pipe(conditions, reference, steps=6, generator=torch.Generator().manual_seed(0))
    pipe.use_scheduler("dpmpp")
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipe.scheduler.config.num_train_timesteps == 1000
    dpm = pipe(conditions, reference, steps=6, generator=torch.Generator().manual_seed(0))
    assert dpm.shape == ddim.shape and not np.array_equal(dpm, ddim)
    with pytest.raises(ValueError, match="choose ddim, dpmpp, unipc"):
        pipe.use_scheduler("euler")
    old = tmp_path / "old"
    shutil.copytree(checkpoints["body"], old)
    (old / "model_index.json").unlink()
    with pytest.raises(FileNotFoundError, match="not a pipeline checkpoint"):
        SGDMPipeline.from_pretrained(old)


def test_conditions_are_decoded_once_per_render_while_they_fit_the_memory_bound(checkpoints: dict[str, Path]
                                                                                ) -> None:
    from collections.abc import Sequence

    class Counted(Sequence):  # conditions as a render reads them (render_body: a PNG decoded per read)
        def __init__(self, images: list[np.ndarray]) -> None:
            self.images, self.reads = images, 0

        def __len__(self) -> int:
            return len(self.images)

        def __getitem__(self, i):  # noqa: ANN001, ANN204
            self.reads += 1
            return self.images[i]

    pipe = SGDMPipeline.from_pretrained(checkpoints["body"])
    kw = {"steps": 4, "guidance": 3.5, "window": 4, "overlap_frames": 2}
    once, per_window = Counted(_images(F, 1)), Counted(_images(F, 1))
    reference = _images(1, 2)[0]
    frames = pipe(once, reference, generator=torch.Generator().manual_seed(5), **kw)
    assert once.reads == F  # each frame once, for every window and step that reads it
    bounded = pipe(per_window, reference, generator=torch.Generator().manual_seed(5), max_latent_bytes=0, **kw)
    assert per_window.reads == 4 * overlap.evaluations_per_step(F, 4, 2)  # no room: read as windows need them
    assert np.array_equal(frames, bounded)


def test_a_model_with_the_reference_at_its_input_renders_from_the_frame_itself(tmp_path: Path) -> None:
    """`conditioning: input`: the reference frame reaches the UNet's first layer (the unconditional branch of
    guidance gets a blank one), so two references render two pictures, and a checkpoint of it renders alone."""
    base = parts.write_tiny(tmp_path / "base")
    sgdm = parts.new_sgdm(base, seed=3, conditioning="input")
    with torch.no_grad():  # an input stem that does something (its output starts at zero on the tiny base)
        torch.nn.init.normal_(sgdm.guider.conv_out.weight, std=0.2)
    SGDMPipeline(sgdm, parts.load_vae(base), parts.load_image_encoder(base), parts.load_scheduler(base), RES
                 ).save_pretrained(tmp_path / "body")
    pipe = SGDMPipeline.from_pretrained(tmp_path / "body")
    assert pipe.sgdm.conditioning == "input" and not (tmp_path / "body/controlnet").exists()
    conditions, (ref_a, ref_b) = _images(5, 1), _images(2, 2)
    for guidance in (1.0, 3.5):
        a = pipe(conditions, ref_a, steps=2, guidance=guidance, window=4, overlap_frames=2)
        again = pipe(conditions, ref_a, steps=2, guidance=guidance, window=4, overlap_frames=2)
        b = pipe(conditions, ref_b, steps=2, guidance=guidance, window=4, overlap_frames=2)
        assert a.shape == (5, RES, RES, 3) and np.array_equal(a, again)
        assert np.abs(a.astype(int) - b.astype(int)).mean() > 0.5
