"""Logging set-up shared by the CLI, the DVC stages and the benchmarks."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator

from tqdm import tqdm

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class ProgressBarHandler(logging.StreamHandler):
    """A stderr handler that prints each record on its own line above any tqdm progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must not raise; handleError reports it
            self.handleError(record)


def setup_logging(level: str | int = "INFO") -> None:
    """Send log records to stderr with timestamps; safe to call more than once."""
    logging.basicConfig(level=level, format=FORMAT, force=True, handlers=[ProgressBarHandler(sys.stderr)])


@contextlib.contextmanager
def log_duration(logger: logging.Logger, what: str) -> Iterator[None]:
    """Log when ``what`` starts and how many seconds it took."""
    logger.info("%s: started", what)
    start = time.perf_counter()
    yield
    logger.info("%s: finished in %.1f s", what, time.perf_counter() - start)
