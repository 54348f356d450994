"""Assign studies (image series) to train, val and test without splitting a patient."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import SplitParams
from pipeline.errors import PipelineError
from pipeline.openi import natural_key, study_id_of

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")
UNASSIGNED = "unassigned"
COLUMNS = ["study_id", "report_id", "split"]


class AnnotationError(PipelineError, ValueError):
    """Raised when the R2Gen annotation file is missing or malformed. The message names the file."""


def assign_splits(studies: pd.DataFrame, params: SplitParams) -> pd.DataFrame:
    """Return the split of each study as columns study_id, report_id, split, sorted by study_id.

    ``grouped`` shuffles the distinct report ids with ``params.seed`` and gives the first
    ``test_fraction`` of them (rounded) to test and the next ``val_fraction`` to val. One
    report is one patient, so all series of a report land in the same split. The report ids
    are sorted before shuffling, so the result does not depend on row order.

    ``r2gen`` copies the split of R2Gen's ``annotation.json``, and studies that it does not
    list get ``unassigned``. Raises AnnotationError when that file is missing or malformed, and
    ValueError when ``studies`` lacks a column or gives one study two report ids.
    """
    pairs = _study_report_pairs(studies)
    if params.method == "grouped":
        split_of_report = grouped_report_splits(pairs["report_id"].tolist(), params)
        splits = pairs["report_id"].map(split_of_report)
    else:
        splits = _r2gen_splits(pairs["study_id"], pairs["report_id"], Path(str(params.annotation)))
    result = pairs.assign(split=splits.to_numpy())[COLUMNS]
    _log_counts(result, params.method)
    return result


def grouped_report_splits(report_ids: list[int], params: SplitParams) -> dict[int, str]:
    """Map each distinct report id to train, val or test by a seeded shuffle of the sorted ids."""
    distinct = sorted(set(report_ids))
    order = np.random.default_rng(params.seed).permutation(len(distinct))
    n_test = _rounded_count(len(distinct), params.test_fraction)
    n_val = _rounded_count(len(distinct), params.val_fraction)
    split_of_report: dict[int, str] = {}
    for rank, index in enumerate(order):
        if rank < n_test:
            split_of_report[distinct[index]] = "test"
        elif rank < n_test + n_val:
            split_of_report[distinct[index]] = "val"
        else:
            split_of_report[distinct[index]] = "train"
    return split_of_report


def read_r2gen_annotation(path: Path) -> dict[str, str]:
    """Read R2Gen's ``annotation.json`` and return the split of each study id it lists.

    The file maps ``train``, ``val`` and ``test`` to lists of entries with a string ``id``,
    for example ``{"id": "CXR2384_IM-0942", ...}``. For images with odd ids such as
    ``CXR2372_IM-0933-0001-0002``, R2Gen's id keeps one more number (``CXR2372_IM-0933-0001``),
    so every id is reduced to its series id with ``study_id_of``. In the published file 136
    of 2,955 ids are reduced and no two of them collide.
    """
    data = _load_json(path)
    if not isinstance(data, dict):
        raise AnnotationError(
            f"{path}: expected a JSON object with keys train, val and test, got {type(data).__name__}"
        )
    split_of_study: dict[str, str] = {}
    for split in SPLIT_NAMES:
        entries = data.get(split)
        if not isinstance(entries, list):
            raise AnnotationError(f"{path}: missing list {split!r}; expected keys train, val and test")
        for position, entry in enumerate(entries):
            study_id = entry.get("id") if isinstance(entry, dict) else None
            if not isinstance(study_id, str) or not study_id:
                raise AnnotationError(f"{path}: {split}[{position}] has no string 'id'")
            series_id = study_id_of(study_id) or study_id
            previous = split_of_study.setdefault(series_id, split)
            if previous != split:
                raise AnnotationError(f"{path}: study {series_id} is listed in both {previous} and {split}")
    extra = sorted(set(data) - set(SPLIT_NAMES))
    if extra:
        logger.warning("%s: ignored keys other than train, val and test: %s", path, ", ".join(map(str, extra)))
    return split_of_study


def _study_report_pairs(studies: pd.DataFrame) -> pd.DataFrame:
    missing = [column for column in ("study_id", "report_id") if column not in studies.columns]
    if missing:
        raise ValueError(f"studies table lacks column(s) {', '.join(missing)}; expected study_id and report_id")
    pairs = studies[["study_id", "report_id"]].drop_duplicates()
    pairs = pairs.astype({"study_id": str, "report_id": "int64"})
    repeated = pairs["study_id"].duplicated(keep=False)
    if repeated.any():
        example = pairs.loc[repeated].sort_values(["study_id", "report_id"]).head(2)
        raise ValueError(
            f"study {example['study_id'].iloc[0]} belongs to reports {', '.join(map(str, example['report_id']))}; "
            "each study must belong to one report"
        )
    study_ids = pairs["study_id"].tolist()
    order = sorted(range(len(study_ids)), key=lambda row: natural_key(study_ids[row]))
    return pairs.iloc[order].reset_index(drop=True)


def _r2gen_splits(study_ids: pd.Series, report_ids: pd.Series, path: Path) -> pd.Series:
    split_of_study = read_r2gen_annotation(path)
    splits = study_ids.map(split_of_study).fillna(UNASSIGNED)
    unassigned = study_ids[splits == UNASSIGNED]
    if len(unassigned):
        logger.warning(
            "%d of %d studies are not in %s and get split %r, for example %s",
            len(unassigned),
            len(study_ids),
            path,
            UNASSIGNED,
            ", ".join(unassigned.head(5)),
        )
    _warn_reports_across_splits(splits, report_ids)
    absent = len(set(split_of_study) - set(study_ids))
    if absent:
        logger.info(
            "%d of %d studies listed in %s are not among the studies to split", absent, len(split_of_study), path
        )
    return splits


def _warn_reports_across_splits(splits: pd.Series, report_ids: pd.Series) -> None:
    """Warn when R2Gen puts two series of one report (one patient) into different splits."""
    assigned = pd.DataFrame({"report_id": report_ids, "split": splits}).loc[splits != UNASSIGNED]
    split_counts = assigned.groupby("report_id")["split"].nunique()
    leaking = split_counts[split_counts > 1].index.tolist()
    if leaking:
        logger.warning(
            "%d reports have series in more than one R2Gen split, for example report %s",
            len(leaking),
            leaking[0],
        )


def _load_json(path: Path) -> object:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AnnotationError(f"{path}: R2Gen annotation file not found; set split.annotation to its path") from None
    except (OSError, UnicodeDecodeError) as error:
        raise AnnotationError(f"{path}: cannot read the R2Gen annotation file: {error}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise AnnotationError(f"{path}: invalid JSON: {error}") from None


def _rounded_count(total: int, fraction: float) -> int:
    """Return ``total * fraction`` rounded half up (0.5 becomes 1), unlike ``round``, which rounds half to even."""
    return math.floor(total * fraction + 0.5)


def _log_counts(result: pd.DataFrame, method: str) -> None:
    counts = result["split"].value_counts()
    summary = ", ".join(f"{name} {int(counts.get(name, 0))}" for name in (*SPLIT_NAMES, UNASSIGNED))
    logger.info(
        "split %s: %d studies (%s) from %d reports", method, len(result), summary, result["report_id"].nunique()
    )
    if counts.get("train", 0) == 0 and len(result):
        logger.warning("split %s: no study is in train", method)
