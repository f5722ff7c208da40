"""Content hashes of artifact trees, atomic writes, sweeping what a crash left, verification."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.artifacts import OLD_TAG, TMP_TAG, atomic_dir, sweep_partials, verify, write_json
from core.hashing import MANIFEST, hash_tree

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------------- hashing


def make_tree(root: Path) -> Path:
    (root / "frames" / "train_000").mkdir(parents=True)
    (root / "frames" / "train_000" / "000000.jpg").write_bytes(bytes(range(256)) * 4)
    (root / "frames" / "train_000" / "000001.jpg").write_bytes(b"\x01\x02\x03" * 100)
    (root / "meta.json").write_text('{"fps": 30}\n')
    return root


def test_hash_tree_equal_for_equal_trees(tmp_path: Path) -> None:
    a = make_tree(tmp_path / "a")
    b = make_tree(tmp_path / "b")
    assert hash_tree(a) == hash_tree(b)


def test_hash_tree_leaves_out_the_manifest_and_dvcs_gitignore_only(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "a")
    before = hash_tree(root)
    (root / MANIFEST).write_text("{}")
    (root / ".gitignore").write_text("/report.html\n")  # DVC writes it beside outs tracked one by one
    assert hash_tree(root) == before
    (root / "sub" / ".gitignore").parent.mkdir(exist_ok=True)
    (root / "sub" / ".gitignore").write_text("x\n")  # only the artifact's own top level is DVC's
    assert hash_tree(root) != before


def test_hash_tree_changes_when_one_byte_flips(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "a")
    before = hash_tree(root)
    f = root / "frames" / "train_000" / "000000.jpg"
    data = bytearray(f.read_bytes())
    data[500] ^= 0x01
    f.write_bytes(bytes(data))
    assert hash_tree(root) != before


def test_hash_tree_changes_when_a_file_is_renamed(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "a")
    before = hash_tree(root)
    (root / "meta.json").rename(root / "meta2.json")
    assert hash_tree(root) != before


def test_hash_tree_changes_when_a_file_moves_to_another_directory(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "a")
    before = hash_tree(root)
    (root / "frames" / "train_001").mkdir()
    (root / "frames" / "train_000" / "000001.jpg").rename(root / "frames" / "train_001" / "000001.jpg")
    assert hash_tree(root) != before


def test_hash_tree_ignores_manifest(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "a")
    before = hash_tree(root)
    (root / MANIFEST).write_text('{"output_hash": "x"}\n')
    assert hash_tree(root) == before
    (root / MANIFEST).write_text('{"output_hash": "y"}\n')
    assert hash_tree(root) == before


# ---------------------------------------------------------------------------------------------------- artifacts


def siblings(parent: Path, name: str) -> list[Path]:
    return sorted(parent.glob(f".{name}.*"))


def finish(artifact: Path) -> str:
    """Write a manifest recording the artifact's content hash, as the stage runner does."""
    digest = hash_tree(artifact)
    write_json(artifact / MANIFEST, {"stage": "ingest", "output_hash": digest})
    return digest


def test_atomic_dir_failure_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "ingest"
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("half")
        assert tmp.parent == tmp_path and tmp.name.startswith(f".ingest{TMP_TAG}")
        raise RuntimeError("boom")
    assert not target.exists()
    assert siblings(tmp_path, "ingest") == []
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_interrupt_keeps_previous_artifact(tmp_path: Path) -> None:
    target = tmp_path / "ingest"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
        raise KeyboardInterrupt
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    assert siblings(tmp_path, "ingest") == []


def test_atomic_dir_success_creates_target(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "ingest"
    with atomic_dir(target) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.txt").write_text("a")
        assert not target.exists()
    assert (target / "sub" / "a.txt").read_text() == "a"
    assert siblings(target.parent, "ingest") == []


def test_atomic_dir_success_replaces_existing_target_completely(tmp_path: Path) -> None:
    target = tmp_path / "ingest"
    (target / "frames").mkdir(parents=True)
    (target / "frames" / "old.jpg").write_bytes(b"old")
    (target / "stale.txt").write_text("stale")
    with atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == ["new.txt"]
    assert (target / "new.txt").read_text() == "new"
    assert siblings(tmp_path, "ingest") == []


def test_sweep_partials_removes_temporary_dirs(tmp_path: Path) -> None:
    target = tmp_path / "ingest"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    tmp1 = tmp_path / f".ingest{TMP_TAG}abc123"
    tmp2 = tmp_path / f".ingest{TMP_TAG}def456"
    for d in (tmp1, tmp2):
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "x").write_text("partial")
    other = tmp_path / f".matting{TMP_TAG}abc123"
    other.mkdir()
    removed = sweep_partials(tmp_path, "ingest")
    assert sorted(removed) == sorted([tmp1, tmp2])
    assert not tmp1.exists() and not tmp2.exists()
    assert (target / "keep.txt").read_text() == "keep"
    assert other.exists()  # another artifact's leftovers are not this call's business


def test_sweep_partials_restores_displaced_complete_artifact(tmp_path: Path) -> None:
    old = tmp_path / f".ingest{OLD_TAG}abc123"
    old.mkdir()
    (old / "a.txt").write_text("whole")
    digest = finish(old)
    partial = tmp_path / f".ingest{TMP_TAG}def456"
    partial.mkdir()
    sweep_partials(tmp_path, "ingest")
    target = tmp_path / "ingest"
    assert (target / "a.txt").read_text() == "whole"
    assert verify(target, digest)
    assert siblings(tmp_path, "ingest") == []


def test_sweep_partials_drops_old_dir_without_manifest_or_when_target_exists(tmp_path: Path) -> None:
    no_manifest = tmp_path / f".ingest{OLD_TAG}aaa"
    no_manifest.mkdir()
    (no_manifest / "a.txt").write_text("a")
    removed = sweep_partials(tmp_path, "ingest")
    assert removed == [no_manifest]
    assert not (tmp_path / "ingest").exists()

    target = tmp_path / "ingest"
    target.mkdir()
    (target / "current.txt").write_text("current")
    finish(target)
    displaced = tmp_path / f".ingest{OLD_TAG}bbb"
    displaced.mkdir()
    (displaced / "previous.txt").write_text("previous")
    finish(displaced)
    assert sweep_partials(tmp_path, "ingest") == [displaced]
    assert sorted(p.name for p in target.iterdir()) == ["current.txt", MANIFEST]


def test_sweep_partials_missing_parent(tmp_path: Path) -> None:
    assert sweep_partials(tmp_path / "nope", "ingest") == []


def test_verify(tmp_path: Path) -> None:
    assert not verify(tmp_path / "missing")

    art = make_tree(tmp_path / "art")
    assert not verify(art)  # no manifest yet
    digest = finish(art)
    assert verify(art)
    assert verify(art, digest)
    assert not verify(art, "0" * 64)

    f = art / "frames" / "train_000" / "000001.jpg"
    data = bytearray(f.read_bytes())
    data[0] ^= 0x80
    f.write_bytes(bytes(data))
    assert not verify(art)
    assert not verify(art, digest)


def test_verify_detects_extra_and_missing_files(tmp_path: Path) -> None:
    art = make_tree(tmp_path / "art")
    finish(art)
    (art / "extra.txt").write_text("x")
    assert not verify(art)
    (art / "extra.txt").unlink()
    assert verify(art)
    (art / "meta.json").unlink()
    assert not verify(art)


def test_verify_unreadable_manifest(tmp_path: Path) -> None:
    art = make_tree(tmp_path / "art")
    (art / MANIFEST).write_text("{not json")
    assert not verify(art)


def test_uncommitted_changes_are_about_code_params_and_the_project_file_only(tmp_path: Path) -> None:
    """The pipeline updates dvc.lock, identities.yaml and versions.yaml itself: none of them makes the code dirty."""
    import subprocess

    from core.artifacts import code_version

    repo = tmp_path / "repo"
    files = {"tasks/stages/a.py": "A = 1\n", "tasks/b.py": "B = 1\n", "params.yaml": "x: 1\n",
             "pyproject.toml": "[project]\n", "dvc.lock": "{}\n", "identities.yaml": "identities: []\n",
             "versions.yaml": "{}\n"}
    for name, text in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)

    def dirty(files: tuple[str, ...] = ("tasks", "params.yaml", "pyproject.toml")) -> bool:
        code_version.cache_clear()
        return code_version(files, repo)["dirty"]

    assert dirty() is False
    for name in ("dvc.lock", "identities.yaml", "versions.yaml"):
        (repo / name).write_text("changed by a run\n")
    assert dirty() is False
    for name in ("tasks/b.py", "params.yaml", "pyproject.toml"):
        before = (repo / name).read_text()
        (repo / name).write_text(before + "# edited\n")
        assert dirty() is True, name
        assert dirty(("tasks/stages/a.py", "params.yaml", "pyproject.toml")) is (name != "tasks/b.py"), name
        (repo / name).write_text(before)
    (repo / "tasks" / "new_module.py").write_text("C = 1\n")  # a module not yet committed is a change too
    assert dirty() is True and dirty(("tasks/stages/a.py", "params.yaml")) is False
    code_version.cache_clear()
