"""Tests for pipeline.split: grouped and R2Gen splits of studies (image series)."""

from __future__ import annotations

import json
import logging
import os
import re
import tarfile
from pathlib import Path

import pandas as pd
import pytest

from pipeline.config import SplitParams
from pipeline.split import UNASSIGNED, AnnotationError, assign_splits, read_r2gen_annotation

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CXRGEN_SHARED", REPO_ROOT.parent / "shared"))
REPORTS_ARCHIVE = SHARED / "data" / "openi" / "NLMCXR_reports.tgz"
ANNOTATION = SHARED / "data" / "r2gen" / "annotation.json"
PARENT_IMAGE_ID = re.compile(rb'<parentImage id="([^"]+)"')
SERIES_ID = re.compile(r"^(CXR\d+(?:_\d+)?_IM-\d{4})")


def fake_studies(n_reports: int = 500) -> pd.DataFrame:
    """Return one series per report, and a second series for every fourth report."""
    rows = []
    for report_id in range(1, n_reports + 1):
        rows.append((f"CXR{report_id}_IM-0001", report_id))
        if report_id % 4 == 0:
            rows.append((f"CXR{report_id}_IM-0013", report_id))
    return pd.DataFrame(rows, columns=["study_id", "report_id"])


def shared_file(path: Path) -> Path:
    if not path.is_file():
        pytest.fail(f"{path} not found; set CXRGEN_SHARED to the shared data folder")
    return path


@pytest.fixture(scope="module")
def real_studies() -> pd.DataFrame:
    """Return every (series id, report id) of the real archive, read straight from the XML in the tarball."""
    rows = set()
    with tarfile.open(shared_file(REPORTS_ARCHIVE), "r:gz") as archive:
        for member in archive:
            if not (member.isfile() and member.name.endswith(".xml")):
                continue
            data = archive.extractfile(member).read()  # type: ignore[union-attr]
            report_id = int(Path(member.name).stem)
            for image_id in PARENT_IMAGE_ID.findall(data):
                series = SERIES_ID.match(image_id.decode())
                assert series is not None, image_id
                rows.add((series.group(1), report_id))
    return pd.DataFrame(sorted(rows), columns=["study_id", "report_id"])


def write_annotation(path: Path, splits: dict[str, list[str]]) -> Path:
    data = {
        name: [{"id": study_id, "report": "", "image_path": [], "split": name} for study_id in ids]
        for name, ids in splits.items()
    }
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_grouped_keeps_report_series_together() -> None:
    splits = assign_splits(fake_studies(), SplitParams())

    splits_per_report = splits.groupby("report_id")["split"].nunique()
    assert splits_per_report.max() == 1
    assert set(splits["split"]) == {"train", "val", "test"}


def test_grouped_fractions_count_reports() -> None:
    splits = assign_splits(fake_studies(500), SplitParams(val_fraction=0.1, test_fraction=0.2))

    reports = splits.drop_duplicates("report_id")["split"].value_counts()
    assert reports["test"] == 100
    assert reports["val"] == 50
    assert reports["train"] == 350


def test_grouped_ignores_row_order() -> None:
    studies = fake_studies()
    shuffled = studies.sample(frac=1, random_state=7).reset_index(drop=True)

    first = assign_splits(studies, SplitParams(seed=5))
    second = assign_splits(shuffled, SplitParams(seed=5))

    pd.testing.assert_frame_equal(first, second)


def test_grouped_seed_changes_assignment() -> None:
    first = assign_splits(fake_studies(), SplitParams(seed=1))
    second = assign_splits(fake_studies(), SplitParams(seed=2))

    assert not first["split"].equals(second["split"])


def test_result_columns_and_order() -> None:
    studies = pd.DataFrame({"study_id": ["CXR10_IM-0002", "CXR9_IM-0001", "CXR9_IM-0001"], "report_id": [10, 9, 9]})

    splits = assign_splits(studies, SplitParams())

    assert list(splits.columns) == ["study_id", "report_id", "split"]
    assert splits["study_id"].tolist() == ["CXR9_IM-0001", "CXR10_IM-0002"]
    assert splits["report_id"].tolist() == [9, 10]


def test_empty_studies_give_empty_splits() -> None:
    splits = assign_splits(pd.DataFrame({"study_id": [], "report_id": []}), SplitParams())

    assert splits.empty
    assert list(splits.columns) == ["study_id", "report_id", "split"]


def test_missing_column_raises() -> None:
    with pytest.raises(ValueError, match="report_id"):
        assign_splits(pd.DataFrame({"study_id": ["CXR1_IM-0001"]}), SplitParams())


def test_study_in_two_reports_raises() -> None:
    studies = pd.DataFrame({"study_id": ["CXR1_IM-0001", "CXR1_IM-0001"], "report_id": [1, 2]})

    with pytest.raises(ValueError, match="CXR1_IM-0001 belongs to reports 1, 2"):
        assign_splits(studies, SplitParams())


def test_r2gen_real_annotation_counts(real_studies: pd.DataFrame, caplog: pytest.LogCaptureFixture) -> None:
    params = SplitParams(method="r2gen", annotation=str(shared_file(ANNOTATION)))

    with caplog.at_level(logging.WARNING, logger="pipeline.split"):
        splits = assign_splits(real_studies, params)

    counts = splits["split"].value_counts()
    assert counts["train"] == 2069
    assert counts["val"] == 296
    assert counts["test"] == 590
    assert counts[UNASSIGNED] == len(real_studies) - 2955
    assert f"{counts[UNASSIGNED]} of {len(real_studies)} studies are not in" in caplog.text


def test_r2gen_annotation_ids_reduced_to_series(tmp_path: Path) -> None:
    path = write_annotation(
        tmp_path / "annotation.json", {"train": ["CXR2372_IM-0933-0001"], "val": [], "test": ["CXR5_IM-2117"]}
    )

    assert read_r2gen_annotation(path) == {"CXR2372_IM-0933": "train", "CXR5_IM-2117": "test"}


def test_r2gen_ignores_row_order(tmp_path: Path) -> None:
    path = write_annotation(
        tmp_path / "annotation.json", {"train": ["CXR4_IM-0001"], "val": ["CXR8_IM-0001"], "test": []}
    )
    params = SplitParams(method="r2gen", annotation=str(path))
    studies = fake_studies(10)

    first = assign_splits(studies, params)
    second = assign_splits(studies.iloc[::-1], params)

    pd.testing.assert_frame_equal(first, second)
    assert first.set_index("study_id")["split"].to_dict()["CXR8_IM-0001"] == "val"
    assert (first["split"] == UNASSIGNED).sum() == len(studies) - 2


def test_r2gen_warns_report_across_splits(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_annotation(
        tmp_path / "annotation.json", {"train": ["CXR4_IM-0001"], "val": [], "test": ["CXR4_IM-0013"]}
    )
    params = SplitParams(method="r2gen", annotation=str(path))

    with caplog.at_level(logging.WARNING, logger="pipeline.split"):
        splits = assign_splits(fake_studies(4), params)

    assert splits.set_index("study_id")["split"].to_dict()["CXR4_IM-0013"] == "test"
    assert "1 reports have series in more than one R2Gen split, for example report 4" in caplog.text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "invalid JSON"),
        ("[]", "expected a JSON object"),
        ('{"train": [], "test": []}', "missing list 'val'"),
        ('{"train": [{"report": "x"}], "val": [], "test": []}', r"train\[0\] has no string 'id'"),
        (
            '{"train": [{"id": "CXR1_IM-0001"}], "val": [], "test": [{"id": "CXR1_IM-0001-1001"}]}',
            "in both train and test",
        ),
    ],
)
def test_r2gen_malformed_file_names_it(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "broken-annotation.json"
    path.write_text(content, encoding="utf-8")
    params = SplitParams(method="r2gen", annotation=str(path))

    with pytest.raises(AnnotationError, match=message) as error:
        assign_splits(fake_studies(3), params)

    assert str(path) in str(error.value)


def test_r2gen_missing_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "absent.json"

    with pytest.raises(AnnotationError, match="not found") as error:
        assign_splits(fake_studies(3), SplitParams(method="r2gen", annotation=str(path)))

    assert str(path) in str(error.value)
