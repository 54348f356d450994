"""Extract stage: turn the Open-I XML reports and image files into the tables later stages read.

Inputs: ``<raw_dir>/reports/**/*.xml`` and ``<raw_dir>/images/<image_id>.png``. Outputs, each
written atomically and sorted, so that the same input gives byte-identical files:

* ``<interim_dir>/reports.parquet``: one row per parsed report (``REPORTS_SCHEMA``).
* ``<interim_dir>/images.parquet``: one row per listed image id (``IMAGES_SCHEMA``).
* ``<interim_dir>/studies.parquet``: one row per study (image series) that has at least one
  image file and whose report passes the exclusion rules (``STUDIES_SCHEMA``).
* ``<interim_dir>/splits.parquet``: the split of each study (``SPLITS_SCHEMA``).
* ``<interim_dir>/exclusions.csv``: reports removed by each rule, in the order applied.
* ``<plots_dir>/images_per_report.csv`` and ``<plots_dir>/report_words.csv``: DVC plot data.
"""

from __future__ import annotations

import collections
import csv
import io
import logging
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.atomic import atomic_path, write_text
from pipeline.config import ExtractParams, SplitParams
from pipeline.errors import StageInputError
from pipeline.logs import log_duration
from pipeline.openi import OpenIReport, OpenIReports, natural_key, study_id_of
from pipeline.split import assign_splits

logger = logging.getLogger(__name__)

VIEWS = ("frontal", "lateral")
WORD_PATTERN = re.compile(r"\w+")
WORD_BUCKET_WIDTH = 10
WORD_BUCKET_OPEN_END = 100

_STRINGS = pa.list_(pa.string())
REPORTS_SCHEMA = pa.schema(
    [
        pa.field("report_id", pa.int64(), nullable=False),
        ("uid", pa.string()),
        ("findings", pa.string()),
        ("impression", pa.string()),
        ("indication", pa.string()),
        ("comparison", pa.string()),
        pa.field("mesh_major", _STRINGS, nullable=False),
        pa.field("mesh_automatic", _STRINGS, nullable=False),
        pa.field("image_ids", _STRINGS, nullable=False),
        pa.field("captions", _STRINGS, nullable=False),
        pa.field("source_file", pa.string(), nullable=False),
    ]
)
IMAGES_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("report_id", pa.int64(), nullable=False),
        ("study_id", pa.string()),
        pa.field("position", pa.int32(), nullable=False),
        pa.field("file", pa.string(), nullable=False),
        pa.field("exists", pa.bool_(), nullable=False),
        ("view", pa.string()),
    ]
)
STUDIES_SCHEMA = pa.schema(
    [
        pa.field("study_id", pa.string(), nullable=False),
        pa.field("report_id", pa.int64(), nullable=False),
        pa.field("image_ids", _STRINGS, nullable=False),
        pa.field("view_image_ids", _STRINGS, nullable=False),
        pa.field("single_view", pa.bool_(), nullable=False),
        pa.field("view_order", pa.string(), nullable=False),
        pa.field("n_images", pa.int32(), nullable=False),
    ]
)
SPLITS_SCHEMA = pa.schema(
    [
        pa.field("study_id", pa.string(), nullable=False),
        pa.field("report_id", pa.int64(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
    ]
)


def run(
    extract: ExtractParams,
    split: SplitParams,
    raw_dir: Path = Path("data/raw"),
    interim_dir: Path = Path("data/interim"),
    plots_dir: Path = Path("plots"),
) -> None:
    """Parse the reports, join them with the image files, split the studies and write every output.

    Raises FileNotFoundError when the report folder or ``extract.projections`` is missing,
    StageInputError when no report file is usable or the projections file is malformed, and
    AnnotationError (from ``pipeline.split``) for a missing or malformed R2Gen file. All of
    them are raised before anything is written. Bad report files and bad projection rows
    are skipped and logged instead.
    """
    with log_duration(logger, "extract"):
        reports = read_reports(Path(raw_dir) / "reports")
        views = read_projections(Path(extract.projections)) if extract.projections else {}
        images = build_images(reports, Path(raw_dir) / "images", views)
        usable = select_usable_images(images)
        kept_report_ids, exclusions = apply_exclusion_rules(reports, images, usable, extract.min_words)
        studies = build_studies(usable, kept_report_ids)
        splits = assign_splits(pd.DataFrame(studies, columns=["study_id", "report_id"]), split)
        _write_tables(Path(interim_dir), reports, images, studies, splits, exclusions)
        _write_plots(Path(plots_dir), reports)


def read_reports(reports_dir: Path) -> list[OpenIReport]:
    """Parse every report file below ``reports_dir``, raising StageInputError when none is usable."""
    collection = OpenIReports(reports_dir)
    if not collection.reports:
        raise StageInputError(
            f"{reports_dir}: no usable report file among {len(collection.skipped)} skipped; "
            "check that the download stage extracted NLMCXR_reports.tgz there"
        )
    return collection.reports


def read_projections(path: Path) -> dict[str, str]:
    """Read a CSV with columns image_id,view and return the view (frontal or lateral) of each image.

    Views are matched without regard to case. Rows with another view, a blank image id, or a
    view that contradicts an earlier row for the same image are skipped and counted in one
    warning that names the file.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: projections file not found; fix extract.projections or set it to null"
        ) from None
    except UnicodeDecodeError as error:
        raise StageInputError(f"{path}: projections file is not UTF-8: {error}") from None
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None or not {"image_id", "view"} <= set(reader.fieldnames):
        raise StageInputError(f"{path}: expected CSV columns image_id,view, found {reader.fieldnames}")
    views: dict[str, str] = {}
    contradicted: set[str] = set()
    invalid = 0
    for row in reader:
        image_id = (row["image_id"] or "").strip()
        view = (row["view"] or "").strip().lower()
        if not image_id or view not in VIEWS:
            invalid += 1
        elif views.setdefault(image_id, view) != view:
            contradicted.add(image_id)
    for image_id in contradicted:
        del views[image_id]
    if invalid or contradicted:
        logger.warning(
            "%s: skipped %d rows without an image id or with a view other than frontal or lateral, "
            "and dropped %d images labelled both frontal and lateral",
            path,
            invalid,
            len(contradicted),
        )
    logger.info("%s: read view labels for %d images", path, len(views))
    return views


def build_images(reports: list[OpenIReport], images_dir: Path, views: dict[str, str]) -> list[dict[str, Any]]:
    """Return one row per listed image id, in report order and then document order.

    An image id listed by more than one report stays with the lowest report id and is
    logged as a warning, so ``image_id`` is unique.
    """
    present = list_image_files(images_dir)
    owner: dict[str, OpenIReport] = {}
    rows: list[dict[str, Any]] = []
    for report in sorted(reports, key=lambda report: report.report_id):
        for position, image_id in enumerate(report.image_ids):
            if image_id in owner:
                logger.warning(
                    "image %s is listed by report %d (%s) and report %d (%s); kept it with report %d",
                    image_id,
                    owner[image_id].report_id,
                    owner[image_id].source_file,
                    report.report_id,
                    report.source_file,
                    owner[image_id].report_id,
                )
                continue
            owner[image_id] = report
            file = f"{image_id}.png"
            rows.append(
                {
                    "image_id": image_id,
                    "report_id": report.report_id,
                    "study_id": study_id_of(image_id),
                    "position": position,
                    "file": file,
                    "exists": file in present,
                    "view": views.get(image_id),
                }
            )
    _log_image_counts(rows, views, images_dir)
    return rows


def list_image_files(images_dir: Path) -> set[str]:
    """Return the names of the regular files in ``images_dir``, or an empty set if it does not exist."""
    if not images_dir.is_dir():
        logger.warning("%s: image folder not found; every image counts as missing", images_dir)
        return set()
    with os.scandir(images_dir) as entries:
        return {entry.name for entry in entries if entry.is_file()}


def select_usable_images(images: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return the images that have a file and a study id, leaving out series claimed by two reports.

    Open-I never lists one series under two reports, but if a file does, the series stays
    with the lowest report id so that a study belongs to one report (one patient).
    """
    owner: dict[str, int] = {}
    for image in images:
        if image["study_id"] is not None:
            owner[image["study_id"]] = min(owner.get(image["study_id"], image["report_id"]), image["report_id"])
    usable: list[dict[str, Any]] = []
    for image in images:
        if not image["exists"] or image["study_id"] is None:
            continue
        if owner[image["study_id"]] != image["report_id"]:
            logger.warning(
                "image %s of report %d is left out: its series %s belongs to report %d",
                image["image_id"],
                image["report_id"],
                image["study_id"],
                owner[image["study_id"]],
            )
            continue
        usable.append(image)
    return usable


def apply_exclusion_rules(
    reports: list[OpenIReport], images: list[dict[str, Any]], usable: list[dict[str, Any]], min_words: int
) -> tuple[set[int], list[dict[str, Any]]]:
    """Apply the exclusion rules in order and return the report ids left and one CSV row per rule.

    * ``no_images``: the report lists no image id (after invalid and repeated ids are dropped).
    * ``no_findings_and_no_impression``: both sections are empty, or together they have fewer
      than ``min_words`` words.
    * ``image_files_missing``: none of the report's images is usable (file present, study id
      known, series not claimed by another report).
    """
    listed = {image["report_id"] for image in images}
    with_files = {image["report_id"] for image in usable}
    rules: dict[str, Callable[[OpenIReport], bool]] = {
        "no_images": lambda report: report.report_id not in listed,
        "no_findings_and_no_impression": lambda report: lacks_text(report, min_words),
        "image_files_missing": lambda report: report.report_id not in with_files,
    }
    remaining = list(reports)
    rows = [{"rule": "all_reports", "reports_removed": 0, "reports_remaining": len(remaining)}]
    for rule, excludes in rules.items():
        passing = [report for report in remaining if not excludes(report)]
        removed = len(remaining) - len(passing)
        rows.append({"rule": rule, "reports_removed": removed, "reports_remaining": len(passing)})
        logger.info("exclusion %s: removed %d reports, %d remain", rule, removed, len(passing))
        remaining = passing
    return {report.report_id for report in remaining}, rows


def lacks_text(report: OpenIReport, min_words: int) -> bool:
    """Return whether findings and impression are both empty or have fewer than ``min_words`` words."""
    if report.findings is None and report.impression is None:
        return True
    return count_words(report) < min_words


def count_words(report: OpenIReport) -> int:
    """Count the words (runs of letters and digits, ``XXXX`` included) in findings and impression."""
    return sum(len(WORD_PATTERN.findall(text or "")) for text in (report.findings, report.impression))


def build_studies(usable: list[dict[str, Any]], report_ids: set[int]) -> list[dict[str, Any]]:
    """Return one row per study of a kept report, sorted by study id in natural order."""
    grouped: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for image in usable:
        if image["report_id"] in report_ids:
            grouped[image["study_id"]].append(image)
    studies = [_study_row(study_id, images) for study_id, images in grouped.items()]
    studies.sort(key=lambda study: natural_key(study["study_id"]))
    single = sum(study["single_view"] for study in studies)
    labelled = sum(study["view_order"] == "labelled" for study in studies)
    logger.info(
        "built %d studies from %d reports: %d with a single image, %d ordered by view labels",
        len(studies),
        len(report_ids),
        single,
        labelled,
    )
    return studies


def choose_view_images(image_ids: list[str], view_of: dict[str, str | None]) -> list[str]:
    """Return two image ids to use as the study's views, frontal first when views are labelled.

    ``image_ids`` must be in natural order. The first frontal and the first lateral image are
    taken when they exist, and any other slot is filled in the order frontal, lateral,
    unlabelled. A study with one image gets that image twice.
    """
    frontal = [image_id for image_id in image_ids if view_of.get(image_id) == "frontal"]
    lateral = [image_id for image_id in image_ids if view_of.get(image_id) == "lateral"]
    unlabelled = [image_id for image_id in image_ids if view_of.get(image_id) not in VIEWS]
    chosen = frontal[:1] + lateral[:1]
    chosen += [image_id for image_id in frontal + lateral + unlabelled if image_id not in chosen]
    chosen = chosen[:2]
    return chosen * 2 if len(chosen) == 1 else chosen


def _study_row(study_id: str, images: list[dict[str, Any]]) -> dict[str, Any]:
    image_ids = sorted((image["image_id"] for image in images), key=natural_key)
    view_of = {image["image_id"]: image["view"] for image in images}
    labelled = any(view is not None for view in view_of.values())
    return {
        "study_id": study_id,
        "report_id": images[0]["report_id"],
        "image_ids": image_ids,
        "view_image_ids": choose_view_images(image_ids, view_of if labelled else {}),
        "single_view": len(image_ids) == 1,
        "view_order": "labelled" if labelled else "image_id",
        "n_images": len(image_ids),
    }


def images_per_report(reports: list[OpenIReport]) -> list[tuple[int, int]]:
    """Return (images listed, reports) for every image count from 0 to the maximum."""
    counts = collections.Counter(len(report.image_ids) for report in reports)
    return [(images, counts.get(images, 0)) for images in range(max(counts, default=0) + 1)]


def report_words(reports: list[OpenIReport]) -> list[tuple[str, int]]:
    """Return (word bucket, reports) for the words in findings and impression, every bucket included.

    Buckets are ``0``, ``1-9``, ``10-19`` and so on up to ``100+``.
    """
    counts = collections.Counter(word_bucket(count_words(report)) for report in reports)
    inner = [word_bucket(words) for words in range(1, WORD_BUCKET_OPEN_END, WORD_BUCKET_WIDTH)]
    labels = [word_bucket(0), *inner, word_bucket(WORD_BUCKET_OPEN_END)]
    return [(label, counts.get(label, 0)) for label in labels]


def word_bucket(words: int) -> str:
    """Return the plot bucket of a word count: ``0``, ``1-9``, ``10-19``, ... or ``100+``."""
    if words == 0:
        return "0"
    if words >= WORD_BUCKET_OPEN_END:
        return f"{WORD_BUCKET_OPEN_END}+"
    low = words // WORD_BUCKET_WIDTH * WORD_BUCKET_WIDTH
    return f"{max(low, 1)}-{low + WORD_BUCKET_WIDTH - 1}"


def write_parquet(target: Path, rows: Iterable[dict[str, Any]], schema: pa.Schema) -> None:
    """Write ``rows`` as a Parquet file with ``schema``, atomically."""
    table = pa.Table.from_pylist(list(rows), schema=schema)
    with atomic_path(target) as temporary:
        pq.write_table(table, temporary)
    logger.info("wrote %s (%d rows)", target, table.num_rows)


def write_csv(target: Path, header: list[str], rows: Iterable[Iterable[Any]]) -> None:
    """Write a CSV file with ``\\n`` line endings, atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_text(target, buffer.getvalue())
    logger.info("wrote %s", target)


def _write_tables(
    interim_dir: Path,
    reports: list[OpenIReport],
    images: list[dict[str, Any]],
    studies: list[dict[str, Any]],
    splits: pd.DataFrame,
    exclusions: list[dict[str, Any]],
) -> None:
    report_rows = [vars(report) for report in sorted(reports, key=lambda report: report.report_id)]
    write_parquet(interim_dir / "reports.parquet", report_rows, REPORTS_SCHEMA)
    write_parquet(interim_dir / "images.parquet", images, IMAGES_SCHEMA)
    write_parquet(interim_dir / "studies.parquet", studies, STUDIES_SCHEMA)
    split_rows = [
        {"study_id": str(row.study_id), "report_id": int(row.report_id), "split": str(row.split)}
        for row in splits.itertuples(index=False)
    ]
    write_parquet(interim_dir / "splits.parquet", split_rows, SPLITS_SCHEMA)
    exclusion_header = ["rule", "reports_removed", "reports_remaining"]
    write_csv(
        interim_dir / "exclusions.csv", exclusion_header, ([row[key] for key in exclusion_header] for row in exclusions)
    )


def _write_plots(plots_dir: Path, reports: list[OpenIReport]) -> None:
    write_csv(plots_dir / "images_per_report.csv", ["images", "reports"], images_per_report(reports))
    write_csv(plots_dir / "report_words.csv", ["words", "reports"], report_words(reports))


def _log_image_counts(rows: list[dict[str, Any]], views: dict[str, str], images_dir: Path) -> None:
    present = sum(row["exists"] for row in rows)
    no_study = [row["image_id"] for row in rows if row["study_id"] is None]
    logger.info(
        "%d listed images, %d with a file in %s, %d missing", len(rows), present, images_dir, len(rows) - present
    )
    if no_study:
        logger.warning(
            "%d image ids have no study (series) id and are left out, for example %s", len(no_study), no_study[0]
        )
    if views:
        labelled = sum(row["view"] is not None for row in rows)
        unused = len(set(views) - {row["image_id"] for row in rows})
        logger.info("view labels: %d listed images labelled; %d labels name unlisted images", labelled, unused)
