"""Atomic artifact writes: the old file survives a failed write, and stale temporaries are removed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.atomic import atomic_directory, atomic_path, remove_stale_temporaries, write_text


def exited_pid() -> int:
    """Return the process id of a process that has already exited."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(child.stdout)


def test_failed_write_keeps_old_file(tmp_path: Path) -> None:
    target = tmp_path / "table.parquet"
    target.write_bytes(b"previous run")

    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        temporary.write_bytes(b"half of the new table")
        raise RuntimeError("writer failed")

    assert target.read_bytes() == b"previous run"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["table.parquet"]


def test_failed_directory_write_keeps_old_folder(tmp_path: Path) -> None:
    target = tmp_path / "images"
    target.mkdir()
    (target / "a.png").write_bytes(b"old")

    with pytest.raises(RuntimeError), atomic_directory(target) as staging:
        (staging / "b.png").write_bytes(b"new")
        raise RuntimeError("extraction failed")

    assert sorted(path.name for path in target.iterdir()) == ["a.png"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["images"]


def test_temporary_named_after_writer(tmp_path: Path) -> None:
    with atomic_path(tmp_path / "model.keras") as temporary:
        name = temporary.name

    assert name.startswith(f".model.keras.{os.getpid()}.")
    assert name.endswith(".tmp.keras")


def test_stale_temporaries_removed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dead = exited_pid()
    stale_file = tmp_path / f".chexnet.h5.{dead}.k3j2h1.tmp.h5"
    stale_file.write_bytes(b"half-written features")
    stale_folder = tmp_path / f".images.{dead}.abc123.tmp"
    stale_folder.mkdir()
    (stale_folder / "CXR1_IM-0001-1001.png").write_bytes(b"png")
    live_file = tmp_path / f".chexnet.h5.{os.getpid()}.zz9z9z.tmp.h5"
    live_file.write_bytes(b"being written")
    other = tmp_path / f".other.h5.{dead}.aaaaaa.tmp.h5"
    other.write_bytes(b"another target's temporary")

    write_text(tmp_path / "chexnet.h5", "new")
    with atomic_directory(tmp_path / "images"):
        pass

    assert not stale_file.exists()
    assert not stale_folder.exists()
    assert live_file.exists()
    assert other.exists()
    assert "removed 1 temporary files of an interrupted earlier write" in caplog.text


def test_stale_cleanup_ignores_lookalikes(tmp_path: Path) -> None:
    kept = [tmp_path / ".chexnet.h5.old", tmp_path / ".chexnet.h5.notapid.abc.tmp", tmp_path / "chexnet.h5.tmp"]
    for path in kept:
        path.write_text("x")

    assert remove_stale_temporaries(tmp_path / "chexnet.h5") == []
    assert all(path.exists() for path in kept)
