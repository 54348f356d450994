"""Pause a pipeline stage at one atomic rename, so that a test can kill it at a known point.

Python imports this module at start-up when ``tests/faults`` is on PYTHONPATH. It does
nothing unless ``CXRGEN_TEST_PAUSE_DIR`` is set. Then, in a process started as
``python -m stages.<name>``, the ``CXRGEN_TEST_PAUSE_AT``-th call of ``os.replace`` that
moves a ``pipeline.atomic`` temporary file onto its target writes ``PAUSE_DIR/paused``
(the process id and the target) and waits until ``PAUSE_DIR/resume`` exists. The
temporary file is complete at that point, and the earlier artifacts have been replaced.
"""

from __future__ import annotations

import os
import sys
import time

_PAUSE_DIR = os.environ.get("CXRGEN_TEST_PAUSE_DIR")


def _is_atomic_rename(source: object, target: object) -> bool:
    source_name = os.path.basename(os.fspath(source))
    target_name = os.path.basename(os.fspath(target))
    return source_name.startswith(f".{target_name}.") and ".tmp" in source_name


def _install(pause_dir: str, pause_at: int) -> None:
    original_replace = os.replace
    calls = 0

    def replace(source, target, *args, **kwargs):
        nonlocal calls
        in_stage = "stages" in os.path.normpath(sys.argv[0] if sys.argv else "").split(os.sep)
        if in_stage and _is_atomic_rename(source, target):
            calls += 1
            if calls == pause_at:
                _pause(pause_dir, target)
        return original_replace(source, target, *args, **kwargs)

    os.replace = replace


def _pause(pause_dir: str, target: object) -> None:
    marker = os.path.join(pause_dir, "paused")
    with open(marker + ".part", "w", encoding="utf-8") as handle:
        handle.write(f"{os.getpid()}\n{os.fspath(target)}\n")
    os.rename(marker + ".part", marker)
    while not os.path.exists(os.path.join(pause_dir, "resume")):
        time.sleep(0.05)


if _PAUSE_DIR:
    _install(_PAUSE_DIR, int(os.environ.get("CXRGEN_TEST_PAUSE_AT", "1")))
