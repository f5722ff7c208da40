"""The store of frozen encoders' outputs: names that follow content, chunks that survive a kill."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from core.hashing import MANIFEST
from tasks.encoded import CHUNK, EncodedStore, files_key, weights_key


def test_a_file_counts_by_its_bytes_or_by_its_artifacts_hash(tmp_path: Path) -> None:
    loose = tmp_path / "a.png"
    loose.write_bytes(b"one")
    before = files_key([loose])
    loose.write_bytes(b"two")
    assert files_key([loose]) != before
    art = tmp_path / "art"
    (art / "clip").mkdir(parents=True)
    frame = art / "clip" / "000000.png"
    frame.write_bytes(b"pixels")
    (art / MANIFEST).write_text(json.dumps({"output_hash": "h1"}))
    inside = files_key([frame])
    frame.write_bytes(b"other pixels")  # the runner verified the manifest: its hash speaks for the files
    assert files_key([frame]) == inside
    (art / MANIFEST).write_text(json.dumps({"output_hash": "h2"}))  # the artifact rebuilt in place
    assert files_key([frame]) != inside
    assert files_key([frame, loose]) != files_key([loose, frame])  # the order is the frames'


def test_weights_differing_in_one_value_or_in_dtype_are_other_weights() -> None:
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    key = weights_key(net)
    assert weights_key(net) == key
    with torch.no_grad():
        net.bias[0] += 1e-6
    assert weights_key(net) != key
    assert weights_key(net.half()) != weights_key(net.float())
    net.register_buffer("seen", torch.tensor(3))  # a 0-dim tensor in the state dict
    counted = weights_key(net)
    net.seen += 1
    assert weights_key(net) != counted
    assert weights_key(net.bfloat16()) != weights_key(net.half())


def test_a_kill_loses_only_the_chunk_being_encoded(tmp_path: Path) -> None:
    store = EncodedStore(tmp_path)
    n = 2 * CHUNK + 5
    calls: list[range] = []
    kill = [True]

    def encode(frames: range) -> torch.Tensor:
        calls.append(frames)
        if frames.start == CHUNK and kill[0]:
            raise KeyboardInterrupt  # killed in the second chunk
        return torch.arange(frames.start, frames.stop, dtype=torch.float32)[:, None].repeat(1, 3)

    with pytest.raises(KeyboardInterrupt):
        store.fill("k", n, encode)
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["000000.safetensors"]  # no half chunk
    calls.clear()
    kill[0] = False
    assert store.fill("k", n, encode) == CHUNK + 5
    assert calls == [range(CHUNK, 2 * CHUNK), range(2 * CHUNK, n)]
    assert store.fill("k", n, encode) == 0
    assert store.load_chunk("k", 2 * CHUNK + 3)[3].tolist() == [2 * CHUNK + 3] * 3
    assert store.load_chunk("k", CHUNK - 1).shape == (CHUNK, 3)
