"""Unit tests of tasks/video.py (probe, constant-frame-rate decoding, audio) and the pure parts of tasks/ingest.py."""

from __future__ import annotations

import struct
import wave
from pathlib import Path

import av
import numpy as np
import pytest

from core.errors import InputError, StageError
from tasks import video as vio
from tasks.stages.ingest import IngestParams, choose_crop, split_clips

TESTDATA = Path(__file__).resolve().parents[2] / "../shared/testdata"
ANCHOR = TESTDATA / "anchor_seated_hevc.mp4"
FACE_VFR = TESTDATA / "face_only_vfr.mp4"
HALFBODY = TESTDATA / "halfbody_portrait.mp4"


def probe_error(path: Path) -> str:
    with pytest.raises(InputError) as info:
        vio.probe(path)
    message = str(info.value)
    assert "\n" not in message, message
    assert message.strip() == message and message
    return message


def remux_video_only(src: Path, dst: Path, faststart: bool = False) -> Path:
    """Copy the video stream (no re-encoding, no audio) into a new MP4, optionally with the index first."""
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(src)) as inp, av.open(str(dst), "w", options=options) as out:
        in_stream = inp.streams.video[0]
        out_stream = out.add_stream_from_template(in_stream)
        for packet in inp.demux(in_stream):
            if packet.dts is None:
                continue
            packet.stream = out_stream
            out.mux(packet)
    return dst


def with_display_matrix(src: Path, dst: Path, matrix: tuple[int, ...]) -> Path:
    """Copy an MP4 with the video track's display matrix (tkhd) replaced, as phones record rotation."""
    data = bytearray(src.read_bytes())
    pos = 0
    while (pos := data.find(b"tkhd", pos + 1)) >= 0:
        box = pos - 4
        m = box + (48 if data[box + 8] == 0 else 60)
        width, height = struct.unpack(">II", data[m + 36:m + 44])
        if width and height:  # the video track (audio tracks have no size)
            data[m:m + 36] = struct.pack(">9i", *matrix)
            dst.write_bytes(bytes(data))
            return dst
    raise AssertionError(f"no video tkhd in {src}")


CLOCKWISE_90 = (0, 0x10000, 0, -0x10000, 0, 0, 0, 0, 0x40000000)  # what `ffmpeg -metadata:s:v rotate=90` writes


def first_frame(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return next(c.decode(video=0)).to_ndarray(format="rgb24")


# ---------------------------------------------------------------------------------------------------- probe


def test_probe_missing_file(tmp_path: Path) -> None:
    message = probe_error(tmp_path / "missing.mp4")
    assert "no such file" in message
    assert "missing.mp4" in message


def test_probe_directory(tmp_path: Path) -> None:
    assert "not a file" in probe_error(tmp_path)


def test_probe_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    message = probe_error(path)
    assert "empty" in message
    assert "empty.mp4" in message


def test_probe_text_file(tmp_path: Path) -> None:
    path = tmp_path / "x.mp4"
    path.write_text("this is not a video\nsecond line\n")
    message = probe_error(path)
    assert "x.mp4" in message
    assert "not a readable video" in message


def test_probe_truncated_mp4(tmp_path: Path) -> None:
    data = HALFBODY.read_bytes()
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: int(len(data) * 0.4)])
    message = probe_error(path)
    assert "cut.mp4" in message


def test_probe_truncated_mp4_with_index_first(tmp_path: Path) -> None:
    """With the index (moov) before the media, a cut file opens fine; probe must still notice the missing frames."""
    whole = remux_video_only(HALFBODY, tmp_path / "whole.mp4", faststart=True)
    assert vio.probe(whole).packets == 297
    data = whole.read_bytes()
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: int(len(data) * 0.4)])
    message = probe_error(path)
    assert "truncated" in message
    assert "of 297" in message


@pytest.mark.parametrize(
    ("path", "width", "height", "duration", "frames"),
    [(ANCHOR, 1080, 1920, 20.0, 600), (FACE_VFR, 700, 700, 6.1, 135), (HALFBODY, 480, 908, 297 / 30, 297)],
    ids=["anchor_seated_hevc", "face_only_vfr", "halfbody_portrait"],
)
def test_probe_real_files(path: Path, width: int, height: int, duration: float, frames: int) -> None:
    info = vio.probe(path)
    assert (info.width, info.height) == (width, height)
    assert info.duration == pytest.approx(duration, abs=1 / 30)
    assert info.packets == frames
    assert info.rotation == 0
    assert info.has_audio


def test_probe_codec_and_audio(tmp_path: Path) -> None:
    assert vio.probe(ANCHOR).codec == "hevc"
    assert vio.probe(HALFBODY).codec == "h264"
    silent = remux_video_only(HALFBODY, tmp_path / "silent.mp4")
    assert not vio.probe(silent).has_audio


def test_probe_rotated_swaps_width_and_height(tmp_path: Path) -> None:
    path = with_display_matrix(HALFBODY, tmp_path / "rotated.mp4", CLOCKWISE_90)
    info = vio.probe(path)
    assert (info.width, info.height) == (908, 480)
    assert info.rotation % 180 == 90


# ---------------------------------------------------------------------------------------------------- cfr_frames


def test_cfr_frames_vfr_count_indices_and_duration() -> None:
    info = vio.probe(FACE_VFR)
    frames = list(vio.cfr_frames(FACE_VFR, 30))
    expected = round(info.duration * 30)
    assert expected == vio.frame_count(info, 30)
    assert len(frames) == expected
    assert [k for k, _ in frames] == list(range(expected))
    assert abs(len(frames) / 30 - info.duration) <= 1 / 30
    img = frames[0][1]
    assert img.shape == (700, 700, 3)
    assert img.dtype == np.uint8


def test_cfr_frames_vfr_shows_frame_on_screen_at_each_time() -> None:
    """Output frame k is the latest source frame that started by k/30 s (from the first frame)."""
    size = (96, 96)
    with av.open(str(FACE_VFR)) as c:
        stream = c.streams.video[0]
        tb = float(stream.time_base)
        source = [(f.pts * tb, f.reformat(width=size[0], height=size[1], format="rgb24").to_ndarray())
                  for f in c.decode(stream)]
    start = source[0][0]
    times = np.array([t - start for t, _ in source])
    assert len(np.unique(np.round(np.diff(times), 4))) > 1  # the source really is variable frame rate
    out = list(vio.cfr_frames(FACE_VFR, 30, size))
    assert len(out) == 183
    for k, img in out:
        i = int(np.searchsorted(times, k / 30 + 1e-6, side="right")) - 1
        assert np.array_equal(img, source[i][1]), f"output frame {k} is not source frame {i}"
    # a VFR source at avg 22 fps must repeat frames to reach 30 fps, and never drop the last one
    assert np.array_equal(out[-1][1], source[-1][1])


def test_cfr_frames_constant_rate_source_is_one_to_one() -> None:
    size = (48, 90)
    with av.open(str(HALFBODY)) as c:
        source = [f.reformat(width=size[0], height=size[1], format="rgb24").to_ndarray() for f in c.decode(video=0)]
    out = list(vio.cfr_frames(HALFBODY, 30, size))
    assert len(out) == len(source) == 297
    for (k, img), src in zip(out, source, strict=True):
        assert np.array_equal(img, src), f"frame {k}"


@pytest.mark.parametrize("size", [(64, 48), (128, 128), (200, 100)])
def test_cfr_frames_size(size: tuple[int, int]) -> None:
    w, h = size
    count = 0
    for k, img in vio.cfr_frames(FACE_VFR, 30, size):
        assert img.shape == (h, w, 3)
        count = k + 1
        if count >= 10:
            break
    assert count == 10


def test_cfr_frames_lower_rate() -> None:
    info = vio.probe(HALFBODY)
    out = [k for k, _ in vio.cfr_frames(HALFBODY, 10, (32, 60))]
    assert out == list(range(round(info.duration * 10)))


def test_cfr_frames_rotated_clockwise(tmp_path: Path) -> None:
    path = with_display_matrix(HALFBODY, tmp_path / "rotated.mp4", CLOCKWISE_90)
    k, img = next(iter(vio.cfr_frames(path, 30)))
    assert k == 0
    assert img.shape == (480, 908, 3)
    assert np.array_equal(img, np.rot90(first_frame(HALFBODY), -1))  # displayed turned 90 degrees clockwise
    _, small = next(iter(vio.cfr_frames(path, 30, (200, 100))))
    assert small.shape == (100, 200, 3)


# ---------------------------------------------------------------------------------------------------- extract_audio


@pytest.mark.parametrize("seconds", [2.5, 1.2345, 9.9])
def test_extract_audio_length(tmp_path: Path, seconds: float) -> None:
    out = tmp_path / "audio.wav"
    info = vio.probe(HALFBODY)
    meta = vio.extract_audio(HALFBODY, out, info.start, seconds)
    assert meta is not None
    with wave.open(str(out)) as w:
        rate, n, channels = w.getframerate(), w.getnframes(), w.getnchannels()
        assert w.getsampwidth() == 2
    assert abs(n / rate - seconds) <= 1 / rate
    assert meta["sample_rate"] == rate == 44100
    assert meta["channels"] == channels == 2
    assert meta["seconds"] == pytest.approx(n / rate, abs=1e-6)


def test_extract_audio_pads_past_the_end(tmp_path: Path) -> None:
    out = tmp_path / "audio.wav"
    vio.extract_audio(FACE_VFR, out, 0.0, 8.0)  # the audio track lasts 6.1 s
    with wave.open(str(out)) as w:
        rate, n = w.getframerate(), w.getnframes()
        pcm = np.frombuffer(w.readframes(n), "<i2").reshape(-1, w.getnchannels())
    assert abs(n / rate - 8.0) <= 1 / rate
    assert np.all(pcm[round(6.2 * rate):] == 0)
    assert np.any(pcm[: round(6.0 * rate)] != 0)


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").reshape(-1, w.getnchannels())


def test_extract_audio_aligns_to_video_start(tmp_path: Path) -> None:
    full = read_wav(_extract(tmp_path / "a.wav", 0.0, 3.0))
    assert np.any(full != 0)
    rate = 44100
    later = read_wav(_extract(tmp_path / "b.wav", 0.5, 2.0))
    assert np.array_equal(later, full[round(0.5 * rate):round(0.5 * rate) + round(2.0 * rate)])
    earlier = read_wav(_extract(tmp_path / "c.wav", -0.25, 2.0))
    lead = round(0.25 * rate)
    assert np.all(earlier[:lead] == 0)
    assert np.array_equal(earlier[lead:], full[: round(2.0 * rate) - lead])


def _extract(out: Path, video_start: float, seconds: float) -> Path:
    assert vio.extract_audio(FACE_VFR, out, video_start, seconds) is not None  # talking: audio is not silent
    return out


def test_extract_audio_silent_video(tmp_path: Path) -> None:
    silent = remux_video_only(HALFBODY, tmp_path / "silent.mp4")
    out = tmp_path / "audio.wav"
    assert vio.extract_audio(silent, out, 0.0, 2.0) is None
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------- split_clips


def check_clips(clips: list[dict], n: int, clip_frames: int, fps: int) -> None:
    """Clips are contiguous, at most clip_frames long, cover 0..n-1 exactly once, train before test."""
    position = 0
    for clip in clips:
        assert clip["start"] == position
        assert 1 <= clip["frames"] <= clip_frames
        assert clip["start_s"] == pytest.approx(clip["start"] / fps, abs=1e-6)
        position += clip["frames"]
    assert position == n
    splits = [c["split"] for c in clips]
    assert splits == sorted(splits, key=lambda s: s != "train")
    for split in ("train", "test"):
        names = [c["name"] for c in clips if c["split"] == split]
        assert names == [f"{split}_{i:03d}" for i in range(len(names))]


def frames_of(clips: list[dict], split: str) -> int:
    return sum(c["frames"] for c in clips if c["split"] == split)


def test_split_short_video_keeps_30_percent_as_test() -> None:
    params = IngestParams()
    clips, note = split_clips(600, 30, params)
    assert frames_of(clips, "train") == 420
    assert frames_of(clips, "test") == 180
    assert note is not None and "30%" in note
    assert "180" in note
    check_clips(clips, 600, params.clip_frames, 30)
    assert [(c["name"], c["start"], c["frames"]) for c in clips] == [
        ("train_000", 0, 300), ("train_001", 300, 120), ("test_000", 420, 180)]


def test_split_long_video_trains_on_first_train_seconds() -> None:
    params = IngestParams(train_seconds=10)
    clips, note = split_clips(600, 30, params)
    assert note is None
    assert frames_of(clips, "train") == 300
    assert frames_of(clips, "test") == 300
    check_clips(clips, 600, params.clip_frames, 30)


@pytest.mark.parametrize(("n", "clip_frames"), [(2, 8), (3, 8), (17, 8), (1799, 300), (1801, 300), (5000, 333)])
def test_split_covers_every_frame(n: int, clip_frames: int) -> None:
    params = IngestParams(clip_frames=clip_frames)
    clips, _ = split_clips(n, 30, params)
    check_clips(clips, n, clip_frames, 30)
    assert frames_of(clips, "train") >= 1
    assert frames_of(clips, "test") >= 1


def test_split_both_parts_non_empty_just_past_train_seconds() -> None:
    """601 frames at 30 fps are longer than 20.02 s, but round(20.02 * 30) = 601 leaves no test frame."""
    clips, _ = split_clips(601, 30, IngestParams(train_seconds=20.02))
    assert frames_of(clips, "train") >= 1
    assert frames_of(clips, "test") >= 1


@pytest.mark.parametrize("n", [0, 1])
def test_split_too_short(n: int) -> None:
    with pytest.raises(StageError) as info:
        split_clips(n, 30, IngestParams())
    assert "\n" not in str(info.value)
    assert "too short" in str(info.value)


# ---------------------------------------------------------------------------------------------------- choose_crop


def assert_square_inside(crop: tuple[int, int, int], width: int, height: int) -> None:
    x, y, side = crop
    assert all(isinstance(v, int) for v in crop)
    assert side > 0
    assert x >= 0 and x + side <= width
    assert y >= 0 and y + side <= height


def test_choose_crop_contains_boxes_inside_large_frame() -> None:
    rng = np.random.default_rng(7)
    boxes = np.array([900.0, 500.0, 1300.0, 1100.0]) + rng.normal(0, 8, (40, 4))
    crop = choose_crop(boxes, 3000, 2000, 0.15)
    assert_square_inside(crop, 3000, 2000)
    x, y, side = crop
    assert x <= boxes[:, 0].min() and boxes[:, 2].max() <= x + side
    assert y <= boxes[:, 1].min() and boxes[:, 3].max() <= y + side
    # the square is sized from the person (height 600 plus margins), not the frame
    assert 600 * 1.2 <= side <= 600 * 1.4


def test_choose_crop_contains_a_person_moving_sideways() -> None:
    x0 = np.linspace(400.0, 800.0, 40)
    boxes = np.stack([x0, np.full(40, 500.0), x0 + 200, np.full(40, 900.0)], axis=1)
    crop = choose_crop(boxes, 3000, 2000, 0.15)
    assert_square_inside(crop, 3000, 2000)
    x, y, side = crop
    assert x <= 400 and x + side >= 1000
    assert y <= 500 and y + side >= 900


def test_choose_crop_single_box_centred() -> None:
    x, y, side = choose_crop(np.array([[400.0, 300.0, 600.0, 700.0]]), 2000, 2000, 0.15)
    assert side == 520
    assert (x + side / 2, y + side / 2) == pytest.approx((500, 500), abs=1)


def test_choose_crop_person_taller_than_frame_width_keeps_head() -> None:
    boxes = np.array([[300.0, 200.0, 800.0, 1900.0]] * 12)
    x, y, side = choose_crop(boxes, 1080, 1920, 0.15)
    assert_square_inside((x, y, side), 1080, 1920)
    assert side == 1080
    assert y <= 200 < y + side  # the head is in
    assert x <= 300 and x + side >= 800


def test_choose_crop_tall_person_low_in_frame_keeps_head() -> None:
    boxes = np.array([[300.0, 800.0, 700.0, 1910.0]] * 12)
    x, y, side = choose_crop(boxes, 1080, 1920, 0.15)
    assert_square_inside((x, y, side), 1080, 1920)
    assert side == 1080
    assert y < 800 < y + side
    assert y > 0  # the crop follows the head down rather than sticking to the top of the frame


def test_choose_crop_ignores_a_single_outlier() -> None:
    boxes = np.array([[400.0, 300.0, 600.0, 700.0]] * 20)
    boxes[10] = [0.0, 0.0, 1900.0, 1900.0]  # one wild detection
    x, y, side = choose_crop(boxes, 2000, 2000, 0.15)
    assert side == 520


def test_choose_crop_always_inside_frame() -> None:
    rng = np.random.default_rng(3)
    for _ in range(300):
        width, height = (int(v) for v in rng.integers(64, 2500, 2))
        n = int(rng.integers(1, 30))
        x0 = rng.uniform(-0.3 * width, width, n)
        y0 = rng.uniform(-0.3 * height, height, n)
        boxes = np.stack([x0, y0, x0 + rng.uniform(1, width, n), y0 + rng.uniform(1, height, n)], axis=1)
        assert_square_inside(choose_crop(boxes, width, height, float(rng.uniform(0, 1))), width, height)


def test_the_person_check_decodes_a_dozen_frames_of_an_all_intra_video(tmp_path: Path) -> None:
    """An all-intra file (MJPEG here; ProRes alike) is all keyframes: the check seeks to a fixed number of times and
    holds a dozen small frames, not the whole video."""
    import tracemalloc

    from tasks.stages.ingest import sample_frames

    video = tmp_path / "intra.mov"
    rng = np.random.default_rng(0)
    with av.open(str(video), "w") as out:
        stream = out.add_stream("mjpeg", rate=30)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuvj420p"
        for _ in range(900):  # 30 s, every frame a keyframe
            img = np.repeat(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8), 10, 0).repeat(10, 1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuvj420p")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    tracemalloc.start()
    try:
        frames = sample_frames(video, 256, 12)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(frames) == 12 and frames[0].shape == (192, 256, 3)
    assert len({f.tobytes() for f in frames}) == 12  # twelve different moments, not one frame twelve times
    assert peak < 8 * 2**20, peak  # the old check kept all 900 frames: 900 × 256×192×3 bytes ≈ 130 MB
