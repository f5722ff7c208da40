"""Algorithm 1's window layout and blending, the face crop rescaling and blending (models/overlap, face_align)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import face_align, overlap, parts, pipeline


def test_paper_layout_300_frames() -> None:
    starts = overlap.window_starts(300, 16, 4)
    assert len(starts) == 25
    assert starts[:3] == [0, 12, 24] and starts[-2:] == [276, 284]
    assert overlap.evaluations_per_step(300, 16, 4) == 400
    counts = overlap.frame_counts(300, 16, 4)
    assert counts[:12].tolist() == [1] * 12 and counts[12:16].tolist() == [2] * 4
    assert counts[284:292].tolist() == [2] * 8 and counts[292:].tolist() == [1] * 8  # last window shifted back


@pytest.mark.parametrize("n", [*range(1, 41), 97, 300, 961])
@pytest.mark.parametrize(("ws", "os"), [(16, 4), (16, 0), (1, 0), (8, 7)])
def test_any_length_is_covered_by_full_windows(n: int, ws: int, os: int) -> None:
    wins = overlap.windows(n, ws, os)
    counts = np.zeros(n, int)
    for w in wins:
        counts[w] += 1
        assert w.stop - w.start == min(ws, n)  # never a short trailing window
    assert wins[0].start == 0 and wins[-1].stop == n
    assert (counts >= 1).all()
    assert counts.tolist() == overlap.frame_counts(n, ws, os).tolist()
    assert [w.start for w in wins] == sorted({w.start for w in wins})


def test_bad_layouts_are_refused() -> None:
    for args in ((0, 16, 4), (10, 0, 0), (10, 4, 4), (10, 4, -1)):
        with pytest.raises(ValueError):
            overlap.window_starts(*args)


def test_blended_prediction_is_the_per_frame_average_of_the_windows() -> None:
    """A stand-in denoiser whose answer depends on the window: each frame gets the mean over its windows."""
    n, ws, os = 30, 8, 3
    latents = torch.zeros(1, 2, n, 2, 2)

    def predict(x: torch.Tensor, t: torch.Tensor, w: slice) -> torch.Tensor:
        frame = torch.arange(w.start, w.stop, dtype=torch.float32).view(1, 1, -1, 1, 1)
        return (w.start + 1) * 100 + frame + torch.zeros_like(x)

    got = overlap.blended_prediction(predict, latents, torch.tensor(1), ws, os)
    starts = overlap.window_starts(n, ws, os)  # 0, 5, 10, 15, 20, 22
    assert starts == [0, 5, 10, 15, 20, 22]
    for i in range(n):
        covering = [s for s in starts if s <= i < s + ws]
        expected = sum((s + 1) * 100 + i for s in covering) / len(covering)
        assert torch.allclose(got[0, :, i], torch.full((2, 2, 2), expected)), i
    assert torch.equal(got[0, 0, 21], torch.full((2, 2), ((16 * 100 + 21) + (21 * 100 + 21)) / 2))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    paths = parts.write_tiny(tmp_path_factory.mktemp("tiny-base"))
    return {"model": parts.new_sgdm(paths).eval(), "vae": parts.load_vae(paths).eval(),
            "scheduler": parts.load_scheduler(paths), "encoder": parts.load_image_encoder(paths).eval()}


@pytest.mark.parametrize("frames", [1, 5, 8])
def test_up_to_one_window_equals_single_window_sampling(tiny: dict, frames: int) -> None:
    tokens = pipeline.encode_reference(tiny["encoder"], torch.rand(1, 3, 32, 32, generator=torch.Generator()
                                                                   .manual_seed(1)))
    cond = torch.rand(1, 3, frames, 32, 32, generator=torch.Generator().manual_seed(2))
    reference = pipeline.sample(tiny["model"], tiny["vae"], tiny["scheduler"], tokens, cond, steps=3,
                                generator=torch.Generator().manual_seed(3))
    sched = type(tiny["scheduler"]).from_config(tiny["scheduler"].config)
    sched.set_timesteps(3)
    latents = pipeline.initial_latents((1, 4, frames, 8, 8), torch.Generator().manual_seed(3))

    def predict(x: torch.Tensor, t: torch.Tensor, w: slice) -> torch.Tensor:
        return pipeline.predict_noise(tiny["model"], x, t, tokens, cond[:, :, w], 3.5, 2.0)

    out = overlap.denoise(predict, latents * sched.init_noise_sigma, sched, 8, 2)
    assert torch.equal(pipeline.decode_latents(tiny["vae"], out), reference)


def test_overlap_changes_sequences_longer_than_a_window(tiny: dict) -> None:
    """20 frames: the overlapped (8/4) and disjoint (8/0) layouts give different sequences of the same shape."""
    tokens = pipeline.encode_reference(tiny["encoder"], torch.rand(1, 3, 32, 32))
    cond = torch.rand(1, 3, 1, 32, 32, generator=torch.Generator().manual_seed(2)).expand(1, 3, 20, 32, 32)

    def run(os: int) -> torch.Tensor:
        sched = type(tiny["scheduler"]).from_config(tiny["scheduler"].config)
        sched.set_timesteps(4)
        latents = pipeline.initial_latents((1, 4, 20, 8, 8), torch.Generator().manual_seed(3), shared=True)
        return overlap.denoise(lambda x, t, w: pipeline.predict_noise(tiny["model"], x, t, tokens, cond[:, :, w],
                                                                      1.0, 2.0),
                               latents * sched.init_noise_sigma, sched, 8, os)

    a, b = run(4), run(0)
    assert a.shape == b.shape == (1, 4, 20, 8, 8)
    assert not torch.equal(a, b)


def test_shared_noise_repeats_one_draw_and_independent_does_not() -> None:
    shared = pipeline.initial_latents((1, 4, 5, 3, 3), torch.Generator().manual_seed(0), shared=True)
    assert all(torch.equal(shared[:, :, 0], shared[:, :, i]) for i in range(5))
    indep = pipeline.initial_latents((1, 4, 5, 3, 3), torch.Generator().manual_seed(0))
    assert not torch.equal(indep[:, :, 0], indep[:, :, 1])
    assert torch.equal(indep, pipeline.initial_latents((1, 4, 5, 3, 3), torch.Generator().manual_seed(0)))


def test_rescaled_face_transform_lands_on_the_same_crop_point() -> None:
    """A point of the 64 px frame maps where its 512 px twin maps in the 256 crop, scaled to a 64 crop."""
    m = face_align.align(np.array([[200, 210], [260, 208], [231, 250], [208, 280], [255, 279]], float), 256)
    small = face_align.rescale(m, 512, 64, 256, 64)
    for x, y in [(10.0, 20.0), (31.5, 33.0), (50.0, 5.0)]:
        big = np.array([(x + 0.5) * 8 - 0.5, (y + 0.5) * 8 - 0.5, 1])
        in_256 = m @ big
        expected = (in_256 + 0.5) * 64 / 256 - 0.5
        np.testing.assert_allclose(small @ np.array([x, y, 1]), expected, atol=1e-9)


def test_paste_changes_only_pixels_under_the_mask() -> None:
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    m = np.array([[2.0, 0, -40], [0, 2.0, -30]])  # crop = frame[15:47, 20:52] at twice the size
    crop = np.full((64, 64, 3), 200, np.uint8)
    nothing = face_align.paste(frame, crop, np.zeros((64, 64), np.uint8), m, feather=3)
    assert np.array_equal(nothing, frame)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255  # crop centre ↔ frame rows 23..38, cols 28..43
    out = face_align.paste(frame, crop, mask, m, feather=0)
    changed = np.any(out != frame, axis=2)
    rows, cols = np.nonzero(changed)
    assert rows.min() >= 22 and rows.max() <= 39 and cols.min() >= 27 and cols.max() <= 44
    assert (out[26:36, 31:41] == 200).all()  # well inside: the crop itself
    # a crop taken from the frame itself pastes back to (almost) the frame
    import cv2

    own = cv2.warpAffine(frame, m, (64, 64), flags=cv2.INTER_LINEAR)
    back = face_align.paste(frame, own, mask, m, feather=2)
    assert np.abs(back.astype(int) - frame)[26:36, 31:41].max() <= 1


@pytest.mark.parametrize(("kind", "history"), [("ddim", 0), ("dpmpp", 2), ("unipc", 3)])
def test_a_multistep_samplers_history_spills_with_the_latents_and_changes_no_number(
        tiny: dict, tmp_path, kind: str, history: int) -> None:
    """Latents spilled to disk (a bound of 0 bytes): DPM-Solver++'s two previous outputs and UniPC's two and its
    last sample are scratch files beside them, never held by the samplers between steps; the frames are those of
    the whole sequence stepped in memory by one sampler."""
    from models.latents import LatentStore
    from models.sgdm_pipeline import SCHEDULERS

    base = tiny["scheduler"]
    extra = {"algorithm_type": "dpmsolver++"} if kind == "dpmpp" else {}
    sched = SCHEDULERS[kind].from_config(base.config, **extra)
    sched.set_timesteps(4)
    assert overlap.history_videos(sched) == history
    noise = torch.randn(1, 4, 20, 8, 8, generator=torch.Generator().manual_seed(3)) * sched.init_noise_sigma

    def predict(x: torch.Tensor, t: torch.Tensor, w: slice) -> torch.Tensor:  # any function of the window
        return torch.tanh(x * 0.7 + 0.01 * float(t)) + 0.05 * w.start

    import copy

    expected = overlap.denoise(predict, noise.clone(), copy.deepcopy(sched), 8, 4)
    files: list[int] = []

    def watched(x: torch.Tensor, t: torch.Tensor, w: slice) -> torch.Tensor:
        files.append(len(list(tmp_path.glob(".latents-*"))))
        return predict(x, t, w)

    with LatentStore(4, 20, 8, 8, max_bytes=0, spill_dir=tmp_path) as store:
        store.write(slice(0, 20), noise)
        overlap.denoise_store(watched, store, copy.deepcopy(sched), 8, 4)
        assert torch.equal(store.read(slice(0, 20)), expected)
    assert max(files) == 1 + history  # the latents, then one file per video of history
    assert not list(tmp_path.glob(".latents-*"))  # each removed when the render ends
    # in memory while they fit together: a bound for the latents alone spills them when there is a history
    one = 20 * 4 * 8 * 8 * 4
    assert LatentStore(4, 20, 8, 8, max_bytes=one, copies=1 + history).on_disk == (history > 0)
