"""The per-image feature cache that makes featurize incremental and resumable.

Layout under ``features/cache/``::

    file_hashes.sqlite            sha256 of each image file, keyed by path, size, mtime and inode
    converted/<sha256>.h5         PyTorch weights converted to Keras, by the source file's sha256
    <settings key>/settings.json  what the key stands for: weights sha256, preprocessing, precision ...
    <settings key>/index.sqlite   image sha256 -> (shard, row, decoded?, error)
    <settings key>/shards/N.h5    one file per finished batch: pooled and spatial features

An image's features are found by its content sha256 inside the folder of the settings
key, so new images are the only ones computed, and other weights or settings start an
empty folder. Each shard is written to a temporary name, flushed to disk and renamed
before its index rows are committed. A run killed at any moment therefore leaves at most
a temporary file, which the next run deletes, or a shard not yet indexed, which the next
run indexes. A lock file keeps two runs from writing one folder at once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np

from pipeline.atomic import atomic_path, write_text
from pipeline.errors import PipelineError
from pipeline.extractor import CHANNELS, ImageBatch

logger = logging.getLogger(__name__)

SHARD_DIGITS = 8
_QUERY_CHUNK = 500  # SQLite's default limit on host parameters per statement is 999 or more


class CacheError(PipelineError, RuntimeError):
    """Raised when the cache folder is locked by another run or a shard cannot be read."""


def settings_key(description: dict) -> str:
    """Return the folder name for a settings description: 20 hex digits of its sha256."""
    text = json.dumps(description, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


class FeatureCache:
    """One settings key's folder of cached image features; open it with ``with``."""

    def __init__(self, root: Path, description: dict, cells: int, storage_dtype: str, compression: str | None):
        self.key = settings_key(description)
        self.folder = Path(root) / self.key
        self.description = description
        self.cells = cells
        self.storage_dtype = storage_dtype
        self.compression = compression
        self._lock_handle = None
        self._index: sqlite3.Connection | None = None
        self._next_shard = 0

    def __enter__(self) -> FeatureCache:
        (self.folder / "shards").mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            self._open_index()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _open_index(self) -> None:
        settings_path = self.folder / "settings.json"
        if not settings_path.exists():
            write_text(settings_path, json.dumps(self.description, indent=2, sort_keys=True) + "\n")
        self._index = sqlite3.connect(self.folder / "index.sqlite", check_same_thread=False, isolation_level=None)
        self._index.execute("PRAGMA journal_mode=WAL")
        self._index.execute("CREATE TABLE IF NOT EXISTS shards (id INTEGER PRIMARY KEY, images INTEGER NOT NULL)")
        self._index.execute(
            "CREATE TABLE IF NOT EXISTS images (sha256 TEXT PRIMARY KEY, shard INTEGER NOT NULL, "
            "row INTEGER NOT NULL, ok INTEGER NOT NULL, error TEXT NOT NULL)"
        )
        self._repair()

    def __exit__(self, *exc_info) -> None:
        if self._index is not None:
            self._index.close()
            self._index = None
        if self._lock_handle is not None:
            self._lock_handle.close()  # closing the descriptor releases the flock
            self._lock_handle = None

    def _lock(self) -> None:
        self._lock_handle = open(self.folder / "lock", "a+")
        try:
            fcntl.flock(self._lock_handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_handle.close()
            self._lock_handle = None
            raise CacheError(
                f"{self.folder}: another featurize run is writing this cache; wait for it to finish"
            ) from None

    def shard_path(self, shard: int) -> Path:
        return self.folder / "shards" / f"{shard:0{SHARD_DIGITS}d}.h5"

    def _repair(self) -> None:
        """Delete temporary files, index shards that a killed run left unindexed, drop lost ones."""
        shard_dir = self.folder / "shards"
        for stale in shard_dir.glob(".*.tmp*"):
            stale.unlink(missing_ok=True)
            logger.info("cache: removed the temporary file %s of an interrupted run", stale.name)
        on_disk = {int(path.stem) for path in shard_dir.glob("*.h5") if path.stem.isdigit()}
        indexed = {row[0] for row in self._index.execute("SELECT id FROM shards")}
        for shard in sorted(on_disk - indexed):
            self._index_existing_shard(shard)
        lost = sorted(indexed - on_disk)
        if lost:
            logger.warning("cache: %d indexed shard files are missing; their images will be computed again", len(lost))
            with self._transaction():
                for shard in lost:
                    self._index.execute("DELETE FROM images WHERE shard = ?", (shard,))
                    self._index.execute("DELETE FROM shards WHERE id = ?", (shard,))
        self._next_shard = max(on_disk | indexed, default=-1) + 1

    def _index_existing_shard(self, shard: int) -> None:
        path = self.shard_path(shard)
        try:
            with h5py.File(path, "r") as store:
                keys = [key.decode() for key in store["sha256"][:]]
                ok = store["ok"][:]
                errors = [error.decode() if isinstance(error, bytes) else error for error in store["error"][:]]
        except (OSError, KeyError) as error:
            logger.warning("cache: deleted the unreadable shard %s (%s)", path.name, error)
            path.unlink(missing_ok=True)
            return
        self._insert(shard, keys, ok, errors)
        logger.info("cache: indexed shard %s (%d images) that an interrupted run had written", path.name, len(keys))

    def _transaction(self):
        return _Transaction(self._index)

    def _insert(self, shard: int, keys: Sequence[str], ok: np.ndarray, errors: Sequence[str]) -> None:
        with self._transaction():
            self._index.execute("INSERT INTO shards (id, images) VALUES (?, ?)", (shard, len(keys)))
            self._index.executemany(
                "INSERT OR IGNORE INTO images (sha256, shard, row, ok, error) VALUES (?, ?, ?, ?, ?)",
                [(key, shard, row, int(ok[row]), errors[row]) for row, key in enumerate(keys)],
            )

    def contains(self, keys: Iterable[str]) -> set[str]:
        """Return the image sha256 keys that the cache contains, decoded or not."""
        found: set[str] = set()
        for chunk in _chunks(list(keys), _QUERY_CHUNK):
            marks = ",".join("?" * len(chunk))
            found.update(row[0] for row in self._index.execute(f"SELECT sha256 FROM images WHERE sha256 IN ({marks})", chunk))
        return found

    def write_batch(self, batch: ImageBatch) -> None:
        """Store one batch as a new shard file, then index it; safe to kill at any point."""
        shard = self._next_shard
        self._next_shard += 1
        path = self.shard_path(shard)
        with atomic_path(path) as temporary:
            with h5py.File(temporary, "w", track_order=True) as store:
                store.create_dataset("sha256", data=np.array([key.encode() for key in batch.keys], dtype="S64"))
                store.create_dataset("ok", data=batch.ok)
                store.create_dataset("error", data=np.array(batch.errors, dtype=object), dtype=h5py.string_dtype())
                store.create_dataset("pooled", data=batch.pooled, compression=self.compression)
                store.create_dataset(
                    "spatial", data=batch.spatial, chunks=(1, self.cells, CHANNELS), compression=self.compression
                )
                store.attrs["settings_key"] = self.key
            _flush_to_disk(temporary)
        self._insert(shard, batch.keys, batch.ok, batch.errors)

    def status(self, keys: Sequence[str]) -> dict[str, tuple[int, int, bool, str]]:
        """Map each cached key to (shard, row, decoded, error)."""
        entries: dict[str, tuple[int, int, bool, str]] = {}
        for chunk in _chunks(list(keys), _QUERY_CHUNK):
            marks = ",".join("?" * len(chunk))
            query = f"SELECT sha256, shard, row, ok, error FROM images WHERE sha256 IN ({marks})"
            for key, shard, row, ok, error in self._index.execute(query, chunk):
                entries[key] = (shard, row, bool(ok), error)
        return entries

    def read(self, entries: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
        """Read pooled (n, 1024) and spatial (n, cells, 1024) for ``(shard, row)`` entries, in order."""
        pooled = np.empty((len(entries), CHANNELS), self.storage_dtype)
        spatial = np.empty((len(entries), self.cells, CHANNELS), self.storage_dtype)
        by_shard: dict[int, list[int]] = {}
        for position, (shard, _) in enumerate(entries):
            by_shard.setdefault(shard, []).append(position)
        for shard, positions in by_shard.items():
            rows = np.array([entries[position][1] for position in positions])
            unique_rows, inverse = np.unique(rows, return_inverse=True)
            path = self.shard_path(shard)
            try:
                with h5py.File(path, "r") as store:
                    pooled[positions] = store["pooled"][unique_rows][inverse]
                    spatial[positions] = store["spatial"][unique_rows][inverse]
            except OSError as error:
                raise CacheError(f"{path}: unreadable cache shard ({error}); delete it and run again to recompute its images") from None
        return pooled, spatial


class _Transaction:
    def __init__(self, connection: sqlite3.Connection):
        self.connection = connection

    def __enter__(self) -> None:
        self.connection.execute("BEGIN")

    def __exit__(self, exc_type, *_) -> None:
        self.connection.execute("ROLLBACK" if exc_type else "COMMIT")


def _flush_to_disk(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _chunks(values: list, size: int) -> Iterator[list]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


class FileHashes:
    """sha256 of image files, remembered by (path, size, mtime_ns, inode) as DVC does."""

    def __init__(self, path: Path, threads: int = 4):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.threads = threads
        self._db = sqlite3.connect(path, timeout=60, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, "
            "inode INTEGER, sha256 TEXT)"
        )

    def close(self) -> None:
        self._db.close()

    def sha256_many(self, paths: Sequence[Path]) -> list[str | None]:
        """Return each file's hex sha256, or None for a file that does not exist."""
        stats = [_stat(path) for path in paths]
        known = self._known([str(path) for path in paths])
        hashes: list[str | None] = [None] * len(paths)
        todo = []
        for index, (path, stat) in enumerate(zip(paths, stats, strict=True)):
            if stat is None:
                continue
            remembered = known.get(str(path))
            if remembered and remembered[:3] == stat:
                hashes[index] = remembered[3]
            else:
                todo.append(index)
        with ThreadPoolExecutor(self.threads) as pool:
            for index, digest in zip(todo, pool.map(lambda i: _sha256_or_none(paths[i]), todo), strict=True):
                hashes[index] = digest
        rows = [(str(paths[i]), *stats[i], hashes[i]) for i in todo if hashes[i] is not None]
        self._db.execute("BEGIN")
        self._db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)", rows)
        self._db.execute("COMMIT")
        logger.info("featurize: hashed %d of %d image files (the rest unchanged since last run)", len(todo), len(paths))
        return hashes

    def _known(self, paths: list[str]) -> dict[str, tuple]:
        known = {}
        for chunk in _chunks(paths, _QUERY_CHUNK):
            marks = ",".join("?" * len(chunk))
            for path, *rest in self._db.execute(f"SELECT path, size, mtime_ns, inode, sha256 FROM files WHERE path IN ({marks})", chunk):
                known[path] = tuple(rest)
        return known


def _stat(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_size, stat.st_mtime_ns, stat.st_ino


def _sha256_or_none(path: Path) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    except FileNotFoundError:
        return None
    return digest.hexdigest()
