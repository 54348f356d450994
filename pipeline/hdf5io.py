"""Write HDF5 files so that a failed write raises OSError instead of crashing the interpreter.

After a write fails (a full disk, a file size limit), HDF5 cannot close the file, and
h5py then crashes with a segmentation fault when the file's objects are released. Seen
with h5py 3.14 and HDF5 1.14.6, and reported upstream as h5py issue 914. Here HDF5 writes
through a Python file object that records the first write error and reports success to
HDF5, so the file closes normally, and the error is raised after closing. The file is
then incomplete, so callers write to a temporary path (pipeline.atomic) and discard it.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py


class _DeferredErrorFile(io.RawIOBase):
    """A binary file whose writes and flushes never raise OSError. The first one is kept in ``error``."""

    def __init__(self, raw: io.FileIO) -> None:
        super().__init__()
        self.raw = raw
        self.error: OSError | None = None

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        return self.raw.readinto(buffer)

    def write(self, data) -> int:
        if self.error is None:
            try:
                return self.raw.write(data)
            except OSError as error:
                self.error = error
        return len(memoryview(data))

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def truncate(self, size: int | None = None) -> int:
        if self.error is None:
            try:
                return self.raw.truncate(size)
            except OSError as error:
                self.error = error
        return self.raw.tell() if size is None else size

    def flush(self) -> None:
        if self.error is None:
            try:
                self.raw.flush()
            except OSError as error:
                self.error = error


@contextlib.contextmanager
def _deferred_errors(path: Path | str, mode: str) -> Iterator[_DeferredErrorFile]:
    """Open ``path`` as a _DeferredErrorFile and raise its first write error on the way out."""
    with open(path, "w+b" if mode == "w" else "r+b", buffering=0) as raw:
        deferred = _DeferredErrorFile(raw)
        try:
            yield deferred
        except Exception:
            # HDF5 may fail on data it could not write; the write error is the cause to report.
            if deferred.error is not None:
                raise deferred.error from None
            raise
        if deferred.error is not None:
            raise deferred.error


@contextlib.contextmanager
def open_for_writing(path: Path | str, mode: str = "w", **kwargs: Any) -> Iterator[h5py.File]:
    """Open ``path`` with h5py for writing ("w" creates or truncates, "a" appends to an existing file).

    Raises the first OSError of any write once the file is closed. ``kwargs`` go to h5py.File.
    """
    if mode not in ("w", "a"):
        raise ValueError(f"mode must be 'w' or 'a', not {mode!r}")
    with _deferred_errors(path, mode) as deferred, h5py.File(deferred, mode, **kwargs) as store:
        yield store


@contextlib.contextmanager
def create_reproducible(path: Path | str) -> Iterator[h5py.File]:
    """Create ``path`` as open_for_writing does, but with no modification times in the file.

    HDF5 stores a time in every object header by default, so two runs that write the same
    data give different bytes. This file records none and tracks link creation order, so
    the same content always gives the same bytes.
    """
    with _deferred_errors(path, "w") as deferred:
        create = h5py.h5p.create(h5py.h5p.FILE_CREATE)
        create.set_obj_track_times(False)
        create.set_link_creation_order(h5py.h5p.CRT_ORDER_TRACKED | h5py.h5p.CRT_ORDER_INDEXED)
        access = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
        access.set_libver_bounds(h5py.h5f.LIBVER_EARLIEST, h5py.h5f.LIBVER_LATEST)
        access.set_fileobj_driver(h5py.h5fd.fileobj_driver, deferred)
        identifier = h5py.h5f.create(str(path).encode(), h5py.h5f.ACC_TRUNC, fcpl=create, fapl=access)
        with h5py.File(identifier) as store:
            yield store
