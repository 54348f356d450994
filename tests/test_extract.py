"""Tests for pipeline.extract: the tables, exclusions and plots written from a tree of report files."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import tarfile
from pathlib import Path
from xml.sax.saxutils import escape

import pyarrow.parquet as pq
import pytest

from pipeline.config import ExtractParams, SplitParams
from pipeline.extract import IMAGES_SCHEMA, REPORTS_SCHEMA, SPLITS_SCHEMA, STUDIES_SCHEMA, run, word_bucket

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CXRGEN_SHARED", REPO_ROOT.parent / "shared"))
REPORTS_ARCHIVE = SHARED / "data" / "openi" / "NLMCXR_reports.tgz"
ANNOTATION = SHARED / "data" / "r2gen" / "annotation.json"
SECRET = "SECRET-51c0e2-do-not-leak"
TABLES = ("reports", "images", "studies", "splits")


def report_xml(report_id: int, findings: str | None, impression: str | None, images: tuple[str, ...]) -> bytes:
    sections = {"COMPARISON": "None.", "INDICATION": "Cough", "FINDINGS": findings, "IMPRESSION": impression}
    abstract = "".join(
        f'<AbstractText Label="{label}"/>'
        if text is None
        else f'<AbstractText Label="{label}">{escape(text)}</AbstractText>'
        for label, text in sections.items()
    )
    parents = "".join(
        f'<parentImage id="{image_id}"><caption>PA and Lateral Chest</caption></parentImage>' for image_id in images
    )
    return (
        f'<?xml version="1.0" encoding="utf-8"?>\n<eCitation><uId id="CXR{report_id}"/><IUXRId id="{report_id}"/>'
        f"<Abstract>{abstract}</Abstract><MeSH><major>normal</major></MeSH>{parents}</eCitation>\n"
    ).encode()


# report id: (findings, impression, listed images, images with a file)
FAKE_REPORTS: dict[int, tuple[str | None, str | None, tuple[str, ...], tuple[str, ...]]] = {
    1: (
        "The heart is normal.",
        "No acute disease.",
        ("CXR1_IM-0001-1001", "CXR1_IM-0001-2001"),
        ("CXR1_IM-0001-1001", "CXR1_IM-0001-2001"),
    ),
    2: (
        "Bibasilar opacities.",
        "Atelectasis.",
        ("CXR2_IM-0001-2001", "CXR2_IM-0001-1001", "CXR2_IM-0013-1001"),
        ("CXR2_IM-0001-2001", "CXR2_IM-0001-1001", "CXR2_IM-0013-1001"),
    ),
    3: ("Clear lungs.", "Normal chest.", (), ()),
    4: (None, None, ("CXR4_IM-0004-1001",), ("CXR4_IM-0004-1001",)),
    5: (None, "Normal.", ("CXR5_IM-0005-1001", "CXR5_IM-0005-2001"), ("CXR5_IM-0005-1001", "CXR5_IM-0005-2001")),
    6: ("Small effusion.", "Effusion.", ("CXR6_IM-0006-1001", "CXR6_IM-0006-2001"), ()),
    7: (
        "Opacité basale droite, XXXX.",
        "Pneumonie.",
        ("CXR7_IM-0007-1001", "CXR7_IM-0007-2001"),
        ("CXR7_IM-0007-2001",),
    ),
    8: ("Stable heart size.", "No change.", ("CXR1_IM-0001-2001", "CXR8_IM-0008-1001"), ("CXR8_IM-0008-1001",)),
    12: (
        "Lines and tubes in place.",
        "Stable.",
        ("CXR12_IM-0100-2001", "CXR12_IM-0100-0001-0002", "CXR12_IM-0100-0001-0001"),
        ("CXR12_IM-0100-2001", "CXR12_IM-0100-0001-0002", "CXR12_IM-0100-0001-0001"),
    ),
}


def make_raw_tree(raw_dir: Path, secret_file: Path) -> None:
    """Write the fake reports, their image files, and three bad report files."""
    reports_dir = raw_dir / "reports" / "ecgen-radiology"
    images_dir = raw_dir / "images"
    reports_dir.mkdir(parents=True)
    images_dir.mkdir(parents=True)
    for report_id, (findings, impression, images, files) in FAKE_REPORTS.items():
        (reports_dir / f"{report_id}.xml").write_bytes(report_xml(report_id, findings, impression, images))
        for image_id in files:
            (images_dir / f"{image_id}.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (reports_dir / "9.xml").write_bytes(b"<eCitation><IUXRId id='9'/>")
    (reports_dir / "10.xml").write_bytes(b"")
    doctype = f'<!DOCTYPE eCitation [<!ENTITY leak SYSTEM "{secret_file.as_uri()}">]>\n'
    leaking = report_xml(11, "See &leak; here.", "Normal.", ("CXR11_IM-0011-1001",)).replace(
        b"\n<eCitation>", f"\n{doctype}<eCitation>".encode()
    )
    (reports_dir / "11.xml").write_bytes(leaking)
    (images_dir / "CXR11_IM-0011-1001.png").write_bytes(b"\x89PNG\r\n\x1a\n")


@pytest.fixture
def raw_dir(tmp_path: Path) -> Path:
    secret_file = tmp_path / "secret.txt"
    secret_file.write_text(SECRET, encoding="utf-8")
    make_raw_tree(tmp_path / "raw", secret_file)
    return tmp_path / "raw"


def run_extract(
    raw_dir: Path, out_dir: Path, extract: ExtractParams | None = None, split: SplitParams | None = None
) -> dict[str, list[dict]]:
    run(extract or ExtractParams(), split or SplitParams(), raw_dir, out_dir / "interim", out_dir / "plots")
    return {name: pq.read_table(out_dir / "interim" / f"{name}.parquet").to_pylist() for name in TABLES}


def read_csv(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def test_tables_have_declared_schemas(raw_dir: Path, tmp_path: Path) -> None:
    run_extract(raw_dir, tmp_path / "out")

    interim = tmp_path / "out" / "interim"
    for name, schema in zip(TABLES, (REPORTS_SCHEMA, IMAGES_SCHEMA, STUDIES_SCHEMA, SPLITS_SCHEMA), strict=True):
        assert pq.read_schema(interim / f"{name}.parquet").remove_metadata() == schema
    leftovers = [path.name for path in (tmp_path / "out").rglob("*") if ".tmp" in path.name]
    assert leftovers == []


def test_reports_table_rows(raw_dir: Path, tmp_path: Path) -> None:
    reports = run_extract(raw_dir, tmp_path / "out")["reports"]

    assert [row["report_id"] for row in reports] == [1, 2, 3, 4, 5, 6, 7, 8, 12]
    by_id = {row["report_id"]: row for row in reports}
    assert by_id[7]["findings"] == "Opacité basale droite, XXXX."
    assert by_id[4]["findings"] is None
    assert by_id[3]["image_ids"] == []
    assert by_id[2]["image_ids"] == ["CXR2_IM-0001-2001", "CXR2_IM-0001-1001", "CXR2_IM-0013-1001"]
    assert by_id[2]["mesh_major"] == ["normal"]
    assert by_id[2]["captions"] == ["PA and Lateral Chest"] * 3
    assert by_id[2]["source_file"] == "ecgen-radiology/2.xml"


def test_images_table_rows(raw_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pipeline.extract"):
        images = run_extract(raw_dir, tmp_path / "out")["images"]

    image_ids = [row["image_id"] for row in images]
    assert len(image_ids) == len(set(image_ids))
    by_id = {row["image_id"]: row for row in images}
    assert by_id["CXR1_IM-0001-2001"]["report_id"] == 1
    assert "image CXR1_IM-0001-2001 is listed by report 1" in caplog.text
    assert by_id["CXR8_IM-0008-1001"]["position"] == 1
    assert by_id["CXR2_IM-0013-1001"] == {
        "image_id": "CXR2_IM-0013-1001",
        "report_id": 2,
        "study_id": "CXR2_IM-0013",
        "position": 2,
        "file": "CXR2_IM-0013-1001.png",
        "exists": True,
        "view": None,
    }
    assert by_id["CXR12_IM-0100-0001-0002"]["study_id"] == "CXR12_IM-0100"
    assert by_id["CXR7_IM-0007-1001"]["exists"] is False
    assert by_id["CXR6_IM-0006-2001"]["exists"] is False
    assert [(row["report_id"], row["position"]) for row in images] == sorted(
        (row["report_id"], row["position"]) for row in images
    )


def test_studies_table_rows(raw_dir: Path, tmp_path: Path) -> None:
    studies = run_extract(raw_dir, tmp_path / "out")["studies"]

    assert [row["study_id"] for row in studies] == [
        "CXR1_IM-0001",
        "CXR2_IM-0001",
        "CXR2_IM-0013",
        "CXR5_IM-0005",
        "CXR7_IM-0007",
        "CXR8_IM-0008",
        "CXR12_IM-0100",
    ]
    by_id = {row["study_id"]: row for row in studies}
    assert by_id["CXR2_IM-0001"]["image_ids"] == ["CXR2_IM-0001-1001", "CXR2_IM-0001-2001"]
    assert by_id["CXR2_IM-0001"]["view_image_ids"] == ["CXR2_IM-0001-1001", "CXR2_IM-0001-2001"]
    assert by_id["CXR2_IM-0013"]["view_image_ids"] == ["CXR2_IM-0013-1001", "CXR2_IM-0013-1001"]
    assert by_id["CXR2_IM-0013"]["single_view"] is True
    assert by_id["CXR7_IM-0007"]["image_ids"] == ["CXR7_IM-0007-2001"]
    assert by_id["CXR7_IM-0007"]["n_images"] == 1
    assert by_id["CXR12_IM-0100"]["image_ids"] == [
        "CXR12_IM-0100-0001-0001",
        "CXR12_IM-0100-0001-0002",
        "CXR12_IM-0100-2001",
    ]
    assert by_id["CXR12_IM-0100"]["view_image_ids"] == ["CXR12_IM-0100-0001-0001", "CXR12_IM-0100-0001-0002"]
    assert by_id["CXR12_IM-0100"]["single_view"] is False
    assert {row["view_order"] for row in studies} == {"image_id"}
    assert all(len(row["view_image_ids"]) == 2 for row in studies)


def test_exclusions_counted_in_order(raw_dir: Path, tmp_path: Path) -> None:
    run_extract(raw_dir, tmp_path / "out", ExtractParams(min_words=2))

    assert read_csv(tmp_path / "out" / "interim" / "exclusions.csv") == [
        ["rule", "reports_removed", "reports_remaining"],
        ["all_reports", "0", "9"],
        ["no_images", "1", "8"],
        ["no_findings_and_no_impression", "2", "6"],
        ["image_files_missing", "1", "5"],
    ]


def test_default_min_words_keeps_short_report(raw_dir: Path, tmp_path: Path) -> None:
    studies = run_extract(raw_dir, tmp_path / "out")["studies"]

    assert "CXR5_IM-0005" in {row["study_id"] for row in studies}
    assert "CXR4_IM-0004" not in {row["study_id"] for row in studies}


def test_splits_keep_reports_together(raw_dir: Path, tmp_path: Path) -> None:
    tables = run_extract(raw_dir, tmp_path / "out", split=SplitParams(val_fraction=0.3, test_fraction=0.3))

    splits = tables["splits"]
    assert [row["study_id"] for row in splits] == [row["study_id"] for row in tables["studies"]]
    split_of_report: dict[int, set[str]] = {}
    for row in splits:
        split_of_report.setdefault(row["report_id"], set()).add(row["split"])
    assert all(len(names) == 1 for names in split_of_report.values())
    assert {name for names in split_of_report.values() for name in names} <= {"train", "val", "test"}


def test_secret_never_written(raw_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        run_extract(raw_dir, tmp_path / "out")

    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in caplog.text
    assert "skipped report file ecgen-radiology/11.xml" in caplog.text
    assert "skipped report file ecgen-radiology/9.xml" in caplog.text
    assert "skipped report file ecgen-radiology/10.xml" in caplog.text


def test_outputs_byte_identical(raw_dir: Path, tmp_path: Path) -> None:
    run_extract(raw_dir, tmp_path / "first")
    run_extract(raw_dir, tmp_path / "second")

    first = sorted(path.relative_to(tmp_path / "first") for path in (tmp_path / "first").rglob("*") if path.is_file())
    second = sorted(
        path.relative_to(tmp_path / "second") for path in (tmp_path / "second").rglob("*") if path.is_file()
    )
    assert first == second
    assert len(first) == 7
    for relative in first:
        assert (tmp_path / "first" / relative).read_bytes() == (tmp_path / "second" / relative).read_bytes(), relative


def test_projections_put_frontal_first(raw_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    projections = tmp_path / "projections.csv"
    projections.write_text(
        "image_id,view\n"
        "CXR1_IM-0001-1001,Lateral\n"
        "CXR1_IM-0001-2001,frontal\n"
        "CXR2_IM-0001-1001,oblique\n"
        "CXR2_IM-0001-2001,frontal\n"
        "CXR2_IM-0001-2001,lateral\n"
        ",frontal\n",
        encoding="utf-8",
    )

    with caplog.at_level(logging.WARNING, logger="pipeline.extract"):
        tables = run_extract(raw_dir, tmp_path / "out", ExtractParams(projections=str(projections)))

    studies = {row["study_id"]: row for row in tables["studies"]}
    assert studies["CXR1_IM-0001"]["view_image_ids"] == ["CXR1_IM-0001-2001", "CXR1_IM-0001-1001"]
    assert studies["CXR1_IM-0001"]["view_order"] == "labelled"
    assert studies["CXR2_IM-0001"]["view_order"] == "image_id"
    views = {row["image_id"]: row["view"] for row in tables["images"]}
    assert views["CXR1_IM-0001-1001"] == "lateral"
    assert views["CXR2_IM-0001-2001"] is None
    assert "skipped 2 rows" in caplog.text
    assert "dropped 1 images labelled both frontal and lateral" in caplog.text
    assert str(projections) in caplog.text


def test_missing_projections_file_raises(raw_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "absent.csv"

    with pytest.raises(FileNotFoundError, match=r"absent\.csv"):
        run_extract(raw_dir, tmp_path / "out", ExtractParams(projections=str(missing)))

    assert not (tmp_path / "out").exists()


def test_projections_without_view_column_raise(raw_dir: Path, tmp_path: Path) -> None:
    projections = tmp_path / "projections.csv"
    projections.write_text("image_id,projection\nCXR1_IM-0001-1001,Frontal\n", encoding="utf-8")

    with pytest.raises(ValueError, match="expected CSV columns image_id,view"):
        run_extract(raw_dir, tmp_path / "out", ExtractParams(projections=str(projections)))


def test_missing_image_folder_excludes_all(raw_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    shutil.rmtree(raw_dir / "images")

    with caplog.at_level(logging.WARNING, logger="pipeline.extract"):
        tables = run_extract(raw_dir, tmp_path / "out")

    assert tables["studies"] == []
    assert tables["splits"] == []
    assert not any(row["exists"] for row in tables["images"])
    assert read_csv(tmp_path / "out" / "interim" / "exclusions.csv")[-1] == ["image_files_missing", "7", "0"]
    assert "image folder not found" in caplog.text


def test_no_usable_report_raises(tmp_path: Path) -> None:
    reports_dir = tmp_path / "raw" / "reports" / "ecgen-radiology"
    reports_dir.mkdir(parents=True)
    (reports_dir / "1.xml").write_bytes(b"not xml")

    with pytest.raises(ValueError, match="no usable report file among 1 skipped"):
        run_extract(tmp_path / "raw", tmp_path / "out")

    assert not (tmp_path / "out").exists()


def test_plot_files(raw_dir: Path, tmp_path: Path) -> None:
    run_extract(raw_dir, tmp_path / "out")

    images_per_report = read_csv(tmp_path / "out" / "plots" / "images_per_report.csv")
    assert images_per_report == [["images", "reports"], ["0", "1"], ["1", "1"], ["2", "5"], ["3", "2"]]
    report_words = read_csv(tmp_path / "out" / "plots" / "report_words.csv")
    assert report_words[0] == ["words", "reports"]
    assert report_words[1] == ["0", "1"]
    assert report_words[2] == ["1-9", "8"]
    assert report_words[-1] == ["100+", "0"]
    assert len(report_words) == 13


@pytest.mark.parametrize(
    ("words", "bucket"), [(0, "0"), (1, "1-9"), (9, "1-9"), (10, "10-19"), (99, "90-99"), (100, "100+"), (232, "100+")]
)
def test_word_bucket(words: int, bucket: str) -> None:
    assert word_bucket(words) == bucket


def test_real_archive_exclusions_and_r2gen(tmp_path: Path) -> None:
    if not REPORTS_ARCHIVE.is_file() or not ANNOTATION.is_file():
        pytest.fail(f"{REPORTS_ARCHIVE} or {ANNOTATION} not found; set CXRGEN_SHARED to the shared data folder")
    raw_dir = tmp_path / "raw"
    with tarfile.open(REPORTS_ARCHIVE, "r:gz") as archive:
        archive.extractall(raw_dir / "reports", filter="data")
    images_dir = raw_dir / "images"
    images_dir.mkdir()
    missing_reports = {1, 2, 1015}
    for path in (raw_dir / "reports" / "ecgen-radiology").glob("*.xml"):
        if int(path.stem) not in missing_reports:
            for image_id in _listed_image_ids(path):
                (images_dir / f"{image_id}.png").touch()
    split = SplitParams(method="r2gen", annotation=str(ANNOTATION))

    tables = run_extract(raw_dir, tmp_path / "out", split=split)

    assert read_csv(tmp_path / "out" / "interim" / "exclusions.csv")[1:] == [
        ["all_reports", "0", "3955"],
        ["no_images", "104", "3851"],
        ["no_findings_and_no_impression", "25", "3826"],
        ["image_files_missing", "3", "3823"],
    ]
    assert len(tables["reports"]) == 3955
    assert len(tables["images"]) == 7470
    assert len(tables["studies"]) == 3823
    annotation = json.loads(ANNOTATION.read_text(encoding="utf-8"))
    left_out = {
        row["id"]: name
        for name, rows in annotation.items()
        for row in rows
        if row["id"].startswith(("CXR1_", "CXR2_", "CXR1015_"))
    }
    assert left_out == {"CXR1_1_IM-0001": "train", "CXR2_IM-0652": "test", "CXR1015_IM-0001": "test"}
    counts = {
        name: sum(row["split"] == name for row in tables["splits"]) for name in ("train", "val", "test", "unassigned")
    }
    # R2Gen's 2,069 / 296 / 590 less the three annotated studies whose image files were left out.
    assert counts == {"train": 2068, "val": 296, "test": 588, "unassigned": 3823 - 2952}


def _listed_image_ids(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return [part.split('"', 1)[0] for part in text.split('<parentImage id="')[1:]]
