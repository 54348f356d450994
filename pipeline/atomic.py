"""Write artifacts so that readers see either the old file or the complete new one.

Temporary files and folders are named ``.<target name>.<writer pid>.<random>.tmp`` beside
their target. A writer killed with SIGKILL cannot delete its temporary file, so every new
write first deletes the temporaries beside its target whose writer process is gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_path(target: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` and rename it onto ``target`` on success.

    The temporary file lives in the same folder, so the final ``os.replace`` is atomic on
    POSIX file systems. On any exception the temporary file is removed and ``target`` is
    left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    # The suffix is kept last because some writers (Keras' .keras format) check it.
    handle, name = tempfile.mkstemp(prefix=_temporary_prefix(target), suffix=f".tmp{target.suffix}", dir=target.parent)
    os.close(handle)
    temporary = Path(name)
    # mkstemp creates mode 0600; give the artifact the mode a plain open() would.
    os.chmod(temporary, 0o666 & ~_current_umask())
    try:
        yield temporary
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(target: Path | str) -> Iterator[Path]:
    """Yield a temporary folder beside ``target`` and swap it in for ``target`` on success.

    The old folder is renamed aside before the new one takes its place, then deleted. The
    two renames are not one atomic step, so a crash between them leaves ``target`` missing
    and the old copy under a ``.old`` name, never a half-written ``target``.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    temporary = Path(tempfile.mkdtemp(prefix=_temporary_prefix(target), suffix=".tmp", dir=target.parent))
    os.chmod(temporary, 0o777 & ~_current_umask())
    try:
        yield temporary
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            os.replace(target, old)
        os.replace(temporary, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def remove_stale_temporaries(target: Path | str) -> list[Path]:
    """Delete the temporary files and folders beside ``target`` whose writer process has exited.

    Returns the deleted paths. A temporary of a process that is still running is kept.
    NOTE: the writer is looked up by process id on this machine, so a folder shared with
    another machine that writes the same target at the same time is not supported.
    """
    target = Path(target)
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(\d+)\.[^.]+\.tmp")
    removed = []
    for path in _siblings(target.parent):
        match = pattern.match(path.name)
        if match is None or _process_exists(int(match.group(1))):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    if removed:
        logger.warning("removed %d temporary files of an interrupted earlier write of %s", len(removed), target)
    return removed


def _siblings(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except FileNotFoundError:
        return []


def _temporary_prefix(target: Path) -> str:
    return f".{target.name}.{os.getpid()}."


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # the process exists but belongs to another user
    return True


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(target: Path | str, text: str) -> None:
    """Write UTF-8 text to ``target`` atomically."""
    with atomic_path(target) as temporary:
        temporary.write_text(text, encoding="utf-8")
