"""Tests for pipeline.openi: safe parsing of Open-I report XML, on fake trees and the real archive."""

from __future__ import annotations

import collections
import logging
import os
import tarfile
import time
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import pytest

from pipeline.openi import OpenIReports, natural_key, study_id_of

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CXRGEN_SHARED", REPO_ROOT.parent / "shared"))
REPORTS_ARCHIVE = SHARED / "data" / "openi" / "NLMCXR_reports.tgz"
SECRET = "SECRET-7f3a9c-do-not-leak"
NORMAL_SECTIONS = {
    "COMPARISON": "None.",
    "INDICATION": "XXXX-year-old male, chest pain",
    "FINDINGS": "The heart is normal in size. There are no XXXX of a pleural effusion.",
    "IMPRESSION": "No acute cardiopulmonary disease.",
}


def report_xml(
    report_id: int | None,
    sections: dict[str, str | None] | None = None,
    images: tuple[str, ...] = (),
    mesh_major: tuple[str, ...] = (),
    mesh_automatic: tuple[str, ...] = (),
    doctype: str = "",
    encoding: str = "utf-8",
) -> bytes:
    """Return an Open-I style report; a section whose text is None becomes an empty element."""
    ids = f'<uId id="CXR{report_id}"/><IUXRId id="{report_id}"/>' if report_id is not None else ""
    abstract = "".join(
        f"<AbstractText Label={quoteattr(label)}/>"
        if text is None
        else f"<AbstractText Label={quoteattr(label)}>{escape(text)}</AbstractText>"
        for label, text in (NORMAL_SECTIONS if sections is None else sections).items()
    )
    mesh = "".join(f"<major>{escape(term)}</major>" for term in mesh_major)
    mesh += "".join(f"<automatic>{escape(term)}</automatic>" for term in mesh_automatic)
    parents = "".join(
        f'<parentImage id="{image_id}"><figureId>F{n}</figureId><caption>PA and Lateral Chest</caption></parentImage>'
        for n, image_id in enumerate(images, start=1)
    )
    text = (
        f'<?xml version="1.0" encoding="{encoding}"?>\n{doctype}<eCitation><meta type="rr"/>{ids}'
        f"<MedlineCitation><Article><Abstract>{abstract}</Abstract></Article></MedlineCitation>"
        f"<MeSH>{mesh}</MeSH>{parents}</eCitation>\n"
    )
    return text.encode(encoding)


def write_report(folder: Path, name: str, data: bytes) -> Path:
    path = folder / "ecgen-radiology" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def warnings_text(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING)


@pytest.fixture(scope="module")
def real_reports_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not REPORTS_ARCHIVE.is_file():
        pytest.fail(f"{REPORTS_ARCHIVE} not found; set CXRGEN_SHARED to the shared data folder")
    folder = tmp_path_factory.mktemp("openi-reports")
    with tarfile.open(REPORTS_ARCHIVE, "r:gz") as archive:
        archive.extractall(folder, filter="data")
    return folder


def test_report_fields_parsed(tmp_path: Path) -> None:
    images = ("CXR7_IM-2263-1001", "CXR7_IM-2263-2001")
    data = report_xml(7, images=images, mesh_major=("Cardiomegaly/mild",), mesh_automatic=("cardiomegaly", "effusion"))
    write_report(tmp_path, "7.xml", data)

    [report] = OpenIReports(tmp_path)

    assert report.report_id == 7
    assert report.uid == "CXR7"
    assert report.findings == NORMAL_SECTIONS["FINDINGS"]
    assert report.impression == NORMAL_SECTIONS["IMPRESSION"]
    assert report.indication == NORMAL_SECTIONS["INDICATION"]
    assert report.comparison == "None."
    assert report.mesh_major == ["Cardiomegaly/mild"]
    assert report.mesh_automatic == ["cardiomegaly", "effusion"]
    assert report.image_ids == list(images)
    assert report.captions == ["PA and Lateral Chest", "PA and Lateral Chest"]
    assert report.source_file == "ecgen-radiology/7.xml"


def test_anonymisation_tokens_kept_raw(tmp_path: Path) -> None:
    write_report(
        tmp_path, "1.xml", report_xml(1, {"FINDINGS": "  No XXXX  effusion.\n", "IMPRESSION": "Normal chest x-XXXX."})
    )

    [report] = OpenIReports(tmp_path)

    assert report.findings == "  No XXXX  effusion.\n"
    assert report.impression == "Normal chest x-XXXX."


def test_blank_or_missing_sections_are_none(tmp_path: Path) -> None:
    sections = {"COMPARISON": None, "FINDINGS": " \n\t ", "IMPRESSION": "Clear lungs."}
    write_report(tmp_path, "2.xml", report_xml(2, sections))

    [report] = OpenIReports(tmp_path)

    assert report.comparison is None
    assert report.findings is None
    assert report.indication is None
    assert report.impression == "Clear lungs."
    assert report.image_ids == []
    assert report.mesh_major == []


def test_non_ascii_text_kept(tmp_path: Path) -> None:
    utf8 = {"FINDINGS": "Opacité → lobe inférieur, 5 mm", "IMPRESSION": "Œdème"}
    latin1 = {"FINDINGS": "Pneumonie à droite", "IMPRESSION": "Contrôle"}
    write_report(tmp_path, "3.xml", report_xml(3, utf8))
    write_report(tmp_path, "4.xml", report_xml(4, latin1, encoding="iso-8859-1"))

    reports = OpenIReports(tmp_path)

    assert [report.findings for report in reports] == [utf8["FINDINGS"], latin1["FINDINGS"]]
    assert [report.impression for report in reports] == [utf8["IMPRESSION"], latin1["IMPRESSION"]]


def test_bad_files_skipped_and_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_report(tmp_path, "1.xml", report_xml(1))
    write_report(tmp_path, "2.xml", b"")
    write_report(tmp_path, "3.xml", b"<eCitation><IUXRId id='3'/><AbstractText>")
    wrong_encoding = report_xml(4, {"FINDINGS": "Opacité basale"}, encoding="iso-8859-1").replace(
        b'encoding="iso-8859-1"', b'encoding="utf-8"'
    )
    write_report(tmp_path, "4.xml", wrong_encoding)
    write_report(tmp_path, "5.xml", b'<?xml version="1.0"?><html><body>not a report</body></html>')
    write_report(tmp_path, "6.xml", report_xml(6))

    with caplog.at_level(logging.WARNING, logger="pipeline.openi"):
        reports = OpenIReports(tmp_path)

    assert [report.report_id for report in reports] == [1, 6]
    bad = [f"ecgen-radiology/{n}.xml" for n in (2, 3, 4, 5)]
    assert sorted(reports.skipped) == bad
    for name in bad:
        assert name in warnings_text(caplog)
    assert "Document is empty" in reports.skipped["ecgen-radiology/2.xml"]
    assert "encoding" in reports.skipped["ecgen-radiology/4.xml"]
    assert "<html>" in reports.skipped["ecgen-radiology/5.xml"]


def test_external_entities_never_reach_output(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    secret_file = tmp_path / "secret.txt"
    secret_file.write_text(SECRET, encoding="utf-8")
    evil_dtd = tmp_path / "evil.dtd"
    evil_dtd.write_text(f'<!ENTITY leak SYSTEM "{secret_file.as_uri()}">', encoding="utf-8")
    reports_dir = tmp_path / "reports"
    doctypes = {
        "1.xml": f'<!DOCTYPE eCitation [<!ENTITY leak SYSTEM "{secret_file.as_uri()}">]>\n',
        "2.xml": f'<!DOCTYPE eCitation [<!ENTITY % dtd SYSTEM "{evil_dtd.as_uri()}"> %dtd;]>\n',
        "3.xml": f'<!DOCTYPE eCitation SYSTEM "{evil_dtd.as_uri()}">\n',
    }
    for name, doctype in doctypes.items():
        data = report_xml(int(name[0]), doctype=doctype).replace(b"There are no", b"There are &leak; no")
        write_report(reports_dir, name, data)
    write_report(reports_dir, "4.xml", report_xml(4, {"FINDINGS": "Normal heart."}))

    with caplog.at_level(logging.DEBUG):
        reports = OpenIReports(reports_dir)

    assert [report.report_id for report in reports] == [4]
    assert sorted(reports.skipped) == [f"ecgen-radiology/{n}.xml" for n in (1, 2, 3)]
    assert SECRET not in repr(list(reports))
    assert SECRET not in caplog.text
    assert "leak" not in repr(list(reports))


def test_billion_laughs_skipped_quickly(tmp_path: Path) -> None:
    entities = '<!ENTITY lol0 "lol">' + "".join(
        f'<!ENTITY lol{level} "{f"&lol{level - 1};" * 10}">' for level in range(1, 10)
    )
    data = report_xml(9, doctype=f"<!DOCTYPE eCitation [{entities}]>\n").replace(b"There are no", b"&lol9;")
    write_report(tmp_path, "9.xml", data)
    write_report(tmp_path, "10.xml", report_xml(10))

    start = time.perf_counter()
    reports = OpenIReports(tmp_path)

    assert time.perf_counter() - start < 5
    assert [report.report_id for report in reports] == [10]
    assert list(reports.skipped) == ["ecgen-radiology/9.xml"]


def test_unknown_label_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sections = {**NORMAL_SECTIONS, "HISTORY": "Smoker", "": "no label"}
    write_report(tmp_path, "11.xml", report_xml(11, sections))
    write_report(tmp_path, "12.xml", report_xml(12, {"History": "Cough", "FINDINGS": "Normal."}))

    with caplog.at_level(logging.WARNING, logger="pipeline.openi"):
        reports = OpenIReports(tmp_path)

    assert len(reports) == 2
    assert reports.unknown_labels == collections.Counter({"HISTORY": 2, "<no label>": 1})
    assert "HISTORY" in warnings_text(caplog)
    assert reports[1].findings == "Normal."


def test_report_id_falls_back_to_file_stem(tmp_path: Path) -> None:
    write_report(tmp_path, "21.xml", report_xml(None))
    write_report(tmp_path, "notes.xml", report_xml(None))

    reports = OpenIReports(tmp_path)

    assert [report.report_id for report in reports] == [21]
    assert reports[0].uid is None
    assert "no numeric report id" in reports.skipped["ecgen-radiology/notes.xml"]


def test_non_ascii_or_huge_report_id_skipped(tmp_path: Path) -> None:
    for name, report_id in (("a.xml", "²"), ("b.xml", "٣"), ("c.xml", "9" * 19), ("d.xml", "9" * 18)):
        write_report(tmp_path, name, report_xml(None).replace(b"<eCitation>", f'<eCitation><IUXRId id="{report_id}"/>'.encode()))

    reports = OpenIReports(tmp_path)

    assert [report.report_id for report in reports] == [10**18 - 1]
    assert sorted(reports.skipped) == [f"ecgen-radiology/{name}" for name in ("a.xml", "b.xml", "c.xml")]
    assert all("at most 18 digits" in reason for reason in reports.skipped.values())


def test_repeated_report_id_skipped(tmp_path: Path) -> None:
    write_report(tmp_path, "31.xml", report_xml(31, {"FINDINGS": "first"}))
    write_report(tmp_path, "copy-of-31.xml", report_xml(31, {"FINDINGS": "second"}))

    reports = OpenIReports(tmp_path)

    assert [report.findings for report in reports] == ["first"]
    assert "also in ecgen-radiology/31.xml" in reports.skipped["ecgen-radiology/copy-of-31.xml"]


def test_invalid_and_repeated_image_ids_dropped(tmp_path: Path) -> None:
    images = ("CXR41_IM-0001-1001", "../../etc/passwd", "", "CXR41_IM-0001-1001", "CXR41_IM-0001-2001")
    write_report(tmp_path, "41.xml", report_xml(41, images=images))

    [report] = OpenIReports(tmp_path)

    assert report.image_ids == ["CXR41_IM-0001-1001", "CXR41_IM-0001-2001"]
    assert len(report.captions) == 2


def test_files_read_in_natural_order(tmp_path: Path) -> None:
    for report_id in (10, 2, 1):
        write_report(tmp_path, f"{report_id}.xml", report_xml(report_id))

    reports = OpenIReports(tmp_path)

    assert [report.source_file for report in reports] == [f"ecgen-radiology/{n}.xml" for n in (1, 2, 10)]


def test_missing_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="report folder not found"):
        OpenIReports(tmp_path / "absent")


@pytest.mark.parametrize(
    ("image_id", "study_id"),
    [
        ("CXR1015_IM-0001-1001", "CXR1015_IM-0001"),
        ("CXR1015_IM-0013-2001", "CXR1015_IM-0013"),
        ("CXR1_1_IM-0001-3001", "CXR1_1_IM-0001"),
        ("CXR2199_IM-0809-0001-0002", "CXR2199_IM-0809"),
        ("CXR2890_IM-1293-22001", "CXR2890_IM-1293"),
        ("IM-0001-1001", None),
        ("CXR12_IM-12-1001", None),
    ],
)
def test_study_id_of(image_id: str, study_id: str | None) -> None:
    assert study_id_of(image_id) == study_id


def test_natural_key_orders_numbers() -> None:
    ids = ["CXR2890_IM-1293-22001", "CXR2890_IM-1293-3001", "CXR10_IM-0001-1001", "CXR9_IM-0001-1001"]

    assert sorted(ids, key=natural_key) == [
        "CXR9_IM-0001-1001",
        "CXR10_IM-0001-1001",
        "CXR2890_IM-1293-3001",
        "CXR2890_IM-1293-22001",
    ]


def test_real_archive_parsed_in_full(real_reports_dir: Path) -> None:
    reports = OpenIReports(real_reports_dir)

    assert len(reports) == 3955
    assert reports.skipped == {}
    assert not reports.unknown_labels
    images_per_report = collections.Counter(len(report.image_ids) for report in reports)
    assert images_per_report == {0: 104, 1: 446, 2: 3208, 3: 181, 4: 15, 5: 1}
    assert sum(report.findings is None for report in reports) == 530
    assert sum(report.impression is None for report in reports) == 34
    assert sum(report.findings is None and report.impression is None for report in reports) == 28
    assert sum("XXXX" in (report.findings or "") for report in reports) == 1486
    assert all(study_id_of(image_id) for report in reports for image_id in report.image_ids)
    assert all(len(report.captions) == len(report.image_ids) for report in reports)


def test_real_report_1015_spans_two_series(real_reports_dir: Path) -> None:
    [report] = [report for report in OpenIReports(real_reports_dir) if report.report_id == 1015]

    assert report.source_file == "ecgen-radiology/1015.xml"
    assert report.uid == "CXR1015"
    assert report.comparison == "XXXX"
    assert [study_id_of(image_id) for image_id in report.image_ids] == ["CXR1015_IM-0001"] * 2 + ["CXR1015_IM-0013"] * 2
    assert report.mesh_major == [
        "Opacity/lung/base/bilateral/patchy/streaky",
        "Technical Quality of Image Unsatisfactory ",
    ]
    assert report.findings is not None
    assert report.findings.startswith("Streaky and patchy bibasilar opacities")
