"""Checks on cached artifacts that stop a stage with the study ids at fault."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError

ROWS_PER_CHECK = 256
IDS_SHOWN = 10


class NonFiniteFeaturesError(PipelineError, ValueError):
    """Raised when cached image features contain NaN or infinite values."""


def require_finite(values: np.ndarray, study_ids: list[str], source: Path | str) -> None:
    """Raise NonFiniteFeaturesError naming every study whose features are not all finite.

    ``values`` has one row per study, shape (studies, ...), in the order of ``study_ids``.
    Rows are checked in blocks, so the check needs little memory beyond ``values``.
    """
    if len(values) != len(study_ids):
        raise ValueError(f"{len(values)} feature rows for {len(study_ids)} study ids")

    bad_rows: list[int] = []
    for start in range(0, len(values), ROWS_PER_CHECK):
        block = np.asarray(values[start : start + ROWS_PER_CHECK])
        finite = np.isfinite(block).reshape(len(block), -1).all(axis=1)
        bad_rows.extend(start + int(row) for row in np.flatnonzero(~finite))
    if not bad_rows:
        return

    named = ", ".join(study_ids[row] for row in bad_rows[:IDS_SHOWN])
    more = f" and {len(bad_rows) - IDS_SHOWN} more" if len(bad_rows) > IDS_SHOWN else ""
    raise NonFiniteFeaturesError(
        f"{source}: the features of {len(bad_rows)} studies contain NaN or infinite values: {named}{more}. "
        "Re-run the featurize stage (dvc repro -f featurize); if the values come back, check featurize.weights "
        "and use featurize.storage_dtype float32, because float16 turns values above 65504 into infinity"
    )
