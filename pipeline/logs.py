"""Logging set-up shared by the CLI, the DVC stages and the benchmarks."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str | int = "INFO") -> None:
    """Send log records to stderr with timestamps; safe to call more than once."""
    logging.basicConfig(level=level, format=FORMAT, force=True)


@contextlib.contextmanager
def log_duration(logger: logging.Logger, what: str) -> Iterator[None]:
    """Log when ``what`` starts and how many seconds it took."""
    logger.info("%s: started", what)
    start = time.perf_counter()
    yield
    logger.info("%s: finished in %.1f s", what, time.perf_counter() - start)
